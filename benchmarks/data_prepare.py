"""Benchmark: `qatune data prepare` end to end on the shared zh + en medical train sets (~6,000 records).

Reads, normalises, filters, drops exact and near-duplicates (MinHash LSH), splits, checks leakage,
tokenizes with the default model's chat template and writes the Arrow dataset and report, in a fresh
process each run (imports and tokenizer load included, as a user would see it). Prints the median of
the runs and records/s. Goal: under 30 s on a 2-core machine.

    .venv/bin/python benchmarks/data_prepare.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
GOAL_S = 30.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    sources = [SHARED / "zh_medical_qa" / "train.jsonl", SHARED / "en_medical_qa" / "train.jsonl"]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        print(f"missing {missing}: this benchmark needs ../shared/data beside the repository", file=sys.stderr)
        return 2
    qatune = [sys.executable, "-m", "qatune"]
    # Warm the tokenizer cache once (the first conversion from GGUF is a one-off per machine).
    subprocess.run(qatune + ["config", "show"], check=True, capture_output=True)
    walls, report = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs + 1):
            out = Path(tmp) / f"run{run}"
            started = time.perf_counter()
            subprocess.run(
                qatune + ["data", "prepare", f"data.sources=[{sources[0]}, {sources[1]}]", f"data.output_dir={out}"],
                check=True, capture_output=True,
            )
            wall = time.perf_counter() - started
            if run == 0:
                print(f"warm-up run (tokenizer cache filled if empty): {wall:.1f} s")
                continue
            walls.append(wall)
            report = json.loads((out / "data_report.json").read_text(encoding="utf-8"))
            print(f"run {run}: {wall:.2f} s wall, {report['elapsed_s']:.2f} s in the stage")
    records = report["records_read"]
    median = statistics.median(walls)
    print(f"\nrecords read: {records}; kept train {report['splits']['train']['records']}, "
          f"validation {report['splits']['validation']['records']}; drops {report['drops']}")
    print(f"median wall time over {len(walls)} runs: {median:.2f} s  ->  {records / median:.0f} records/s")
    print(f"goal: < {GOAL_S:.0f} s  ->  {median / GOAL_S:.2f}x of the budget ({'met' if median < GOAL_S else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
