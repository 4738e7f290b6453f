"""Training speed against LLaMA-Factory: one LoRA SFT job run three ways, side by side, in one run.

    python benchmarks/train_throughput.py                          # CPU: 32 steps, 3 runs of each way
    python benchmarks/train_throughput.py --steps 8 --repeats 1    # a quick look
    python benchmarks/train_throughput.py --ways llamafactory qatune --qatune train.padding_free=false
    python benchmarks/train_throughput.py --model gemma-3-270m --ways llamafactory qatune   # LLaMA-Factory's gemma3

The job: the default model (SmolLM2-135M-Instruct; `--model gemma-3-270m` for the other embedded one),
the first `--records` (512) pairs of the shared zh medical train set, max length 512, LoRA r16 / alpha 32 / dropout 0.05 on q/k/v/o, learning rate
2e-4 with a cosine schedule and no warm-up, effective batch 16, `--steps` optimizer steps (32: one
epoch), seed 42, the same precision for every way (bf16 where the hardware computes it, else fp32):

- `naive`: the seeds' recipe (seed 003): the chat template applied to each pair, every sample padded
  to max_length, labels = input_ids (padding and prompt included), peft LoRA, the HF Trainer with
  batch 4 x accumulation 4;
- `llamafactory`: LLaMA-Factory 0.9.5 in its own virtual environment, set up and run by
  ../shared/bench/llamafactory_peer.sh (its defaults: batch 4 x accumulation 4, gradient
  checkpointing, SDPA, padding to each batch's longest sample);
- `qatune`: `qatune train` with qatune's default configuration (plus `--qatune key=value` overrides).

Each run is a process of its own. For each way the script prints the medians over `--repeats` runs
of trained tokens/s (non-padding tokens seen by the Trainer / its train_runtime: model loading and
tokenization are not timed), samples/s, peak resident memory of the process (its own and its
children's, from wait4), and the final eval loss: every adapter is scored here, the same way, on a
fixed held-out slice (the first `--eval-records` pairs of the shared zh medical test set, the
model's own chat template, loss on answer tokens and end-of-turn). Then the ratios against qatune.
On a CUDA GPU it also prints peak GPU memory (sampled with nvidia-smi) and model FLOPs utilisation
(`--peak-tflops`, known for H100/H200/A100).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TRAIN = SHARED / "data" / "zh_medical_qa" / "train.jsonl"
HELD_OUT = SHARED / "data" / "zh_medical_qa" / "test.jsonl"
PEER = SHARED / "bench" / "llamafactory_peer.sh"
WAYS = ("naive", "llamafactory", "qatune")
# The embedded models (`--model`) and LLaMA-Factory's name for each one's chat template. Its `gemma3` is the same
# turn format plus an image plugin that fails without an image processor (gemma-3-270m is text-only): `gemma`.
LF_TEMPLATES = {"default": "smollm2", "gemma-3-270m": "gemma"}
# The job every way runs: LLaMA-Factory's names on the left, as the peer script's YAML spells them.
LORA = {"lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
BATCH, ACCUMULATION, LEARNING_RATE, SEED = 4, 4, 2e-4, 42
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, per GPU


# ---------------------------------------------------------------------------------------------
# The three ways, each run in a process of its own (`--run WAY`), writing OUT/result.json


def run_qatune(args: argparse.Namespace, out: Path, data: Path) -> dict:
    import io

    from rich.console import Console

    from qatune.config import load_config
    from qatune.reports import report_json
    from qatune.runtime import Runtime
    from qatune.train.run import train

    overrides = [
        f"model={args.model}", f"data.sources=[{json.dumps(str(data))}]", f"data.max_length={args.max_length}",
        "data.val_size=0", f"data.output_dir={out / 'data'}", f"train.output_dir={out / 'run'}",
        f"train.max_steps={args.steps}", f"train.learning_rate={LEARNING_RATE}", "train.lr_scheduler=cosine",
        "train.warmup_ratio=0", f"train.seed={SEED}", "train.eval_at_start=false", "train.preview_questions=0",
        "train.report_to=none", "method.name=lora", f"method.lora_rank={LORA['lora_rank']}",
        f"method.lora_alpha={LORA['lora_alpha']}", f"method.lora_dropout={LORA['lora_dropout']}",
        f"method.target_modules=[{','.join(LORA['targets'])}]", *args.qatune,
    ]
    config = load_config(None, overrides)
    log = io.StringIO()
    report = report_json(train(config, Runtime.detect(Console(file=log, width=120))).report)
    batching = next((line for line in log.getvalue().splitlines() if line.startswith("Fast paths")), "")
    return {"tokens": report["tokens_seen"], "runtime": report["train_time_s"], "adapter": str(out / "run"),
            "samples": report["global_step"] * config.train.per_device_batch_size
            * config.train.gradient_accumulation_steps, "final_train_loss": report["final_train_loss"],
            "precision": report["precision"], "batch": f"{config.train.per_device_batch_size} x "
            f"{config.train.gradient_accumulation_steps}", "notes": batching}


def run_naive(args: argparse.Namespace, out: Path, data: Path) -> dict:
    """The seeds' recipe, as a hand-written transformers + peft script does it."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    model_dir = model_folder(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:  # a base model (gemma-3-270m): the turn template qatune gives it
        tokenizer.chat_template = qatune_tokenizer(args.model).chat_template
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["question"]},
                                            {"role": "assistant", "content": r["answer"]}], tokenize=False)
             for r in rows]
    encoded = tokenizer(texts, max_length=args.max_length, padding="max_length", truncation=True)
    dataset = Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                                 "labels": encoded["input_ids"]})
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(r=LORA["lora_rank"], lora_alpha=LORA["lora_alpha"],
                                             lora_dropout=LORA["lora_dropout"], target_modules=LORA["targets"],
                                             task_type="CAUSAL_LM"))
    precision = job_precision()
    training = TrainingArguments(
        output_dir=str(out / "run"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
        learning_rate=LEARNING_RATE, max_steps=args.steps, lr_scheduler_type="cosine", warmup_steps=0,
        bf16=precision == "bf16", use_cpu=not torch.cuda.is_available(), seed=SEED, logging_steps=1,
        save_strategy="no", report_to=[], include_num_input_tokens_seen="non_padding", disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training, train_dataset=dataset, data_collator=default_data_collator)
    result = trainer.train()
    model.save_pretrained(out / "run")
    return {"tokens": trainer.state.num_input_tokens_seen, "runtime": result.metrics["train_runtime"],
            "samples": args.steps * BATCH * ACCUMULATION, "adapter": str(out / "run"),
            "final_train_loss": next(e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e),
            "precision": precision, "batch": f"{BATCH} x {ACCUMULATION}", "notes": "padded to max_length"}


def run_llamafactory(args: argparse.Namespace, out: Path, data: Path) -> tuple[list[str], Callable[[], dict]]:
    """The peer script's command line, and how to read its result once it has run."""
    precision = job_precision()
    command = peer_command(args.lf_venv, args.model, out, data,
                           [f"max_steps={args.steps}", f"template={LF_TEMPLATES[args.model]}", *args.llamafactory])

    def result() -> dict:
        metrics = json.loads((out / "run" / "all_results.json").read_text())
        log = [json.loads(line) for line in (out / "run" / "trainer_log.jsonl").read_text().splitlines() if line]
        return {"tokens": metrics["num_input_tokens_seen"], "runtime": metrics["train_runtime"],
                "samples": args.steps * BATCH * ACCUMULATION, "adapter": str(out / "run"),
                "final_train_loss": next(e["loss"] for e in reversed(log) if "loss" in e), "precision": precision,
                "batch": f"{BATCH} x {ACCUMULATION}", "notes": "LLaMA-Factory defaults (gradient checkpointing)"}

    return command, result


# ---------------------------------------------------------------------------------------------
# Shared pieces


def peer_command(venv: Path, model: str, out: Path, data: Path, keys: list[str]) -> list[str]:
    """The peer script's command line for a job on `data`, in qatune's precision, with YAML overrides `keys`."""
    precision = job_precision()
    return ["bash", str(PEER), "train", str(venv), str(model_folder(model)), str(data), str(out),
            "include_num_input_tokens_seen=non_padding", f"bf16={'true' if precision == 'bf16' else 'false'}",
            f"fp16={'true' if precision == 'fp16' else 'false'}", *([] if _cuda() else ["use_cpu=true"]), *keys]


def ensure_peer(venv: Path) -> None:
    if not (venv / "bin" / "llamafactory-cli").is_file():
        print(f"setting up LLaMA-Factory 0.9.5 in {venv} (once, a few minutes)", flush=True)
        subprocess.run(["bash", str(PEER), "setup", str(venv)], check=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def job_precision() -> str:
    """What qatune's train.precision=auto picks here; the other ways get the same."""
    import torch

    from qatune.runtime import Runtime

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[Runtime.detect().compute_dtype()]


def model_folder(model: str) -> Path:
    """An embedded model as a plain Hugging Face folder (qatune converts its GGUF once)."""
    from qatune.config import ModelConfig
    from qatune.models import gguf_as_hf_folder, locate_model

    return gguf_as_hf_folder(locate_model(ModelConfig(name_or_path=model)), weights=True)


def qatune_tokenizer(model: str):
    from qatune.config import ModelConfig
    from qatune.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=model))


class GpuMemorySampler:
    """Peak memory nvidia-smi reports for the GPU while a run goes on (any process, any framework)."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            try:
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=5).stdout.split()
                self.peak = max(self.peak, float(used[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return

    def __enter__(self) -> "GpuMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_way(way: str, args: argparse.Namespace, out: Path, data: Path) -> dict:
    """One run of one way in a fresh process; adds its peak RSS (wait4) and peak GPU memory."""
    out.mkdir(parents=True, exist_ok=True)
    if way == "llamafactory":
        command, read_result = run_llamafactory(args, out, data)
    else:
        command = [sys.executable, __file__, "--run", way, "--out", str(out), "--data", str(data),
                   "--steps", str(args.steps), "--max-length", str(args.max_length), "--model", args.model,
                   *[f"--qatune={kv}" for kv in args.qatune]]
        read_result = lambda: json.loads((out / "result.json").read_text())  # noqa: E731
    return measured_run(way, command, out, read_result)


def measured_run(way: str, command: list[str], out: Path, read_result: Callable[[], dict]) -> dict:
    """Run `command` (one way's training, logging to OUT/log.txt), then its result with peak RSS and GPU memory."""
    log = (out / "log.txt").open("w")
    started = time.perf_counter()
    with GpuMemorySampler() if _cuda() else _Nothing() as gpu:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
    log.close()
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (out / "log.txt").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{way} failed (log {out / 'log.txt'}):\n{tail}")
    result = read_result()
    result.update(way=way, peak_rss_mib=usage.ru_maxrss / 1024, wall_s=time.perf_counter() - started,
                  tokens_per_s=result["tokens"] / result["runtime"], samples_per_s=result["samples"] / result["runtime"])
    if gpu is not None:
        result["peak_gpu_mib"] = gpu.peak
    return result


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def eval_losses(model: str, adapters: list[str], records: int, max_length: int) -> list[float]:
    """Each adapter's loss on the held-out slice: answer tokens (+ end-of-turn) under the model's own template."""
    import torch
    import transformers

    from qatune.config import ModelConfig
    from qatune.data.records import Conversation
    from qatune.data.templates import resolve_template
    from qatune.errors import Location
    from qatune.eval.scoring import corpus_perplexity, reference_losses
    from qatune.eval.sets import QAItem
    from qatune.models import attach_adapter, load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=model))
    template = resolve_template(tokenizer, "auto")
    rows = [json.loads(line) for line in HELD_OUT.read_text(encoding="utf-8").splitlines()[:records]]
    items = [QAItem(str(i), Conversation([{"role": "user", "content": r["question"]},
                                          {"role": "assistant", "content": r["answer"]}],
                                         "held_out", Location(str(HELD_OUT), i + 1)))
             for i, r in enumerate(rows)]
    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per adapter says nothing
    losses = []
    for adapter in adapters:
        tuned = attach_adapter(load_model(ModelConfig(name_or_path=model), dtype=torch.float32), adapter, "default")
        per_item = reference_losses(tuned, tokenizer, template, items, max_length, template.end_of_turn_id)
        losses.append(math.log(corpus_perplexity(per_item)))
    return losses


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, bf16 {'native' if job_precision() == 'bf16' else 'absent'}, " \
           f"torch {torch.__version__}"


def flops_per_token(model: str, seq_len: float) -> float:
    """LoRA training FLOPs per trained token of `model`: forward plus the backward pass's
    input gradients (frozen weights get none), 2 x 2 x (decoder parameters + vocabulary projection)
    + causal attention 2 x 2 x layers x seq_len x hidden; the adapters' own FLOPs (~1%) are left out."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_folder(model))
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    per_layer = hidden * (2 * hidden + 2 * kv) + 3 * hidden * config.intermediate_size
    return 2 * 2 * (layers * per_layer + hidden * config.vocab_size) + 2 * 2 * layers * seq_len * hidden


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--model", choices=tuple(LF_TEMPLATES), default="default", help="the embedded model trained")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-repeats", type=int, default=1, help="the naive way is slow: fewer runs")
    parser.add_argument("--eval-records", type=int, default=32)
    parser.add_argument("--lf-venv", type=Path, default=REPO / ".cache" / "llamafactory-0.9.5")
    parser.add_argument("--qatune", action="append", default=[], metavar="KEY=VALUE",
                        help="a qatune config override for the qatune way (repeatable)")
    parser.add_argument("--llamafactory", action="append", default=[], metavar="KEY=VALUE",
                        help="a LLaMA-Factory YAML override (repeatable)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak bf16 TFLOP/s, for MFU")
    parser.add_argument("--keep", type=Path, default=None, help="keep every run's folder here")
    parser.add_argument("--run", choices=("naive", "qatune"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run:  # a child process: one run of one way
        runner = {"naive": run_naive, "qatune": run_qatune}[args.run]
        (args.out / "result.json").write_text(json.dumps(runner(args, args.out, args.data)))
        return 0

    if not TRAIN.is_file():
        print(f"needs {TRAIN} (../shared beside the repository)", file=sys.stderr)
        return 1
    if "llamafactory" in args.ways:
        ensure_peer(args.lf_venv)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        data = work / "train.jsonl"
        work.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(TRAIN.read_text(encoding="utf-8").splitlines(keepends=True)[:args.records]),
                        encoding="utf-8")
        model_folder(args.model)  # converted once, before anything is timed
        print(f"{hardware()}\n{args.records} records of {TRAIN.name} (zh medical), max length {args.max_length}, "
              f"effective batch {BATCH * ACCUMULATION}, {args.steps} steps, LoRA r{LORA['lora_rank']} on "
              f"{'/'.join(t[0] for t in LORA['targets'])}, precision {job_precision()}", flush=True)
        runs: dict[str, list[dict]] = {way: [] for way in args.ways}
        # Interleaved (naive, llamafactory, qatune, then again), so a slow patch of the machine hits every way.
        for repeat in range(args.repeats):
            for way in args.ways:
                if way == "naive" and repeat >= args.naive_repeats:
                    continue
                result = run_way(way, args, work / f"{way}-{repeat}", data)
                runs[way].append(result)
                print(f"  {way} run {repeat + 1}: {result['tokens_per_s']:.1f} tokens/s, "
                      f"{result['peak_rss_mib']:.0f} MiB, {result['wall_s']:.0f} s", flush=True)
        print(f"scoring {sum(len(r) for r in runs.values())} adapters on the first {args.eval_records} pairs of "
              f"{HELD_OUT.name}", flush=True)
        for way, results in runs.items():
            for result, loss in zip(results, eval_losses(args.model, [r["adapter"] for r in results], args.eval_records,
                                                         args.max_length)):
                result["eval_loss"] = loss
        report(runs, args)
    return 0


def report(runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    def median(way: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[way])

    gpu = any("peak_gpu_mib" in r for results in runs.values() for r in results)
    header = f"{'way':13} {'runs':>4} {'tokens/s':>9} {'samples/s':>9} {'peak RSS MiB':>12} " + \
             (f"{'peak GPU MiB':>12} " if gpu else "") + f"{'eval loss':>9} {'train loss':>10}  batch    notes"
    print("\n" + header)
    for way, results in runs.items():
        tokens = [r["tokens_per_s"] for r in results]
        print(f"{way:13} {len(results):4d} {median(way, 'tokens_per_s'):9.1f} {median(way, 'samples_per_s'):9.3f} "
              f"{median(way, 'peak_rss_mib'):12.0f} " + (f"{median(way, 'peak_gpu_mib'):12.0f} " if gpu else "")
              + f"{median(way, 'eval_loss'):9.4f} {median(way, 'final_train_loss'):10.4f}  "
              f"{results[0]['batch']:8} {results[0]['notes']}  (tokens/s runs: "
              f"{', '.join(f'{t:.1f}' for t in tokens)})")
    if args.peak_tflops or gpu:
        import torch

        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()),
                                        None)
        if peak:
            for way, results in runs.items():
                per_sample = statistics.median(r["tokens"] / r["samples"] for r in results)
                mfu = median(way, "tokens_per_s") * flops_per_token(args.model, per_sample) / (peak * 1e12)
                print(f"model FLOPs utilisation {way}: {100 * mfu:.1f}% of {peak:g} TFLOP/s")
    if "qatune" not in runs:
        return
    for way in runs:
        if way == "qatune":
            continue
        speed = median("qatune", "tokens_per_s") / median(way, "tokens_per_s")
        memory = median("qatune", "peak_rss_mib") / median(way, "peak_rss_mib")
        loss = median("qatune", "eval_loss") / median(way, "eval_loss") - 1
        print(f"qatune vs {way}: {speed:.2f}x tokens/s, {memory:.2f}x peak RSS"
              + (f", {median('qatune', 'peak_gpu_mib') / median(way, 'peak_gpu_mib'):.2f}x peak GPU memory"
                 if gpu else "") + f", eval loss {100 * loss:+.2f}%")


if __name__ == "__main__":
    sys.exit(main())
