"""What a serving engine declares as a plug-in (`qatune.plugins`, kind "engine"), and what it loads from.

Each engine module exports `PLUGIN`, an `EnginePlugin`: `serve.recipe` finds it by the name
`serve.engine` gives (or `auto` picks by asking every plug-in's `auto_fit`), checks the config
(`validate`) and this machine (`check_here`), and calls `load` with one `EngineRequest` whatever
the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from qatune.serve.protocol import ServeError

if TYPE_CHECKING:
    from qatune.config import ModelConfig, QatuneConfig, ServeConfig
    from qatune.errors import Problem
    from qatune.models import AdapterInfo
    from qatune.runtime import Runtime
    from qatune.serve.protocol import Engine, ServedModel


@dataclass(frozen=True)
class EngineRequest:
    """Everything an engine loads from: the base model and every adapter, served under `serve`'s limits."""

    model: "ModelConfig"
    serve: "ServeConfig"
    runtime: "Runtime"  # device, dtype and the console that tells the user what happens
    models: dict[str, "ServedModel"]  # by the name clients use: the base first, then serve.adapters in order
    default_model: str  # what /answer and requests without `model` get
    adapters: dict[str, "AdapterInfo"]  # each adapter's settings (rank, ...), by the name clients use
    tokenizer: Any  # the base's, loaded with its template by the caller
    on_step: Callable[[int, int, int], None]  # (waiting, running, tokens generated): the service's metrics


@dataclass(frozen=True)
class AutoFit:
    """How `serve.engine: auto` sees an engine on one device."""

    rank: int  # auto takes the ready engine of the lowest rank
    ready: bool  # it can run here now (its package is installed)
    why: str  # told after "serve.engine auto: a CPU, and ": why it serves here, or why not (with the fix)


class ModelUnfit(ServeError):
    """The engine cannot serve this model (under `serve.engine: auto` the next ready engine serves it)."""

    def __init__(self, reason: str, detail: str, hint: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}", hint=hint)
        self.reason, self.detail = reason, detail


@runtime_checkable
class EnginePlugin(Protocol):
    name: str  # serve.engine's value for it, and its engines' `kind`

    def validate(self, config: "QatuneConfig") -> list["Problem"]:
        """What the config alone (no disk, no hardware) says against serving it on this engine."""
        ...

    def check_here(self, runtime: "Runtime") -> None:
        """ServeError (saying what to install or change) where this machine cannot run the engine."""
        ...

    def auto_fit(self, device: str) -> AutoFit | None:
        """Where `serve.engine: auto` puts this engine on `device`; None: auto never picks it there."""
        ...

    def load(self, request: EngineRequest) -> "Engine":
        """The engine with every model of the request loaded, not started; ModelUnfit where it cannot serve one."""
        ...

