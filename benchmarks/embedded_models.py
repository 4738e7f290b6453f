"""The two embedded models side by side: which one a Chinese (and English) reader should start from.

    python benchmarks/embedded_models.py                        # the issue's setting (both models, ~1 h on 2 cores)
    python benchmarks/embedded_models.py --models gemma-3-270m --records 32 --test-records 8 --mcq 20   # a smoke run

For each of `--models` (the embedded `default` SmolLM2-135M-Instruct and `gemma-3-270m`): LoRA at qatune's
measured defaults (rank 16 / alpha 32 on q/k/v/o, learning rate from the model's advice, `--epochs`, data.max_length
left unset so qatune chooses it from the data) on the first `--records` pairs of each shared medical train set
(zh + en), then `qatune train`'s own base-vs-tuned evaluation (eval.after_train) on the first `--test-records`
questions of each shared medical test set and the first `--mcq` items of each general multiple-choice set, greedy.

Printed per model, language and side (base / tuned), each with its 95% bootstrap interval over the questions:
ROUGE-1, ROUGE-L, token F1, perplexity of the reference answers, loop share, CJK share of the Chinese answers
(CJK characters over non-space characters, per answer), multiple-choice accuracy (Clopper-Pearson); then the
tuned-minus-base deltas qatune's report tests for significance, and the training tokens/s (load-dependent: compare
speeds only within one run on an idle machine; `train_throughput.py --model` compares them with LLaMA-Factory).
Every run's folder stays in `--out`; the figures go to `--out`/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TRAIN = {"zh": SHARED / "zh_medical_qa" / "train.jsonl", "en": SHARED / "en_medical_qa" / "train.jsonl"}
TEST = {"zh": SHARED / "zh_medical_qa" / "test.jsonl", "en": SHARED / "en_medical_qa" / "test.jsonl"}
GENERAL = {"zh": SHARED / "general_mcq" / "zh.jsonl", "en": SHARED / "general_mcq" / "en.jsonl"}
GENERATED = ("rouge1", "rougeL", "token_f1")
SEED = 0


def head(source: Path, count: int, target: Path) -> Path:
    """The first `count` records of `source` as a file of its own (the sets' names become the report's set names)."""
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()][:count]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def write_config(model: str, out: Path, data: Path, args: argparse.Namespace) -> Path:
    """The job as a qatune config: LoRA at its defaults, base against tuned after training."""
    train = [head(TRAIN[lang], args.records, data / f"train_{lang}.jsonl") for lang in TRAIN]
    tests = [head(TEST[lang], args.test_records, data / f"medical_{lang}.jsonl") for lang in TEST]
    general = [head(GENERAL[lang], args.mcq, data / f"general_{lang}.jsonl") for lang in GENERAL]
    config = {
        "model": model,
        "data": {"sources": [str(p) for p in train], "eval_sources": [str(p) for p in tests],
                 "output_dir": str(out / "data")},
        "method": {"name": "lora"},
        "train": {"output_dir": str(out / "lora"), "overwrite_output_dir": True, "num_epochs": args.epochs,
                  "preview_questions": 0},
        "eval": {"after_train": True, "data": [str(p) for p in tests], "general": [str(p) for p in general],
                 "decoding": {"max_new_tokens": args.max_new_tokens}},
    }
    path = out / "config.yaml"
    path.write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")  # JSON is YAML
    return path


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean with its 95% percentile-bootstrap interval (qatune's own bootstrap, against a zero baseline)."""
    from qatune.eval.confidence import paired_bootstrap

    interval = paired_bootstrap([0.0] * len(values), values, seed=SEED)
    return interval.delta, interval.low, interval.high


def perplexity_interval(rows: list[dict]) -> tuple[float, float, float]:
    """Perplexity over all reference tokens (token-weighted), with a bootstrap interval over questions."""
    import numpy as np

    losses = np.array([r["reference_loss"] * r["reference_tokens"] for r in rows])
    tokens = np.array([r["reference_tokens"] for r in rows], dtype=float)
    picks = np.random.default_rng(SEED).integers(0, len(rows), size=(2000, len(rows)))
    replicates = np.exp(losses[picks].sum(axis=1) / tokens[picks].sum(axis=1))
    low, high = np.percentile(replicates, [2.5, 97.5])
    return float(math.exp(losses.sum() / tokens.sum())), float(low), float(high)


def cjk_share(text: str) -> float:
    from qatune.eval.metrics import _CJK

    chars = [c for c in text if not c.isspace()]
    return 100.0 * len(_CJK.findall(text)) / len(chars) if chars else 0.0


def side_figures(rows: list[dict], language: str) -> dict[str, tuple[float, float, float]]:
    """One model side's figures on one language's medical and general sets."""
    from qatune.eval.confidence import clopper_pearson

    answered = [r for r in rows if r["set"] == f"medical_{language}"]
    figures = {name: mean_interval([r["scores"][name] for r in answered]) for name in GENERATED}
    figures["perplexity"] = perplexity_interval([r for r in answered if r.get("reference_tokens")])
    figures["loop_share"] = mean_interval([100.0 * ("loop" in r["flags"]) for r in answered])
    if language == "zh":
        figures["cjk_share"] = mean_interval([cjk_share(r["prediction"]) for r in answered])
    choices = [r for r in rows if r["set"] == f"general_{language}"]
    right = sum(r["correct"] for r in choices)
    low, high = clopper_pearson(right, len(choices))
    figures["mcq_accuracy"] = (100.0 * right / len(choices), 100.0 * low, 100.0 * high)
    return figures


def measure(model: str, args: argparse.Namespace) -> dict:
    out = args.out / model
    data = out / "sets"
    data.mkdir(parents=True, exist_ok=True)
    config = write_config(model, out, data, args)
    print(f"== {model}: qatune train {config}", flush=True)
    subprocess.run([str(REPO / ".venv" / "bin" / "qatune"), "train", str(config)], check=True)
    train = json.loads((out / "lora" / "train_report.json").read_text())
    report = json.loads((out / "lora" / "eval" / "eval_report.json").read_text())
    result = {"model": model, "tokens_per_s": train["tokens_per_s"], "train_samples": train["train_samples"],
              "precision": train["precision"], "max_length": read_max_length(out / "data"), "figures": {},
              "intervals": report["intervals"]}
    for side in ("base", "tuned"):
        rows = [json.loads(line) for line in (out / "lora" / "eval" / f"predictions.{side}.jsonl").open(encoding="utf-8")]
        result["figures"][side] = {lang: side_figures(rows, lang) for lang in TRAIN}
    return result


def read_max_length(data_dir: Path) -> int | None:
    report = data_dir / "data_report.json"
    choice = json.loads(report.read_text()).get("max_length_choice") if report.exists() else None
    return choice.get("value") if isinstance(choice, dict) else None


def show(results: list[dict]) -> None:
    def cell(figure: tuple[float, float, float]) -> str:
        return f"{figure[0]:.1f} [{figure[1]:.1f}, {figure[2]:.1f}]"

    names = ("rouge1", "rougeL", "token_f1", "perplexity", "loop_share", "cjk_share", "mcq_accuracy")
    for lang in TRAIN:
        print(f"\n{lang}: value [95% interval]")
        print("| model | side | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for result in results:
            for side in ("base", "tuned"):
                figures = result["figures"][side][lang]
                print(f"| {result['model']} | {side} | "
                      + " | ".join(cell(figures[n]) if n in figures else "-" for n in names) + " |")
    print("\ntuned - base on the medical test sets (qatune's paired bootstrap):")
    for result in results:
        for lang in TRAIN:
            deltas = result["intervals"][f"medical_{lang}"]
            print(f"  {result['model']} {lang}: " + ", ".join(
                f"{n} {deltas[n]['delta']:+.1f} [{deltas[n]['low']:+.1f}, {deltas[n]['high']:+.1f}]"
                f"{' significant' if deltas[n]['significant'] else ''}" for n in ("token_f1", "rougeL", "loop_share")))
    for result in results:
        print(f"training {result['model']}: {result['tokens_per_s']:.0f} tokens/s ({result['precision']}, "
              f"{result['train_samples']} samples, data.max_length chosen {result['max_length']})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["default", "gemma-3-270m"])
    parser.add_argument("--records", type=int, default=300, help="train pairs per language")
    parser.add_argument("--test-records", type=int, default=60, help="test questions per language")
    parser.add_argument("--mcq", type=int, default=100, help="general multiple-choice items per language")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_embedded_models")
    args = parser.parse_args()
    results = [measure(model, args) for model in args.models]
    show(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
