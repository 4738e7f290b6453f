"""Benchmark: the streaming readers on one huge record and on many small ones, before and after issue 19.

"before" is the reader at git revision `--before` (default 3d70732, the last one before the fix:
`git show 3d70732:src/qatune/data/readers.py`, loaded as a module beside the package), "after" is
the working tree. Cases:

- one 34 MiB record of 296,000 short turns, as a JSON array (before: re-decoded from its start after
  every 1 MiB refill, 9.4 s in the issue) and as JSONL;
- one 34 MiB record that is one string, and one of 3 Mi characters, as JSON arrays (before:
  "Unterminated string": a string longer than two refills was taken for a syntax error);
- 20,000 small records (56 MB) as a JSON array and as JSONL (nothing may get slower).

"after" reads with data.max_record_bytes = 64 MiB (the default 16 MiB would refuse the 34 MiB
records, by design). Prints the seconds (best of `--runs`) and the ratio. Goal: the 34 MiB records
in well under a second, the small records no slower than before (ratio <= 1.1).

    .venv/bin/python benchmarks/data_readers.py [--runs 3] [--before 3d70732]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qatune.data import readers as after

CAP = 64 << 20  # data.max_record_bytes for "after": above the 34 MiB records (the default 16 MiB refuses them)


def load_before(revision: str, folder: Path) -> ModuleType | None:
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:src/qatune/data/readers.py"],
                                check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        print(f"cannot read the old reader at {revision}: {exc.stderr.strip()}", file=sys.stderr)
        return None
    path = folder / "readers_before.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("readers_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def make_cases(folder: Path) -> dict[str, Path]:
    turn = [{"from": "human", "value": "头疼怎么办？"}, {"from": "gpt", "value": "多休息，多喝水。" * 3}]
    manual = {"conversations": turn * 148_000}  # 34 MiB (json.dumps escapes the Chinese) in 296,000 turns
    one_string = {"question": "What does the whole manual say?", "answer": "It says: dose once a day. " * 1_371_000}
    mid = {"question": "q", "answer": "多休息，多喝水。" * (3 << 17)}  # 3 Mi characters (9 MiB as UTF-8)
    small = [{"instruction": "头疼怎么办？" * 20, "output": "多休息，多喝水。" * 100}] * 20_000
    cases = {"34 MiB record of 296,000 turns, JSON array": ("turns.json", json.dumps([manual])),
             "34 MiB record of 296,000 turns, JSONL": ("turns.jsonl", json.dumps(manual) + "\n"),
             "34 MiB record, one string, JSON array": ("string.json", json.dumps([one_string])),
             "3 Mi-character record, JSON array": ("mid.json", json.dumps([mid], ensure_ascii=False)),
             "20,000 small records, JSON array": ("small.json", json.dumps(small, ensure_ascii=False, indent=1)),
             "20,000 small records, JSONL": ("small.jsonl",
                                             "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in small))}
    paths = {}
    for name, (file, text) in cases.items():
        paths[name] = folder / file
        paths[name].write_text(text, encoding="utf-8")
    return paths


def timed(read: Callable[[Path], object], path: Path, runs: int) -> tuple[float | None, str]:
    best, outcome = None, ""
    for _ in range(runs):
        started = time.perf_counter()
        try:
            records = list(read(path))
        except Exception as exc:  # noqa: BLE001 (the old reader's failure is a figure too)
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][-60:]}"
        wall = time.perf_counter() - started
        best = wall if best is None else min(best, wall)
        bad = sum(1 for r in records if r.error is not None)
        outcome = f"{len(records)} records" + (f", {bad} errors" if bad else "")
    return best, outcome


def seconds(wall: float | None) -> str:
    return f"{wall:9.3f}" if wall is not None else f"{'failed':>9}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--before", default="3d70732", help="git revision of the old reader")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        before = load_before(args.before, folder)
        paths = make_cases(folder)
        print(f"{'case':42} {'MB':>6} {'before s':>9} {'after s':>9} {'ratio':>7}  outcome before / after")
        for name, path in paths.items():
            old, old_outcome = timed(before.read_records, path, args.runs) if before else (None, "not measured")
            new, new_outcome = timed(lambda p: after.read_records(p, max_record_bytes=CAP), path, args.runs)
            ratio = f"{new / old:7.3f}" if old and new else f"{'-':>7}"
            print(f"{name:42} {path.stat().st_size / 1e6:6.1f} {seconds(old)} {seconds(new)} {ratio}  "
                  f"{old_outcome} / {new_outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
