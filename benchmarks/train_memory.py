"""Peak memory (process RSS) and tokens/s of each training method, with and without gradient checkpointing.

    python benchmarks/train_memory.py                       # default model + a random ~1B Llama, 3 steps each
    python benchmarks/train_memory.py --skip-1b --repeats 3
    python benchmarks/train_memory.py --steps-1b 2 --methods-1b lora qlora --time-budget 1200

For each method (lora: adapters on a base in the compute dtype; qlora: the same adapters on a 4-bit
NF4 base; full; freeze: the last 2 layers) and each `train.gradient_checkpointing` (off, on), trains
`--steps` optimizer steps of batch 1 x accumulation 4 on the shared en medical train set
(max_length 256) through `qatune.train.run.train`, each run in a process of its own (peak RSS is a
per-process figure), and prints the median peak RSS (MiB) and trained tokens/s (non-padding).

Models: (a) `model=default`; (b) a randomly initialised Llama of ~1.07B parameters (hidden 2048,
intermediate 5632, 22 layers, 32 heads, 4 KV heads, the default model's tokenizer and vocabulary),
created once and saved (bf16) into a temporary folder: same code path as a real 1B model, shape only
(its loss means nothing). From the 1B rows the script prints an extrapolation to 7B/8B: the RSS of
the process before training (Python, torch, qatune) plus the rest scaled by parameter count. That is
an estimate, not a measurement: activations grow with hidden size x layers, less than the parameter
count, and a Llama-3 8B's 128k vocabulary makes its logits larger.

Peak RSS counts file-backed pages too: loading a safetensors checkpoint maps it, so a qlora run's
peak is reached while the bf16 checkpoint is read and quantized (on the 1B model: 3.1 GiB peak at the
end of the load, 2.0 GiB of it file pages; 1.6 GiB resident after `prepare_model_for_kbit_training`).
So qlora's peak RSS and its estimate follow the checkpoint's size on disk; the file pages are page
cache the kernel can drop, not memory the training needs.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "en_medical_qa" / "train.jsonl"
METHODS = ["lora", "qlora", "full", "freeze"]
TARGETS = {"7B (Llama-2-7B, 6.74e9)": 6.74e9, "8B (Llama-3.1-8B, 8.03e9)": 8.03e9}
MARK = "TRAIN_MEMORY_RESULT "


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(method: str, gc: bool, model: str, steps: int, folder: Path) -> dict:
    """One training run in this process; returns the figures."""
    import io

    import torch  # noqa: F401  (imported before the baseline so it counts as runtime, not training)
    import transformers  # noqa: F401
    from rich.console import Console

    from qatune.config import load_config
    from qatune.reports import report_json
    from qatune.runtime import Runtime
    from qatune.train.run import train

    before = rss_mib()
    config = load_config(None, [
        f"model={model}", f"data.sources=[{{path: {SHARED}}}]", "data.val_size=0", "data.max_length=256",
        f"data.output_dir={folder / 'data'}", f"train.output_dir={folder / 'out'}", "train.overwrite_output_dir=true",
        f"method.name={method}", f"train.max_steps={steps}", "train.per_device_batch_size=1",
        "train.gradient_accumulation_steps=4", f"train.gradient_checkpointing={str(gc).lower()}",
        "train.eval_at_start=false", "train.preview_questions=0", "train.report_to=none",
        "train.learning_rate=" + ("2e-5" if method in ("full", "freeze") else "2e-4"),
    ])
    report = report_json(train(config, Runtime.detect(Console(file=io.StringIO()))).report)
    return {"rss": report["peak_memory_mib"]["process_rss"], "rss_before": before,
            "tokens_per_s": report["tokens_per_s"], "precision": report["precision"],
            "trainable": report["trainable_parameters"], "total": report["total_parameters"],
            "loss": report["final_train_loss"]}


def make_1b(folder: Path) -> int:
    """A random Llama of ~1.07B parameters with the default model's tokenizer, saved in bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qatune.config.model import ModelConfig
    from qatune.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    config = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    parameters = model.num_parameters()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "parameters.txt").write_text(str(parameters))
    return parameters


def run_child(method: str, gc: bool, model: str, steps: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, __file__, "--one", method, str(int(gc)), model, "--steps", str(steps),
                   "--work", tmp]
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
    return {"error": f"failed (exit {done.returncode}): {tail[0][:160]}"}


def measure(label: str, model: str, methods: list[str], steps: int, repeats: int, timeout: float,
            deadline: float) -> list[tuple[str, bool, list[dict]]]:
    rows = []
    for method in methods:
        for gc in (False, True):
            runs = []
            for _ in range(repeats):
                if time.monotonic() > deadline:
                    runs.append({"error": "not run (time budget spent)"})
                    break
                result = run_child(method, gc, model, steps, timeout)
                runs.append(result)
                print(f"  {label} {method} gc={'on' if gc else 'off'}: "
                      + (result["error"] if "error" in result else
                         f"{result['rss']:,.0f} MiB, {result['tokens_per_s']:.1f} tokens/s"), flush=True)
                if "error" in result:
                    break
            rows.append((method, gc, runs))
    return rows


def table(label: str, rows: list[tuple[str, bool, list[dict]]], steps: int) -> None:
    print(f"\n{label}, {steps} steps of batch 1 x accumulation 4, max_length 256")
    print(f"{'method':7} {'grad ckpt':9} {'precision':9} {'trainable':>12} {'peak RSS MiB':>13} {'tokens/s':>9} runs")
    for method, gc, runs in rows:
        good = [r for r in runs if "error" not in r]
        if not good:
            print(f"{method:7} {'on' if gc else 'off':9} {runs[-1]['error']}")
            continue
        rss = statistics.median(r["rss"] for r in good)
        speed = statistics.median(r["tokens_per_s"] for r in good)
        print(f"{method:7} {'on' if gc else 'off':9} {good[0]['precision']:9} {good[0]['trainable']:12,} "
              f"{rss:13,.0f} {speed:9.1f} {len(good)}")


def extrapolate(rows: list[tuple[str, bool, list[dict]]], parameters: int) -> None:
    print(f"\nESTIMATE (not measured): 7B/8B peak RSS from the 1B rows ({parameters / 1e9:.2f}e9 parameters): "
          "RSS before training + (peak RSS - RSS before training) x parameter ratio")
    for method, gc, runs in rows:
        good = [r for r in runs if "error" not in r]
        if not good:
            continue
        before = statistics.median(r["rss_before"] for r in good)
        rss = statistics.median(r["rss"] for r in good)
        estimates = ", ".join(f"{name}: ~{(before + (rss - before) * p / parameters) / 1024:,.0f} GiB"
                              for name, p in TARGETS.items())
        print(f"  estimate {method:7} grad ckpt {'on ' if gc else 'off'} -> {estimates}"
              + ("  (peak at the bf16 checkpoint load, file pages mostly: see the docstring)" if method == "qlora"
                 else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "GC", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make-1b", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--skip-default", action="store_true", help="only the 1B model")
    parser.add_argument("--skip-1b", action="store_true", help="only the default model")
    parser.add_argument("--steps-1b", type=int, default=None, help="steps for the 1B model (default: --steps)")
    parser.add_argument("--methods-1b", nargs="+", choices=METHODS, default=None)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the whole benchmark; runs not started by then are reported as not run")
    args = parser.parse_args()
    if args.one:
        method, gc, model = args.one
        print(MARK + json.dumps(one(method, gc == "1", model, args.steps, args.work)), flush=True)
        return 0
    if args.make_1b:
        print(make_1b(args.make_1b))
        return 0
    if not SHARED.is_file():
        print(f"needs {SHARED} (../shared beside the repository)", file=sys.stderr)
        return 1
    deadline = time.monotonic() + (args.time_budget if args.time_budget else float("inf"))
    results = []
    if not args.skip_default:
        results.append(("default model (SmolLM2-135M-Instruct)", measure(
            "default", "default", args.methods, args.steps, args.repeats, args.timeout, deadline), args.steps, None))
    if not args.skip_1b:
        steps = args.steps_1b or args.steps
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "llama-1b-random"
            start = time.monotonic()
            made = subprocess.run([sys.executable, __file__, "--make-1b", str(folder)], check=False,
                                  capture_output=True, text=True)
            if made.returncode:
                print(f"creating the 1B model failed: {made.stderr.strip()[-400:]}", file=sys.stderr)
                return 1
            parameters = int((folder / "parameters.txt").read_text())
            print(f"  random Llama {parameters / 1e9:.3f}e9 parameters created in {time.monotonic() - start:.0f} s",
                  flush=True)
            rows = measure("1B", str(folder), args.methods_1b or args.methods, steps, args.repeats, args.timeout,
                           deadline)
            results.append((f"random Llama {parameters / 1e9:.2f}B (2048/5632, 22 layers, 32/4 heads)", rows, steps,
                            parameters))
    for label, rows, steps, _ in results:
        table(label, rows, steps)
    for _, rows, _, parameters in results:
        if parameters:
            extrapolate(rows, parameters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
