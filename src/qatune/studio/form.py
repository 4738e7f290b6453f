"""The training form, generated from the config schema, and its check through the config loader.

Every field of the form sections is a schema field: its description is the help, its default is
shown, and a value is checked by `load_config` exactly as `qatune train key=value` checks it, so
the page shows the schema's own messages, every one of them. Only what differs from a default goes
into the command.
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, Field

from qatune.commands import command_line
from qatune.config import QatuneConfig, load_config, type_name
from qatune.config.schema import inner_model
from qatune.errors import ConfigError
from qatune.models import DEFAULT_MODEL, GEMMA_MODEL, embedded_models
from qatune.studio.paths import PathRefused, Workspace
from qatune.text_input import Name, Text

FORM_SECTIONS = ("model", "method", "train", "data")
# Lists of sources are chosen with the file picker; the prepared data's and the run's folders are
# the studio's (prepared/<run>, runs/<run>); eval/serve/export have pages of their own.
PICKED = {"data.sources", "data.eval_sources", "data.general_sources", "data.output_dir", "train.output_dir"}

PRESETS: dict[str, dict[str, Any]] = {
    "LoRA on the default model": {"model.name_or_path": DEFAULT_MODEL, "method.name": "lora",
                                  "train.num_epochs": 1},
    "LoRA on gemma-3-270m (Chinese)": {"model.name_or_path": GEMMA_MODEL, "method.name": "lora",
                                       "train.num_epochs": 1},
    "QLoRA 7B on a GPU": {"model.name_or_path": "Qwen/Qwen2.5-7B-Instruct", "method.name": "qlora",
                          "method.target_modules": "all-linear", "method.lora_dropout": 0.05,
                          "train.gradient_checkpointing": True, "train.per_device_batch_size": 4,
                          "train.gradient_accumulation_steps": 4, "train.num_epochs": 2},
}
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class TrainForm(BaseModel):
    """The training form as a page sends it: the run's name, the data files picked, the fields changed."""

    run: Name
    sources: list[Name] = Field(default_factory=list)
    values: dict[Name, Text] = Field(default_factory=dict)


def _widget(annotation: Any) -> tuple[str, list[Any]]:
    """How a value is entered: `bool` (checkbox), `choice` (one of), else `text` (read as YAML)."""
    if annotation is bool:
        return "bool", []
    if get_origin(annotation) is Literal:
        return "choice", list(get_args(annotation))
    return "text", []


def _shown(value: Any) -> str:
    """A default as the user would type it after `key=`."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def schema_fields() -> list[dict[str, Any]]:
    """The form: one entry per leaf field of the form sections, straight from the schema."""
    fields = []

    def walk(model: type[BaseModel], prefix: str, section: str) -> None:
        for name, info in model.model_fields.items():
            key = f"{prefix}.{name}"
            inner = inner_model(info.annotation)
            if key in PICKED:
                continue
            if inner is not None and get_origin(info.annotation) is not list:
                walk(inner, key, section)
                continue
            if inner is not None:
                continue  # lists of sub-sections: not form fields
            kind, choices = _widget(info.annotation)
            default = info.get_default(call_default_factory=True)
            fields.append({"key": key, "section": section, "kind": kind, "choices": choices,
                           "default": _shown(default), "type": type_name(info.annotation),
                           "description": info.description or ""})

    for section in FORM_SECTIONS:
        walk(inner_model(QatuneConfig.model_fields[section].annotation), section, section)
    return fields


def _problem_key(problem: str, keys: list[str]) -> str | None:
    """The form key a loader problem is about (`train.learning_rate: ...`, or a section-wide check)."""
    head = problem.split(":", 1)[0].split(" (line", 1)[0].strip()
    if head in keys:
        return head
    # A section-wide check (`train: save_steps=3 is not a multiple of eval_steps=2`): the first key it names.
    found = [(m.start(), k) for k in keys if head == k.rsplit(".", 1)[0]
             for m in [re.search(rf"\b{re.escape(k.rsplit('.', 1)[1])}\b", problem)] if m]
    return min(found)[1] if found else None


def train_overrides(workspace: Workspace, form: TrainForm) -> list[str]:
    """The `key=value` arguments of `qatune train` for this form: the run's folders, the data, the
    changed fields (in the form's order). Paths are checked to stay inside the workspace; a key the form
    does not have is refused (ConfigError naming each)."""
    off_form = _off_form(form.values)
    if off_form:
        raise ConfigError(off_form)
    return _overrides(workspace, form.run, form.sources, form.values)


def _off_form(values: dict[str, str]) -> list[str]:
    keys = {f["key"] for f in schema_fields()}
    return [f"{k}: not a field of the training form" for k in values if k not in keys]


def _overrides(workspace: Workspace, run: str, sources: list[str], values: dict[str, str]) -> list[str]:
    if not RUN_NAME.fullmatch(run or ""):
        raise PathRefused(f"run name {run!r}: use letters, digits, '-', '_' and '.' (up to 64)")
    for path in sources:
        workspace.resolve(path)
    model = values.get("model.name_or_path", DEFAULT_MODEL)
    if model not in embedded_models():
        workspace.resolve(model)  # a folder in the workspace (a hub id resolves inside it too)
    args = [f"model.name_or_path={model}"] if "model.name_or_path" in values else []
    args += [f"data.sources={_shown(list(sources))}", f"data.output_dir=prepared/{run}", f"train.output_dir=runs/{run}"]
    return args + [f"{k}={v}" for k, v in values.items() if k != "model.name_or_path"]


def check(workspace: Workspace, form: TrainForm) -> dict[str, Any]:
    """The verdict on the form: every problem, each its own message (the keys it has not and all the loader
    reports, field errors and rules across sections alike), by field where one is named, the others apart;
    the overrides and the command."""
    keys = [f["key"] for f in schema_fields()]
    problems = _off_form(form.values)
    overrides = _overrides(workspace, form.run, form.sources, {k: v for k, v in form.values.items() if k in keys})
    try:
        load_config(None, overrides)
    except ConfigError as exc:
        problems += exc.problems
    by_field: dict[str, list[str]] = {}
    other: list[str] = []
    for problem in problems:
        key = _problem_key(problem, keys)
        if key:
            by_field.setdefault(key, []).append(problem)
        else:
            other.append(problem)
    return {"ok": not problems, "problems": by_field, "other": other, "overrides": overrides,
            "command": "qatune " + shlex.join(command_line("train", overrides=overrides))}
