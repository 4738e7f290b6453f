"""Distillation into layer-pruned students: what a smaller, faster model keeps of a tuned teacher.

    python benchmarks/distill.py                                  # the whole comparison (hours on a busy 2-core CPU)
    python benchmarks/distill.py --records 32 --teacher-steps 2 --student-steps 2 --eval-records 8 \\
        --mcq 8 --layers 15 --decode-tokens 8 --repeats 1         # a small smoke run

1. The teacher: the default model (SmolLM2-135M, 30 layers) tuned (`--teacher-method`, LoRA by default)
   `--teacher-steps` steps at `--learning-rate` on the shared zh + en medical train sets (`--records` of
   each).
2. Students cut from the teacher with `distill.student_layers` N (default 15 and 20; `--layer-choice`:
   the angular block, as qatune's default, or evenly spaced, first and last kept), each trained `--student-steps` steps at
   `--student-learning-rate` on the same data two ways: (a) cross-entropy only (`distill.alpha=0`), (b)
   distillation (`--alpha`, forward KL at `--temperature`). A pruned student starts far from its teacher, so it gets its own learning rate.
3. For the base, the teacher and every student, printed as each is done: the eval loss per answer token
   on the held-out shared test sets (`--eval-records` of each) and the multiple-choice accuracy on the
   shared general sets (`--mcq` of each, log-likelihood cloze like lm-evaluation-harness).

Decode speed is measured first: the default model and its cuts to each of `--layers` decoder layers (the
students' architectures; a decode step's work does not depend on the weights' values) loaded together
and timed in turns (30, 15, 20 layers, again, `--repeats` rounds after a warm-up), each a batch-1 greedy
generation of exactly `--decode-tokens` new tokens on the same held-out question; the median tokens/s
and its ratio to the 30-layer model's come from the same rounds, so a machine shared with other work
slows every model alike.

The goal the issue set: the distilled 15-layer student keeps >= 90% of the teacher's eval-loss gain over
the base (`kept = (base - student) / (base - teacher)`), decodes >= 1.6x faster, and beats the CE-only
student of its size. Every run's folder is kept under `--out` for inspection. The figures recorded, and
how the run was split on a busy machine (`--teacher`, `--students-only`, `--decode-only`): benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep_defaults import load, quiet_runtime  # noqa: E402  (the defaults sweep's loading, one way for both)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TRAIN_SETS = [SHARED / "zh_medical_qa" / "train.jsonl", SHARED / "en_medical_qa" / "train.jsonl"]
TEST_SETS = [SHARED / "zh_medical_qa" / "test.jsonl", SHARED / "en_medical_qa" / "test.jsonl"]
GENERAL_SETS = [SHARED / "general_mcq" / "zh.jsonl", SHARED / "general_mcq" / "en.jsonl"]


def train_run(args: argparse.Namespace, model: str, out: Path, method: str, steps: int, learning_rate: float,
              *extra: str) -> dict:
    from qatune.config import load_config
    from qatune.reports import report_json
    from qatune.train.run import train

    sources = json.dumps([{"path": str(p), "max_records": args.records} for p in TRAIN_SETS])
    config = load_config(None, [
        f"model={model}", f"data.sources={sources}", "data.val_size=0", f"data.max_length={args.max_length}",
        f"data.output_dir={args.out / 'data'}", f"train.output_dir={out}", "train.overwrite_output_dir=true",
        f"method.name={method}", f"train.max_steps={steps}", f"train.per_device_batch_size={args.batch}",
        f"train.gradient_accumulation_steps={args.accumulation}", f"train.learning_rate={learning_rate}",
        "train.eval_at_start=false", "train.preview_questions=0", "train.report_to=none", *extra,
    ])
    started = time.perf_counter()
    report = report_json(train(config, quiet_runtime()).report)  # the report as train_report.json holds it
    return {"seconds": round(time.perf_counter() - started, 1), "steps": report["global_step"],
            "final_train_loss": report.get("final_train_loss")}


def measure_quality(args: argparse.Namespace, model_name: str) -> dict:
    """Held-out eval loss per answer token and general multiple-choice accuracy of one model."""
    from qatune.config import SourceConfig
    from qatune.eval.scoring import (
        choice_predictions,
        corpus_perplexity,
        reference_losses,
    )
    from qatune.eval.sets import load_eval_set

    model, tokenizer, template = load(model_name)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else template.end_of_turn_id
    qa = [item for path in TEST_SETS for item in load_eval_set(SourceConfig(path=str(path)),
                                                                max_items=args.eval_records).qa]
    losses = reference_losses(model, tokenizer, template, qa, args.max_length, pad)
    scored = [loss for loss in losses if loss is not None]
    eval_loss = sum(loss * n for loss, n in scored) / sum(n for _, n in scored)
    choices = [item for path in GENERAL_SETS for item in load_eval_set(SourceConfig(path=str(path)), "general",
                                                                       max_items=args.mcq).choice]
    picks = choice_predictions(model, tokenizer, template, choices, pad)
    accuracy = sum(p["pick_norm"] == item.answer for p, item in zip(picks, choices)) / max(len(choices), 1)
    return {"eval_loss": eval_loss, "perplexity": corpus_perplexity(losses), "mc_accuracy": accuracy,
            "eval_answers": len(scored), "mc_items": len(choices), "layers": model.config.num_hidden_layers}


def decode_rates(args: argparse.Namespace) -> dict[int, float]:
    """Median batch-1 greedy decode tokens/s of the default model and of its cuts to each of `args.layers`,
    the models timed in turns. The work of a decode step is set by the architecture, not the weights'
    values, so the cut base decodes as fast as the trained student of that depth."""
    import copy

    import torch

    from qatune.config import SourceConfig
    from qatune.eval.sets import load_eval_set
    from qatune.infer.generation import prompt_ids
    from qatune.train.stages.distill import keep_decoder_layers

    base, tokenizer, template = load("default")
    models = {base.config.num_hidden_layers: base}
    for layers in args.layers:
        models[layers] = copy.deepcopy(base)
        keep_decoder_layers(models[layers], layers)
    question = load_eval_set(SourceConfig(path=str(TEST_SETS[1])), max_items=1).qa[0].prompt
    ids = torch.tensor([prompt_ids(tokenizer, template.source, question)], device=base.device)
    rates: dict[int, list[float]] = {layers: [] for layers in models}
    with torch.no_grad():
        for round_index in range(args.repeats + 1):  # round 0 warms every model up and is not counted
            for layers, model in models.items():
                tokens = args.decode_tokens if round_index else 2
                started = time.perf_counter()
                # exactly `tokens` new tokens for every model: an early stop would time less work
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=tokens, min_new_tokens=tokens,
                                     pad_token_id=tokenizer.eos_token_id)
                if round_index:
                    rates[layers].append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - started))
    return {layers: statistics.median(values) for layers, values in rates.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=3000, help="train records from each shared train set")
    parser.add_argument("--teacher-steps", type=int, default=32)
    parser.add_argument("--student-steps", type=int, default=600)
    parser.add_argument("--layers", type=int, nargs="+", default=[15, 20])
    parser.add_argument("--kinds", nargs="+", choices=["ce", "distill"], default=["ce", "distill"],
                        help="which students of each size to train")
    parser.add_argument("--layer-choice", choices=["evenly_spaced", "angular_block"], default="angular_block",
                        help="distill.student_layer_choice: which layers the students keep")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--teacher-method", choices=["lora", "full"], default="lora",
                        help="lora: the students start from the teacher's merged weights")
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="the teacher's")
    parser.add_argument("--teacher", type=Path, help="a teacher an earlier run tuned (its --out/teacher): "
                        "reused instead of tuning one, to try other student settings against it")
    parser.add_argument("--student-learning-rate", type=float, default=5e-4,
                        help="both students' of each size, CE-only and distilled")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--eval-records", type=int, default=50, help="held-out records from each test set")
    parser.add_argument("--mcq", type=int, default=50, help="general multiple-choice items from each set")
    parser.add_argument("--decode-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed decode rounds (after one warm-up round); 0: no decode measurement")
    parser.add_argument("--students-only", action="store_true",
                        help="with --teacher: train and measure the students alone (the base and teacher rows are an "
                             "earlier run's), e.g. the other kind in a second process")
    parser.add_argument("--decode-only", action="store_true",
                        help="measure the decode speeds alone (e.g. again on a quieter machine) and stop")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_distill")
    args = parser.parse_args()
    if args.students_only and args.teacher is None:
        parser.error("--students-only needs --teacher")
    if not all(p.is_file() for p in TRAIN_SETS + TEST_SETS + GENERAL_SETS):
        print(f"the shared data sets are not in {SHARED}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    teacher = args.teacher or args.out / "teacher"
    models = {"base": "default", "teacher": str(teacher)}
    runs: dict[str, dict] = {}
    rows: dict[str, dict] = {}

    def record(name: str) -> None:
        rows[name] = measure_quality(args, models[name])
        print(f"measured {name}: {json.dumps(rows[name])}" + (f" after {json.dumps(runs[name])}" if name in runs else "")
              + f" [{time.perf_counter() - began:.0f} s]", flush=True)  # partial results survive a stopped run

    speeds = decode_rates(args) if args.repeats else {}  # first: a run stopped later keeps it
    if speeds:
        full = max(speeds)
        print("decode tokens/s by decoder layers: " + ", ".join(f"{n}: {v:.2f} ({v / speeds[full]:.2f}x)"
                                                                for n, v in speeds.items())
              + f" [{time.perf_counter() - began:.0f} s]", flush=True)
    if args.decode_only:
        return 0
    if not args.students_only:
        record("base")
        if args.teacher is None:
            runs["teacher"] = train_run(args, "default", teacher, args.teacher_method, args.teacher_steps,
                                        args.learning_rate)
        record("teacher")
    alphas = {"ce": 0.0, "distill": args.alpha}
    choice = "-angular" if args.layer_choice == "angular_block" else "-even"  # in the students' folders

    def student_name(layers: int, kind: str) -> str:
        return f"{layers}L-{kind}{choice}"

    for layers in args.layers:
        for kind in args.kinds:
            name, alpha = student_name(layers, kind), alphas[kind]
            models[name] = str(args.out / name)
            runs[name] = train_run(args, str(teacher), args.out / name, "full", args.student_steps,
                                   args.student_learning_rate, "train.stage=distill", f"distill.student_layers={layers}",
                                   f"distill.student_layer_choice={args.layer_choice}", f"distill.alpha={alpha}",
                                   f"distill.temperature={args.temperature}")
            record(name)

    results = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "rows": rows, "decode": speeds}
    if args.students_only:
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        return 0
    base, top = rows["base"], rows["teacher"]
    gain = base["eval_loss"] - top["eval_loss"]
    print(f"{'model':<14}{'layers':>7}{'eval loss':>11}{'kept gain':>11}{'MC acc':>8}{'tok/s':>8}{'x teacher':>10}")
    for name, row in rows.items():
        row["decode_tokens_per_s"] = speed = speeds.get(row["layers"], float("nan"))
        row["kept_gain"] = (base["eval_loss"] - row["eval_loss"]) / gain if gain else float("nan")
        print(f"{name:<14}{row['layers']:>7}{row['eval_loss']:>11.4f}{row['kept_gain']:>10.0%} "
              f"{row['mc_accuracy']:>7.1%}{speed:>8.2f}{speed / speeds.get(top['layers'], float('nan')):>10.2f}")
    for layers in args.layers if len(args.kinds) == 2 else []:
        ce, distilled = rows[student_name(layers, "ce")], rows[student_name(layers, "distill")]
        print(f"{layers} layers: distill eval loss {distilled['eval_loss']:.4f} vs CE-only {ce['eval_loss']:.4f} "
              f"({'distill better' if distilled['eval_loss'] < ce['eval_loss'] else 'CE-only better'})")
    if student_name(15, "distill") in rows and student_name(15, "ce") in rows:
        student, ce = rows[student_name(15, "distill")], rows[student_name(15, "ce")]
        speedup = speeds[15] / speeds[top["layers"]] if speeds else float("nan")
        print(f"goal, 15-layer distilled student: kept gain {student['kept_gain']:.0%} (>= 90%: "
              f"{'met' if student['kept_gain'] >= 0.9 else 'missed'}), decode {speedup:.2f}x the teacher (>= 1.6x: "
              f"{'met' if speedup >= 1.6 else 'missed'}), beats CE-only: "
              f"{'met' if student['eval_loss'] < ce['eval_loss'] else 'missed'}")
    print(f"wall time {time.perf_counter() - began:.0f} s")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
