"""Training throughput and peak memory of each method on one machine, in one run.

    python benchmarks/train_methods.py                 # CPU: lora, full, freeze, prefix on the default model
    python benchmarks/train_methods.py --model /models/llama-3.1-8b --methods lora qlora --batch 8

Trains `--steps` optimizer steps per method on the first `--records` pairs of the shared zh
medical train set, `--repeats` times, and prints the median trained tokens/s (non-padding), peak
memory (process RSS; GPU allocated on CUDA) and the ratio of each method's tokens/s to the first
method's. On a CUDA GPU precision is bf16 where supported and qlora runs; on CPU qlora is skipped
(it needs bitsandbytes on CUDA).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "zh_medical_qa" / "train.jsonl"


def run_once(method: str, args: argparse.Namespace, folder: Path) -> dict:
    import io

    from rich.console import Console

    from qatune.config import load_config
    from qatune.reports import report_json
    from qatune.runtime import Runtime
    from qatune.train.run import train

    config = load_config(None, [
        f"model={args.model}", f"data.sources=[{{path: {SHARED}, max_records: {args.records}}}]",
        "data.val_size=0.05", f"data.max_length={args.max_length}", f"data.output_dir={folder / 'data'}",
        f"train.output_dir={folder / method}", "train.overwrite_output_dir=true",
        f"method.name={method}", f"train.max_steps={args.steps}", f"train.per_device_batch_size={args.batch}",
        f"train.gradient_accumulation_steps={args.accumulation}", "train.eval_at_start=false",
        "train.preview_questions=0", "train.report_to=none",
        "train.learning_rate=" + ("2e-5" if method in ("full", "freeze") else "2e-4"),
    ])
    report = report_json(train(config, Runtime.detect(Console(file=io.StringIO()))).report)
    return {"tokens_per_s": report["tokens_per_s"], "memory": report["peak_memory_mib"],
            "loss": report["final_train_loss"], "precision": report["precision"], "device": report["device"]}


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if not SHARED.is_file():
        print(f"needs {SHARED} (../shared beside the repository)", file=sys.stderr)
        return 1
    cuda = torch.cuda.is_available()
    methods = args.methods or (["lora", "qlora", "full", "freeze", "prefix"] if cuda else
                               ["lora", "full", "freeze", "prefix"])
    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{args.model} on {device}; {args.steps} steps x batch {args.batch} x accumulation {args.accumulation}, "
          f"max_length {args.max_length}, {args.repeats} repeat(s)")
    rows = []
    # Each run in a fresh process: peak RSS is a per-process figure, and no run warms another's caches.
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            runs = []
            for _ in range(args.repeats):
                with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                    runs.append(pool.submit(run_once, method, args, Path(tmp)).result())
            rows.append((method, runs))
    first = statistics.median(r["tokens_per_s"] for r in rows[0][1])
    print(f"{'method':8} {'precision':9} {'tokens/s':>10} {'ratio':>6} {'peak RSS MiB':>13} {'peak GPU MiB':>13} "
          f"{'loss':>7}")
    for method, runs in rows:
        speed = statistics.median(r["tokens_per_s"] for r in runs)
        rss = statistics.median(r["memory"]["process_rss"] for r in runs)
        gpu = statistics.median(r["memory"].get("gpu_allocated", 0.0) for r in runs)
        print(f"{method:8} {runs[0]['precision']:9} {speed:10.1f} {speed / first:6.2f} {rss:13.0f} {gpu:13.0f} "
              f"{runs[-1]['loss']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
