"""The sweep behind the training and evaluation defaults: learning rate, LoRA rank/alpha, eval decoding.

    python benchmarks/sweep_defaults.py                     # the issue's setting (~1.5 h on an idle 2-core CPU)
    python benchmarks/sweep_defaults.py --records 16 --eval-records 8 --learning-rates 1e-3 --ranks \\
        --generate-top 1 --decode-tokens 16                # a small smoke run
    python benchmarks/sweep_defaults.py --generate-runs base lr0.001-r16   # only the decoding comparison
    python benchmarks/sweep_defaults.py --model gemma-3-270m --out outputs/bench_sweep_gemma  # another model

1. LoRA on `--model` (the default model, SmolLM2-135M, unless named), `--epochs` (one) on `--records` of each shared medical train set
   (zh + en), everything else at qatune's defaults, once per `--learning-rates` value at rank 16 / alpha 32;
   then each `--ranks` value (alpha = 2 x rank) at `--rank-learning-rate`, by default the learning rate with
   the lowest eval loss.
2. Per run: the held-out eval loss per answer token (reference perplexity) on `--eval-records` of each shared
   test set, and the multiple-choice accuracy on `--mcq` of each shared general set.
3. The base and the `--generate-top` runs with the lowest eval loss answer `--gen-records` test questions of
   each language under greedy decoding with each `--penalties` repetition penalty: ROUGE-1, token F1 and the
   share of answers caught in a loop, per language, through qatune's own evaluation (`evaluate_set`).

Each row is printed as soon as it is measured (a run stopped half-way keeps its figures); the rows are
written to `--out`/results.json at the end. Quality figures only: they do not depend on machine load.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TRAIN_SETS = {"zh": SHARED / "zh_medical_qa" / "train.jsonl", "en": SHARED / "en_medical_qa" / "train.jsonl"}
TEST_SETS = {"zh": SHARED / "zh_medical_qa" / "test.jsonl", "en": SHARED / "en_medical_qa" / "test.jsonl"}
GENERAL_SETS = {"zh": SHARED / "general_mcq" / "zh.jsonl", "en": SHARED / "general_mcq" / "en.jsonl"}
EVAL_MAX_LENGTH = 512  # the same held-out references are scored for every model (longer ones are skipped)


def quiet_runtime():
    from rich.console import Console

    from qatune.runtime import Runtime

    return Runtime.detect(Console(file=io.StringIO()))


def train_run(args: argparse.Namespace, out: Path, learning_rate: float, rank: int) -> dict:
    from qatune.config import load_config
    from qatune.train.run import train

    sources = json.dumps([{"path": str(p), "max_records": args.records} for p in TRAIN_SETS.values()])
    config = load_config(None, [
        f"model={args.model}", f"data.sources={sources}", "data.val_size=0", f"data.max_length={args.max_length}",
        f"data.output_dir={args.out / 'data'}", f"train.output_dir={out}", "train.overwrite_output_dir=true",
        "method.name=lora", f"method.lora_rank={rank}", f"method.lora_alpha={2 * rank}",
        f"train.num_epochs={args.epochs}", f"train.learning_rate={learning_rate}", "train.eval_at_start=false",
        "train.preview_questions=0",
        "train.report_to=none", "train.save_total_limit=1", f"train.per_device_batch_size={args.batch}",
        f"train.gradient_accumulation_steps={args.accumulation}",
    ])
    started = time.perf_counter()
    train(config, quiet_runtime())
    report = json.loads((out / "train_report.json").read_text(encoding="utf-8"))  # the file, as every qatune writes it
    return {"train_seconds": round(time.perf_counter() - started, 1), "steps": report["global_step"]}


def load(model_name: str):
    """The model, its tokenizer and its template, loaded as qatune's evaluation loads them."""
    from qatune.config import ModelConfig
    from qatune.infer.load import load_for_inference

    return load_for_inference(ModelConfig(name_or_path=model_name), quiet_runtime())


def eval_sets(records: int, role: str = "domain") -> dict:
    from qatune.config import SourceConfig
    from qatune.eval.sets import load_eval_set

    paths = TEST_SETS if role == "domain" else GENERAL_SETS
    return {lang: load_eval_set(SourceConfig(path=str(path), name=f"{lang}_{role}"), role, max_items=records)
            for lang, path in paths.items()}


def loss_row(args: argparse.Namespace, model_name: str) -> dict:
    """Held-out eval loss per answer token (zh, en, both) and general multiple-choice accuracy."""
    import math

    from qatune.eval.scoring import choice_predictions, reference_losses

    model, tokenizer, template = load(model_name)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else template.end_of_turn_id
    row: dict = {}
    totals = [0.0, 0]
    for lang, eval_set in eval_sets(args.eval_records).items():
        kept = [pair for pair in reference_losses(model, tokenizer, template, eval_set.qa, EVAL_MAX_LENGTH, pad)
                if pair is not None]
        loss_sum, tokens = sum(loss * n for loss, n in kept), sum(n for _, n in kept)
        row[f"{lang}_loss"] = loss_sum / tokens
        totals = [totals[0] + loss_sum, totals[1] + tokens]
    row["eval_loss"] = totals[0] / totals[1]
    row["perplexity"] = math.exp(row["eval_loss"])
    right = items = 0
    for eval_set in (eval_sets(args.mcq, "general").values() if args.mcq else ()):
        picks = choice_predictions(model, tokenizer, template, eval_set.choice, pad)
        right += sum(p["pick_norm"] == item.answer for p, item in zip(picks, eval_set.choice))
        items += len(eval_set.choice)
    row["mc_accuracy"] = 100 * right / items if items else float("nan")
    return row


def generation_rows(args: argparse.Namespace, model_name: str) -> dict[float, dict]:
    """ROUGE-1, token F1 and loop share per language under each repetition penalty (greedy otherwise)."""
    from qatune.config import EvalConfig
    from qatune.eval.recipe import evaluate_set

    model, tokenizer, template = load(model_name)
    sets = eval_sets(args.gen_records)
    rows = {}
    for penalty in args.penalties:
        cfg = EvalConfig(decoding={"max_new_tokens": args.decode_tokens, "temperature": 0.0,
                                   "repetition_penalty": penalty})
        row = {}
        for lang, eval_set in sets.items():
            summary, _ = evaluate_set(model, tokenizer, template, eval_set, cfg, EVAL_MAX_LENGTH)
            row.update({f"{lang}_{key}": summary[key] for key in ("rouge1", "token_f1", "loop_share")})
        rows[penalty] = row
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="the model swept: `default`, `gemma-3-270m` or any model "
                        "qatune loads")
    parser.add_argument("--records", type=int, default=300, help="train records from each shared train set")
    parser.add_argument("--epochs", type=float, default=1, help="train.num_epochs of the training runs")
    parser.add_argument("--learning-rates", type=float, nargs="*", default=[1e-4, 2e-4, 5e-4, 1e-3, 2e-3])
    parser.add_argument("--rank-learning-rate", type=float,
                        help="the learning rate of the --ranks runs (default: the best of --learning-rates)")
    parser.add_argument("--ranks", type=int, nargs="*", default=[8, 32],
                        help="LoRA ranks tried at the best learning rate besides 16 (alpha = 2 x rank)")
    parser.add_argument("--max-length", type=int, default=256, help="data.max_length of the training runs")
    parser.add_argument("--batch", type=int, default=2, help="train.per_device_batch_size (qatune's default)")
    parser.add_argument("--accumulation", type=int, default=8, help="train.gradient_accumulation_steps (default's)")
    parser.add_argument("--eval-records", type=int, default=60, help="held-out records from each test set")
    parser.add_argument("--mcq", type=int, default=100, help="general multiple-choice items from each set")
    parser.add_argument("--generate-top", type=int, default=1,
                        help="runs with the lowest eval loss that generate, beside the base (0: no generation)")
    parser.add_argument("--gen-records", type=int, default=40, help="test questions of each language answered")
    parser.add_argument("--penalties", type=float, nargs="+", default=[1.0, 1.1, 1.2])
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--generate-runs", nargs="+", metavar="RUN",
                        help="only generate, no training: with these earlier runs (folders under --out; `base`: the base)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_sweep_defaults")
    args = parser.parse_args()
    if not all(p.is_file() for sets in (TRAIN_SETS, TEST_SETS, GENERAL_SETS) for p in sets.values()):
        print(f"the shared data sets are not in {SHARED}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}

    def measured(name: str, model: str, **settings: object) -> None:
        rows[name] = {**settings, **loss_row(args, model)}
        print(f"loss {name}: {json.dumps(rows[name])}", flush=True)  # partial results survive a stopped run

    def trained(learning_rate: float, rank: int) -> str:
        name = f"lr{learning_rate:g}-r{rank}" + (f"-e{args.epochs:g}" if args.epochs != 1 else "")
        folder = args.out / name
        measured(name, str(folder), learning_rate=learning_rate, rank=rank, alpha=2 * rank,
                 **train_run(args, folder, learning_rate, rank))
        return name

    generated: dict[str, dict] = {}

    def generated_by(name: str) -> None:
        generated[name] = generation_rows(args, args.model if name == "base" else str(args.out / name))
        for penalty, row in generated[name].items():
            print(f"generate {name} repetition_penalty={penalty:g}: {json.dumps(row)}", flush=True)

    if args.generate_runs:
        for name in args.generate_runs:
            generated_by(name)
    else:  # ordered so that a run stopped early keeps the figures the defaults need most
        measured("base", args.model)
        runs = [trained(lr, 16) for lr in args.learning_rates]
        best_runs = sorted(runs, key=lambda n: rows[n]["eval_loss"])
        for name in ["base", *best_runs[:args.generate_top]] if args.generate_top else ():
            generated_by(name)
        best_lr = args.rank_learning_rate or (rows[best_runs[0]]["learning_rate"] if runs else 2e-4)
        runs += [trained(best_lr, rank) for rank in args.ranks if rank != 16]

    print(f"{'run':<16}{'lr':>8}{'r/alpha':>9}{'steps':>6}{'zh loss':>9}{'en loss':>9}{'eval loss':>10}"
          f"{'ppl':>7}{'MC acc':>8}")
    for name, row in rows.items():
        settings = (f"{row['learning_rate']:>8g}{row['rank']:>5}/{row['alpha']:<3}{row['steps']:>6}" if name != "base"
                    else f"{'':>8}{'':>9}{'':>6}")
        print(f"{name:<16}{settings}{row['zh_loss']:>9.4f}{row['en_loss']:>9.4f}{row['eval_loss']:>10.4f}"
              f"{row['perplexity']:>7.2f}{row['mc_accuracy']:>8.1f}", flush=True)
    print(f"{'model':<16}{'penalty':>8}{'zh R-1':>8}{'zh F1':>8}{'zh loop%':>9}{'en R-1':>8}{'en F1':>8}{'en loop%':>9}")
    for name, by_penalty in generated.items():
        for penalty, row in by_penalty.items():
            print(f"{name:<16}{penalty:>8g}{row['zh_rouge1']:>8.2f}{row['zh_token_f1']:>8.2f}"
                  f"{row['zh_loop_share']:>9.1f}{row['en_rouge1']:>8.2f}{row['en_token_f1']:>8.2f}"
                  f"{row['en_loop_share']:>9.1f}")
    (args.out / ("generation.json" if args.generate_runs else "results.json")).write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "loss": rows,
        "generation": {name: {str(p): row for p, row in by.items()} for name, by in generated.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
