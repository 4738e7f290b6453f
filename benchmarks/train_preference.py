"""Preference training speed against LLaMA-Factory: one LoRA DPO job run both ways, interleaved, in one run.

    python benchmarks/train_preference.py                        # CPU: 12 steps, 2 runs of each way
    python benchmarks/train_preference.py --steps 4 --repeats 1  # a quick look
    python benchmarks/train_preference.py --qatune train.gradient_checkpointing=true

The pairs: questions of the shared zh medical set whose prompt is short (at most `--question-tokens`, 64,
tokens), the set's answer as `chosen` and the default model's own greedy answer (qatune's batched
generation, at most `--answer-tokens` new tokens) as `rejected`; the chosen answer is cut to the same
number of tokens, so that prompt plus either answer fits `--max-length` (256) and neither framework
truncates anything (they truncate differently). `--records` (48) training pairs from train.jsonl and
`--eval-records` (24) held-out pairs from test.jsonl, generated once and kept under `--out`.

The job, the same for both ways: the default model (SmolLM2-135M-Instruct, as a Hugging Face folder),
DPO with the sigmoid loss, beta 0.1, LoRA r16 / alpha 32 / dropout 0.05 on q/k/v/o (the reference is the
model with the adapter switched off in both), batch 2 x accumulation 2, learning rate 2e-4 with a cosine
schedule and no warm-up, `--steps` (12: one epoch of 48 pairs) optimizer steps, seed 42, qatune's
precision (bf16 where the hardware computes it, else fp32). Each way keeps its own defaults otherwise:
LLaMA-Factory 0.9.5 (../shared/bench/llamafactory_peer.sh, stage=dpo) checkpoints gradients, qatune does not.

For each way the medians over `--repeats` runs: trained tokens/s (non-padding tokens of chosen and
rejected sequences seen by the Trainer / its train_runtime; loading and tokenization are not timed),
pairs/s, peak resident memory of the process and its children (wait4), and the reward accuracy and margin
on the held-out pairs, scored here the same way for every adapter: DPO's implicit reward of an answer is
beta x (its log-probability under the tuned model - under the base), with the model's own chat template;
accuracy is the share of pairs whose chosen answer gets the higher reward. Then qatune's ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import (  # noqa: E402  (the SFT benchmark's machinery: peer, precision, measured runs)
    HELD_OUT,
    LORA,
    REPO,
    SEED,
    TRAIN,
    default_model_folder,
    ensure_peer,
    hardware,
    job_precision,
    measured_run,
    peer_command,
)

WAYS = ("llamafactory", "qatune")
BATCH, ACCUMULATION, LEARNING_RATE, BETA = 2, 2, 2e-4, 0.1


def run_qatune(args: argparse.Namespace, out: Path, data: Path) -> dict:
    from qatune.config import load_config
    from qatune.reports import report_json
    from qatune.train.run import train

    overrides = [
        "model=default", f"data.sources=[{json.dumps(str(data))}]", f"data.max_length={args.max_length}",
        "data.val_size=0", f"data.output_dir={out / 'data'}", f"train.output_dir={out / 'run'}", "train.stage=dpo",
        "train.overwrite_output_dir=true", f"train.max_steps={args.steps}", f"train.per_device_batch_size={BATCH}",
        f"train.gradient_accumulation_steps={ACCUMULATION}", f"train.learning_rate={LEARNING_RATE}",
        "train.lr_scheduler=cosine", "train.warmup_ratio=0", f"train.seed={SEED}", "train.eval_at_start=false",
        "train.preview_questions=0", "train.report_to=none", f"preference.beta={BETA}", "preference.loss_type=sigmoid",
        "method.name=lora", f"method.lora_rank={LORA['lora_rank']}", f"method.lora_alpha={LORA['lora_alpha']}",
        f"method.lora_dropout={LORA['lora_dropout']}", f"method.target_modules=[{','.join(LORA['targets'])}]",
        *args.qatune,
    ]
    report = report_json(train(load_config(None, overrides)).report)  # the report as train_report.json holds it
    return {"tokens": report["tokens_seen"], "runtime": report["train_time_s"], "adapter": str(out / "run"),
            "samples": args.steps * BATCH * ACCUMULATION, "final_train_loss": report["final_train_loss"]}


def llamafactory_command(args: argparse.Namespace, out: Path, data: Path) -> list[str]:
    keys = ["stage=dpo", f"pref_beta={BETA}", "pref_loss=sigmoid", f"cutoff_len={args.max_length}",
            f"max_steps={args.steps}", f"per_device_train_batch_size={BATCH}",
            f"gradient_accumulation_steps={ACCUMULATION}", f"learning_rate={LEARNING_RATE}"]
    return peer_command(args.lf_venv, out, data, keys + args.llamafactory)


def llamafactory_result(args: argparse.Namespace, out: Path) -> dict:
    metrics = json.loads((out / "run" / "all_results.json").read_text())
    log = [json.loads(line) for line in (out / "run" / "trainer_log.jsonl").read_text().splitlines() if line]
    return {"tokens": metrics["num_input_tokens_seen"], "runtime": metrics["train_runtime"],
            "samples": args.steps * BATCH * ACCUMULATION, "adapter": str(out / "run"),
            "final_train_loss": next(e["loss"] for e in reversed(log) if "loss" in e)}


def run_way(way: str, args: argparse.Namespace, out: Path, data: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if way == "llamafactory":
        return measured_run(way, llamafactory_command(args, out, data), out, lambda: llamafactory_result(args, out))
    command = [sys.executable, __file__, "--run", "qatune", "--out", str(out), "--data", str(data),
               "--steps", str(args.steps), "--max-length", str(args.max_length),
               *[f"--qatune={kv}" for kv in args.qatune]]
    return measured_run(way, command, out, lambda: json.loads((out / "result.json").read_text()))


# ---------------------------------------------------------------------------------------------
# The pairs, and how every adapter is scored on the held-out ones


def build_pairs(args: argparse.Namespace) -> tuple[Path, Path]:
    """OUT/pairs/{train,held_out}.jsonl: the set's answer against the base model's greedy one (made once)."""
    from qatune.config import DecodingConfig, ModelConfig
    from qatune.data.templates import resolve_template
    from qatune.infer.generation import generate
    from qatune.models import load_model, load_tokenizer
    from qatune.runtime import Runtime

    folder = args.out / "pairs"
    settings = {"records": args.records, "eval_records": args.eval_records,
                "question_tokens": args.question_tokens, "answer_tokens": args.answer_tokens}
    files = folder / "train.jsonl", folder / "held_out.jsonl"
    if (folder / "settings.json").is_file() and json.loads((folder / "settings.json").read_text()) == settings:
        return files
    tokenizer = load_tokenizer(ModelConfig())
    template = resolve_template(tokenizer, "auto")

    def short_questions(source: Path, count: int) -> list[dict]:
        rows = (json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip())
        return [r for r, _ in zip((r for r in rows if len(tokenizer.encode(r["question"])) <= args.question_tokens
                                   and r["answer"].strip()), range(count))]

    def cut(text: str) -> str:  # at most answer_tokens tokens; a split multi-byte character is dropped
        return tokenizer.decode(tokenizer.encode(text)[:args.answer_tokens]).rstrip("\ufffd").strip()

    sets = [short_questions(TRAIN, args.records), short_questions(HELD_OUT, args.eval_records)]
    model = load_model(ModelConfig(), dtype=Runtime.detect().compute_dtype())
    rows = [r for s in sets for r in s]
    print(f"generating the base model's greedy answers to {len(rows)} questions (once, kept in {folder})",
          flush=True)
    answers = generate(model, tokenizer, template.source, [[{"role": "user", "content": r["question"]}] for r in rows],
                       DecodingConfig(max_new_tokens=args.answer_tokens), template.end_of_turn_id, batch_size=24)
    by_question = {r["question"]: a.text for r, a in zip(rows, answers)}
    folder.mkdir(parents=True, exist_ok=True)
    for rows_of_set, path in zip(sets, files):
        pairs = [{"question": r["question"], "chosen": cut(r["answer"]), "rejected": by_question[r["question"]]}
                 for r in rows_of_set]
        path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs
                                if p["rejected"] and p["rejected"] != p["chosen"]), encoding="utf-8")
    (folder / "settings.json").write_text(json.dumps(settings))
    return files


def held_out_margins(adapters: list[str | None], held_out: Path) -> list[list[float]]:
    """Per model (None: the base), log p(chosen) - log p(rejected) of every held-out pair."""
    import torch
    import transformers

    from qatune.config import ModelConfig
    from qatune.data.templates import resolve_template
    from qatune.eval.preference import pairwise
    from qatune.models import attach_adapter, load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    template = resolve_template(tokenizer, "auto")
    rows = [json.loads(line) for line in held_out.read_text(encoding="utf-8").splitlines() if line]
    pairs = [([{"role": "user", "content": r["question"]}], r["chosen"], r["rejected"]) for r in rows]
    transformers.utils.logging.disable_progress_bar()
    margins = []
    for adapter in adapters:
        model = load_model(ModelConfig(), dtype=torch.float32)
        if adapter:  # merged: scoring through peft's unmerged layers is slower
            model = attach_adapter(model, adapter, "default").merge_and_unload()
        margins.append(pairwise(model, tokenizer, template, pairs)["margins"])
    return margins


def reward_scores(tuned: list[float], base: list[float]) -> tuple[float, float]:
    """DPO's reward accuracy and mean reward margin: beta x (tuned - base) of chosen minus that of rejected."""
    gains = [t - b for t, b in zip(tuned, base)]
    return sum(g > 0 for g in gains) / len(gains), BETA * statistics.mean(gains)


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--eval-records", type=int, default=24)
    parser.add_argument("--question-tokens", type=int, default=64)
    parser.add_argument("--answer-tokens", type=int, default=96)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "train_preference",
                        help="the pairs (made once) and every run's folder")
    parser.add_argument("--lf-venv", type=Path, default=REPO / ".cache" / "llamafactory-0.9.5")
    parser.add_argument("--qatune", action="append", default=[], metavar="KEY=VALUE",
                        help="a qatune config override for the qatune way (repeatable)")
    parser.add_argument("--llamafactory", action="append", default=[], metavar="KEY=VALUE",
                        help="a LLaMA-Factory YAML override (repeatable)")
    parser.add_argument("--run", choices=("qatune",), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run:  # a child process: one qatune run
        (args.out / "result.json").write_text(json.dumps(run_qatune(args, args.out, args.data)))
        return 0
    if not TRAIN.is_file():
        print(f"needs {TRAIN} (../shared beside the repository)", file=sys.stderr)
        return 1
    if "llamafactory" in args.ways:
        ensure_peer(args.lf_venv)
    default_model_folder()  # converted once, before anything is timed
    train_pairs, held_out = build_pairs(args)
    counts = [sum(1 for _ in path.open(encoding="utf-8")) for path in (train_pairs, held_out)]
    print(f"{hardware()}\n{counts[0]} training pairs ({TRAIN.name}: answer vs the base model's), {counts[1]} held "
          f"out ({HELD_OUT.name}), max length {args.max_length}, DPO sigmoid beta {BETA}, batch {BATCH} x "
          f"{ACCUMULATION}, {args.steps} steps, LoRA r{LORA['lora_rank']}, precision {job_precision()}", flush=True)
    runs: dict[str, list[dict]] = {way: [] for way in args.ways}
    for repeat in range(args.repeats):  # interleaved, so a slow patch of the shared machine hits both ways
        for way in args.ways:
            result = run_way(way, args, args.out / f"{way}-{repeat}", train_pairs)
            runs[way].append(result)
            print(f"  {way} run {repeat + 1}: {result['tokens_per_s']:.1f} tokens/s, {result['samples_per_s']:.3f} "
                  f"pairs/s, {result['peak_rss_mib']:.0f} MiB, {result['wall_s']:.0f} s", flush=True)
    print(f"scoring the base and {sum(len(r) for r in runs.values())} adapters on {counts[1]} held-out pairs",
          flush=True)
    flat = [r for results in runs.values() for r in results]
    base, *tuned = held_out_margins([None] + [r["adapter"] for r in flat], held_out)
    for result, margins in zip(flat, tuned):
        result["reward_accuracy"], result["reward_margin"] = reward_scores(margins, base)
        print(f"  {result['way']}: reward accuracy {result['reward_accuracy']:.3f}, margin "
              f"{result['reward_margin']:+.3f}", flush=True)
    report(runs)
    return 0


def report(runs: dict[str, list[dict]]) -> None:
    def median(way: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[way])

    print(f"\n{'way':13} {'runs':>4} {'tokens/s':>9} {'pairs/s':>8} {'peak RSS MiB':>12} {'reward acc':>10} "
          f"{'margin':>7} {'train loss':>10}  tokens/s runs")
    for way, results in runs.items():
        print(f"{way:13} {len(results):4d} {median(way, 'tokens_per_s'):9.1f} {median(way, 'samples_per_s'):8.3f} "
              f"{median(way, 'peak_rss_mib'):12.0f} {median(way, 'reward_accuracy'):10.3f} "
              f"{median(way, 'reward_margin'):+7.3f} {median(way, 'final_train_loss'):10.4f}  "
              + ", ".join(f"{r['tokens_per_s']:.1f}" for r in results))
    if set(runs) == set(WAYS):
        print(f"qatune vs llamafactory: {median('qatune', 'tokens_per_s') / median('llamafactory', 'tokens_per_s'):.2f}x "
              f"tokens/s, {median('qatune', 'samples_per_s') / median('llamafactory', 'samples_per_s'):.2f}x pairs/s, "
              f"{median('qatune', 'peak_rss_mib') / median('llamafactory', 'peak_rss_mib'):.2f}x peak RSS, reward "
              f"accuracy {median('qatune', 'reward_accuracy') - median('llamafactory', 'reward_accuracy'):+.3f}")


if __name__ == "__main__":
    sys.exit(main())
