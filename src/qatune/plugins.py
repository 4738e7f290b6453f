"""The plug-in table: start reading here.

Every training stage, serving engine, record format and distributed back-end is one module (or an
object in one), named below by
`module:attribute` and imported only when used (so `qatune --help` and config errors stay fast).
The config schema's choices (`train.stage`, `serve.engine`, `data.sources[].format`,
`train.distributed`), the CLI's
choices and the config reference are derived from this table; nothing else spells a plug-in's
name. Adding one is a new module plus a line here.

What a plug-in of each kind declares:
- stage (`qatune.train.stages.base.TrainingStage`): its config section, the rows it trains on
  (`make_rows`, handed to the data stage), `validate(config) -> list[Problem]`, `build_trainer`,
  and what it adds to the train report.
- engine (`qatune.serve.engine_plugin.EnginePlugin`): `validate`, `check_here(runtime)`, how well it fits
  this machine for `serve.engine: auto` (`auto_fit`), and one `load(EngineRequest) -> Engine` for all.
- format (`qatune.data.formats.RecordFormat`): its fields, its converter, how `auto` recognises it.
  A stage whose records have a format of their own (kto's labelled answers) declares it in its module.
- distributed (`qatune.train.distributed.DistributedBackend`): `validate`, its TrainingArguments.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

PLUGINS: dict[str, dict[str, str]] = {
    "stage": {
        "sft": "qatune.train.stages.sft:PLUGIN",
        "pt": "qatune.train.stages.pt:PLUGIN",
        "distill": "qatune.train.stages.distill:PLUGIN",
        "dpo": "qatune.train.stages.dpo:PLUGIN",
        "kto": "qatune.train.stages.kto:PLUGIN",
        "orpo": "qatune.train.stages.orpo:PLUGIN",
        "simpo": "qatune.train.stages.simpo:PLUGIN",
    },
    "engine": {
        "hf": "qatune.serve.hf_engine:PLUGIN",
        "llamacpp": "qatune.serve.llamacpp_engine:PLUGIN",
        "vllm": "qatune.serve.vllm_engine:PLUGIN",
    },
    # Record formats of data sources; `format: auto` tries them in this order (pairs and labelled answers first:
    # their records also hold a conversation's fields).
    "format": {
        "preference": "qatune.data.formats:PREFERENCE",
        "kto": "qatune.train.stages.kto:RECORD_FORMAT",
        "sharegpt": "qatune.data.formats:SHAREGPT",
        "messages": "qatune.data.formats:MESSAGES",
        "alpaca": "qatune.data.formats:ALPACA",
        "qa": "qatune.data.formats:QA",
        "input_target": "qatune.data.formats:INPUT_TARGET",
        "text": "qatune.data.formats:TEXT",
    },
    "distributed": {
        "ddp": "qatune.train.distributed:DDP",
        "fsdp": "qatune.train.distributed:FSDP",
        "deepspeed_zero2": "qatune.train.distributed:ZERO2",
        "deepspeed_zero3": "qatune.train.distributed:ZERO3",
        "deepspeed_zero3_offload": "qatune.train.distributed:ZERO3_OFFLOAD",
    },
}


def names(kind: str) -> tuple[str, ...]:
    """The plug-ins of `kind` in table order (no import)."""
    return tuple(PLUGINS[kind])


@cache
def load(kind: str, name: str) -> Any:
    """The plug-in object registered as `name` of `kind` (imported on first use)."""
    try:
        target = PLUGINS[kind][name]
    except KeyError:
        raise KeyError(f"no {kind} plug-in {name!r}; known: {', '.join(PLUGINS.get(kind, {}))}") from None
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def loaded(kind: str) -> dict[str, Any]:
    """Every plug-in of `kind`, imported, by name."""
    return {name: load(kind, name) for name in PLUGINS[kind]}
