"""Distillation into layer-pruned students: what a smaller, faster model keeps of a tuned teacher.

    python benchmarks/distill.py                                  # the full comparison (hours on a 2-core CPU)
    python benchmarks/distill.py --records 64 --teacher-steps 8 --student-steps 8 --eval-records 16 \\
        --mcq 20 --layers 15 --decode-tokens 32                  # a small smoke run

1. The teacher: the default model (SmolLM2-135M, 30 layers) full-tuned `--teacher-steps` steps on the shared
   zh + en medical train sets (`--records` of each).
2. Students cut from the teacher with `distill.student_layers` N (default 15 and 20, evenly spaced, first
   and last kept), each trained `--student-steps` steps on the same data two ways: (a) cross-entropy only
   (`distill.alpha=0`), (b) distillation (`distill.alpha`, forward KL at `distill.temperature`).
3. For the base, the teacher and every student: the eval loss per answer token on the held-out shared
   test sets (`--eval-records` of each), the multiple-choice accuracy on the shared general sets (`--mcq` of
   each, log-likelihood cloze like lm-evaluation-harness), and greedy decode tokens/s (median of `--repeats`
   batch-1 generations of `--decode-tokens` new tokens), with the ratio to the teacher's.

The goal the issue set: the distilled 15-layer student keeps >= 90% of the teacher's eval-loss gain over
the base (`kept = (base - student) / (base - teacher)`), decodes >= 1.6x faster, and beats the CE-only
student of its size. Every run's folder is kept under `--out` for inspection.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TRAIN_SETS = [SHARED / "zh_medical_qa" / "train.jsonl", SHARED / "en_medical_qa" / "train.jsonl"]
TEST_SETS = [SHARED / "zh_medical_qa" / "test.jsonl", SHARED / "en_medical_qa" / "test.jsonl"]
GENERAL_SETS = [SHARED / "general_mcq" / "zh.jsonl", SHARED / "general_mcq" / "en.jsonl"]


def quiet_runtime():
    from rich.console import Console

    from qatune.runtime import Runtime

    return Runtime.detect(Console(file=io.StringIO()))


def train_run(args: argparse.Namespace, model: str, out: Path, steps: int, *extra: str) -> dict:
    from qatune.config import load_config
    from qatune.train.run import train

    sources = json.dumps([{"path": str(p), "max_records": args.records} for p in TRAIN_SETS])
    config = load_config(None, [
        f"model={model}", f"data.sources={sources}", "data.val_size=0", f"data.max_length={args.max_length}",
        f"data.output_dir={args.out / 'data'}", f"train.output_dir={out}", "train.overwrite_output_dir=true",
        "method.name=full", f"train.max_steps={steps}", f"train.per_device_batch_size={args.batch}",
        f"train.gradient_accumulation_steps={args.accumulation}", f"train.learning_rate={args.learning_rate}",
        "train.eval_at_start=false", "train.preview_questions=0", "train.report_to=none", *extra,
    ])
    started = time.perf_counter()
    report = train(config, quiet_runtime()).report
    return {"seconds": time.perf_counter() - started, "steps": report["global_step"]}


def measure(args: argparse.Namespace, model_name: str) -> dict:
    """Held-out eval loss, general MC accuracy and decode tokens/s of one model."""
    import torch

    from qatune.config import DecodingConfig, ModelConfig, SourceConfig
    from qatune.data.templates import resolve_template
    from qatune.eval.scoring import choice_predictions, corpus_perplexity, reference_losses
    from qatune.eval.sets import load_eval_set
    from qatune.infer.generation import generate
    from qatune.models import load_model, load_tokenizer

    runtime = quiet_runtime()
    model_cfg = ModelConfig(name_or_path=model_name)
    tokenizer = load_tokenizer(model_cfg)
    template = resolve_template(tokenizer)
    model = load_model(model_cfg, dtype=runtime.dtype(model_cfg)).to(runtime.device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else template.end_of_turn_id
    qa = [item for path in TEST_SETS for item in load_eval_set(SourceConfig(path=str(path)),
                                                                max_items=args.eval_records).qa]
    losses = reference_losses(model, tokenizer, template, qa, args.max_length, pad)
    kept = [loss for loss in losses if loss is not None]
    eval_loss = sum(loss * n for loss, n in kept) / sum(n for _, n in kept)
    choices = [item for path in GENERAL_SETS for item in load_eval_set(SourceConfig(path=str(path)), "general",
                                                                       max_items=args.mcq).choice]
    picks = choice_predictions(model, tokenizer, template, choices, pad)
    accuracy = sum(p["pick_norm"] == item.answer for p, item in zip(picks, choices)) / max(len(choices), 1)
    decoding = DecodingConfig(max_new_tokens=args.decode_tokens, temperature=0.0)
    question = [qa[0].prompt]
    rates = []
    with torch.no_grad():
        for _ in range(args.repeats):
            started = time.perf_counter()
            answer = generate(model, tokenizer, template.source, question, decoding, template.end_of_turn_id, 1)[0]
            new_tokens = len(tokenizer.encode(answer.text, add_special_tokens=False)) or 1
            rates.append(new_tokens / (time.perf_counter() - started))
    return {"eval_loss": eval_loss, "perplexity": corpus_perplexity(losses), "mc_accuracy": accuracy,
            "decode_tokens_per_s": statistics.median(rates), "layers": model.config.num_hidden_layers}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=3000, help="train records from each shared train set")
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--student-steps", type=int, default=200)
    parser.add_argument("--layers", type=int, nargs="+", default=[15, 20])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--eval-records", type=int, default=200, help="held-out records from each test set")
    parser.add_argument("--mcq", type=int, default=200, help="general multiple-choice items from each set")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_distill")
    args = parser.parse_args()
    if not all(p.is_file() for p in TRAIN_SETS + TEST_SETS + GENERAL_SETS):
        print(f"the shared data sets are not in {SHARED}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)

    teacher = args.out / "teacher"
    runs: dict[str, dict] = {}
    rows: dict[str, dict] = {}

    def record(name: str, model: str) -> None:
        rows[name] = measure(args, model)
        print(f"measured {name}: {json.dumps(rows[name])}" + (f" after {json.dumps(runs[name])}" if name in runs else ""),
              flush=True)  # partial results survive a run stopped half-way

    record("base", "default")
    runs["teacher"] = train_run(args, "default", teacher, args.teacher_steps)
    record("teacher", str(teacher))
    for layers in args.layers:
        for kind, alpha in (("ce", 0.0), ("distill", args.alpha)):
            name = f"{layers}L-{kind}"
            runs[name] = train_run(args, str(teacher), args.out / name, args.student_steps, "train.stage=distill",
                                   f"distill.student_layers={layers}", f"distill.alpha={alpha}",
                                   f"distill.temperature={args.temperature}")
            record(name, str(args.out / name))

    base, top = rows["base"], rows["teacher"]
    gain = base["eval_loss"] - top["eval_loss"]
    print(f"{'model':<14}{'layers':>7}{'eval loss':>11}{'kept gain':>11}{'MC acc':>8}{'tok/s':>8}{'x teacher':>10}")
    for name, row in rows.items():
        kept = (base["eval_loss"] - row["eval_loss"]) / gain if gain else float("nan")
        print(f"{name:<14}{row['layers']:>7}{row['eval_loss']:>11.4f}{kept:>10.0%} {row['mc_accuracy']:>7.1%}"
              f"{row['decode_tokens_per_s']:>8.1f}{row['decode_tokens_per_s'] / top['decode_tokens_per_s']:>10.2f}")
    for layers in args.layers:
        ce, distilled = rows[f"{layers}L-ce"], rows[f"{layers}L-distill"]
        print(f"{layers} layers: distill eval loss {distilled['eval_loss']:.4f} vs CE-only {ce['eval_loss']:.4f} "
              f"({'distill better' if distilled['eval_loss'] < ce['eval_loss'] else 'CE-only better'})")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "runs": runs, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
