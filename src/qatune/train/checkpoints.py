"""What an output folder holds: complete checkpoints, the run's own config, and what starting over
would remove. Deciding reads the folder only; `remove_earlier_run` is the one place that deletes."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatune.config import QatuneConfig
from qatune.errors import QatuneError
from qatune.train import report as train_report

CONFIG_FILE = "config.yaml"
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
RUN_OUTPUTS = ("runs", "adapter_model.safetensors", "adapter_config.json", "model.safetensors",
               train_report.LOSS_PLOT_FILE)
# Keys that may change when a run is resumed; any other difference would silently make a different run.
RESUMABLE_CHANGES = (
    "train.resume", "train.overwrite_output_dir", "train.num_epochs", "train.max_steps", "train.eval_steps",
    "train.save_steps", "train.save_total_limit", "train.logging_steps", "train.report_to", "train.eval_at_start",
    "train.early_stopping_patience", "train.early_stopping_threshold", "train.preview_questions",
    # speed switches: the same computation, batched or projected differently
    "train.padding_free", "train.chunked_loss", "train.lean_dropout", "train.cpu_kernel_cache",
    "data.output_dir", "eval.", "serve.", "export.",
)


class TrainError(QatuneError):
    """Training cannot start or could not go on."""


@dataclass(frozen=True)
class OutputDecision:
    """What the run does with its output folder."""

    folder: Path
    resume_from: Path | None  # the checkpoint to continue from; None: a fresh run
    replaces: tuple[Path, ...]  # an earlier run's outputs, removed before this run writes (overwrite_output_dir)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders whose trainer_state.json (written last by the Trainer) is readable, by step."""
    found = []
    for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name[len(CHECKPOINT_PREFIX):]
        try:
            json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # killed while saving: not a resume point
        if step.isdigit():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def checkpoint_world_size(checkpoint: Path) -> int:
    """How many processes wrote a checkpoint: the Trainer saves one RNG state per rank."""
    per_rank = list(checkpoint.glob("rng_state_*.pth"))
    return len(per_rank) if per_rank else 1


def decide_output_dir(config: QatuneConfig, world_size: int) -> OutputDecision:
    """Resume, start fresh, or start over (listing what would be removed); refuses to mix two runs in one folder."""
    cfg = config.train
    out = Path(cfg.output_dir)
    checkpoints = complete_checkpoints(out)
    if cfg.resume:
        if not checkpoints:
            raise TrainError(f"train.resume=true but {out} holds no complete checkpoint to resume from",
                             hint="set train.resume=false to start a new run")
        changes = _config_changes(out / CONFIG_FILE, config)
        if changes:
            raise TrainError(f"cannot resume {out}: the config differs from the run's own {CONFIG_FILE} in "
                             + "; ".join(changes),
                             hint="set those keys back, or start a new run in another train.output_dir")
        written_by = checkpoint_world_size(checkpoints[-1])
        if written_by != world_size:
            raise TrainError(f"{checkpoints[-1]} was written by {written_by} process(es) and this run has {world_size}: "
                             "the data order and random state would not continue",
                             hint=f"resume with --nproc {written_by} (the same world size)")
        return OutputDecision(out, checkpoints[-1], ())
    earlier = sorted(p.name for p in out.glob(f"{CHECKPOINT_PREFIX}*")) + \
        [n for n in (train_report.REPORT_FILE,) if (out / n).exists()]
    if earlier and not cfg.overwrite_output_dir:
        raise TrainError(f"{out} already holds a run ({', '.join(earlier[:4])})",
                         hint="train.resume=true continues it; train.overwrite_output_dir=true starts over; "
                              "or choose another train.output_dir")
    # Starting over: nothing of the earlier run may be mistaken for this one's.
    return OutputDecision(out, None, tuple(out / n for n in earlier + [n for n in RUN_OUTPUTS if (out / n).exists()]))


def remove_earlier_run(decision: OutputDecision) -> None:
    """Delete the earlier run's outputs the decision lists (the user said train.overwrite_output_dir=true)."""
    for path in decision.replaces:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _config_changes(saved_path: Path, config: QatuneConfig) -> list[str]:
    import yaml

    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return [f"{saved_path.name} (missing or unreadable)"]
    before, now = _flatten(saved), _flatten(config.model_dump(mode="json"))
    return [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(before.keys() | now.keys())
            if before.get(key) != now.get(key) and not key.startswith(RESUMABLE_CHANGES)]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}
