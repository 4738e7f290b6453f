"""What a run folder says about its training: loss and eval points, and its state.

The points come from the TensorBoard event files the Trainer writes and flushes at every logging
step (`train.output_dir/runs/*/events.out.tfevents.*`, `train.report_to: tensorboard`, the default),
read with tensorboardX's own protobuf classes: the same figures `loss_curve.png` is drawn from,
not the console text. A resumed run adds a new event file; a later file wins for a step logged twice.
The state is read from the files `qatune train` leaves: `train_report.json` once complete, complete
checkpoints once stopped.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from qatune.reports import read_report, report_json
from qatune.train.checkpoints import complete_checkpoints
from qatune.train.report import REPORT_FILE, TrainReport

_HEADER = 12  # uint64 length + uint32 masked CRC of the length; the data's CRC (4 bytes) follows it


def _records(path: Path) -> list[bytes]:
    """The complete TFRecord payloads of one event file (a record still being written is left for later)."""
    data = path.read_bytes()
    out, pos = [], 0
    while pos + _HEADER <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        end = pos + _HEADER + length + 4
        if end > len(data):
            break
        out.append(data[pos + _HEADER:pos + _HEADER + length])
        pos = end
    return out


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar the Trainer logged in `run_dir`: tag (`train/loss`, `eval/loss`...) -> step -> value."""
    from tensorboardX.proto import event_pb2

    found: dict[str, dict[int, float]] = {}
    files = sorted((run_dir / "runs").glob("*/events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    for path in files:
        for payload in _records(path):
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    found.setdefault(value.tag, {})[event.step] = value.simple_value
    return found


def curves(run_dir: Path) -> dict[str, list[list[float]]]:
    """Train and eval loss as [step, loss] pairs, by step."""
    found = scalars(run_dir) if run_dir.is_dir() else {}
    return {name: [[step, loss] for step, loss in sorted(found.get(tag, {}).items())]
            for name, tag in (("train", "train/loss"), ("eval", "eval/loss"))}


def run_state(run_dir: Path) -> dict[str, Any]:
    """`complete` (with its report, as the page reads it: the JSON object of the current schema), `stopped`
    (a checkpoint to resume from) or `empty`."""
    report_file = run_dir / REPORT_FILE
    if report_file.is_file():
        return {"state": "complete", "report": report_json(read_report(TrainReport, report_file))}
    checkpoints = complete_checkpoints(run_dir) if run_dir.is_dir() else []
    if checkpoints:
        return {"state": "stopped", "checkpoint": checkpoints[-1].name}
    return {"state": "empty"}
