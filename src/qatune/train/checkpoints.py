"""What an output folder holds: complete checkpoints, the run's own config, and what starting over
would remove. Deciding reads the folder only; `delete_earlier_run` and `delete_training_args_pickle`
are the only places that delete."""

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
TRAINING_ARGS_PICKLE = "training_args.bin"  # the Trainer's torch.save of its arguments: a pickle
# Everything a training run writes into train.output_dir (names and glob patterns): a fresh run into a
# folder that holds any of them needs train.overwrite_output_dir, which removes them all first.
RUN_OUTPUTS = (
    f"{CHECKPOINT_PREFIX}*", "runs", train_report.REPORT_FILE, train_report.LOSS_PLOT_FILE, CONFIG_FILE,
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "config.json",
    "adapter_model.safetensors", "adapter_config.json", "generation_config.json", "README.md",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", TRAINING_ARGS_PICKLE,
    "eval",  # eval.after_train's reports (qatune.workflow.train_and_evaluate)
)
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


def earlier_outputs(output_dir: Path) -> list[Path]:
    """What of `RUN_OUTPUTS` is in `output_dir` now, sorted (reads only)."""
    if not output_dir.is_dir():
        return []
    return sorted({path for pattern in RUN_OUTPUTS for path in output_dir.glob(pattern)})


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
    """Resume, start fresh, or start over (listing what would be removed); refuses to mix two runs in one
    folder, to replace anything without train.overwrite_output_dir, and to write into the model's own folder."""
    from qatune.files import model_folders, overlapping

    cfg = config.train
    out = Path(cfg.output_dir)
    models = model_folders(config.model)
    clash = overlapping(out, models)
    if clash is not None:
        raise TrainError(f"train.output_dir {out} is the folder of the model this run loads ({clash}): training "
                         "would replace its weights before or while they are read",
                         hint="choose another train.output_dir (e.g. a new folder beside the model)")
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
    earlier = earlier_outputs(out)
    if earlier and not cfg.overwrite_output_dir:
        names = [p.name + ("/" if p.is_dir() else "") for p in earlier]
        raise TrainError(f"{out} already holds a run's outputs, which a new run would replace: "
                         f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}",
                         hint="train.resume=true continues it (when it has a checkpoint); "
                              "train.overwrite_output_dir=true removes them and starts over; "
                              "or choose another train.output_dir")
    inside = next(((p, m) for p in earlier for m in models if overlapping(p, [m], or_inside=True) is not None), None)
    if inside is not None:  # e.g. model=run/checkpoint-40 with train.output_dir=run
        raise TrainError(f"starting over in {out} would remove {inside[0]}, which holds the model this run loads "
                         f"({inside[1]})", hint="copy that model elsewhere first, or choose another train.output_dir")
    # Starting over: nothing of the earlier run may be mistaken for this one's.
    return OutputDecision(out, None, tuple(earlier))


def delete_earlier_run(decision: OutputDecision) -> None:
    """Delete the earlier run's outputs the decision lists (the user said train.overwrite_output_dir=true)."""
    for path in decision.replaces:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def delete_training_args_pickle(output_dir: Path) -> None:
    """Delete the Trainer's pickled TrainingArguments from a finished run's folder: a published adapter must
    hold no pickle (unpickling runs code), and config.yaml records the run's settings."""
    (output_dir / TRAINING_ARGS_PICKLE).unlink(missing_ok=True)


def _config_changes(saved_path: Path, config: QatuneConfig) -> list[str]:
    import yaml

    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return [f"{saved_path.name} (missing or unreadable)"]
    # Both sides as written to files: a secret (never written) is no change, nor a masked URL password.
    before, now = _flatten(saved), _flatten(config.file_dump())
    secrets = _flatten(config.model_dump(mode="json")).keys() - now.keys()  # an older file may hold them
    # A data.max_length left unset is the data's choice, written to the run's file once prepare made it: this
    # config holds it only after its own prepare, so the unset value is not a change.
    chosen = set() if "max_length" in config.data.model_fields_set else {"data.max_length"}
    return [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(before.keys() | now.keys())
            if before.get(key) != now.get(key) and not key.startswith(RESUMABLE_CHANGES)
            and key not in secrets | chosen]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}
