"""`qatune serve` as a recipe: plan (checks, touches nothing) -> setup (loads the engine) -> run (HTTP).

`plan` picks the engine plug-in (`qatune.plugins`, kind "engine"; under `serve.engine: auto` the
ready one that fits the device best, by each plug-in's `auto_fit`: llamacpp on a CPU where
llama-cpp-python is installed, vllm on a CUDA GPU where vLLM is, else hf) and refuses everything it
can before a weight is read: the engine's config rules (`validate`) and what this machine lacks for
it (`check_here`), two models of one name, an adapter folder that is missing, not an adapter or not
LoRA (only LoRA adapters share one base in a batch). `setup` prints the engine and why, loads each
model's tokenizer and chat template and then the engine through its plug-in's `load`; under `auto`
a model the engine cannot serve (llamacpp: one the GGUF writer cannot express) is served by the next
ready engine instead, saying so. `run` starts the engine and serves until Ctrl-C.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune import plugins
from qatune.serve.engine_plugin import AutoFit, EngineRequest, ModelUnfit
from qatune.serve.protocol import Engine, ServedModel, ServeError

if TYPE_CHECKING:
    from qatune.config import QatuneConfig
    from qatune.errors import Problem
    from qatune.models import AdapterInfo
    from qatune.runtime import Runtime
    from qatune.serve.metrics import ServiceMetrics

ADAPTER_HINT = "give the output folder of a lora or qlora training run"


@dataclass(frozen=True)
class PlannedModel:
    """A model name clients will ask for: the base (adapter None) or a LoRA adapter on it."""

    name: str
    folder: str | None  # as serve.adapters gives it; what /v1/models shows
    adapter: "AdapterInfo | None"


@dataclass(frozen=True)
class ServePlan:
    config: "QatuneConfig"
    runtime: "Runtime"
    models: tuple[PlannedModel, ...]  # the base first, then serve.adapters in their order
    default_model: str  # the first adapter, else the base: what /answer and requests without `model` get
    engine: str = "hf"  # the engine plug-in's name: serve.engine, with auto decided
    engine_reason: str = "serve.engine hf"  # why, as printed
    fallbacks: tuple[str, ...] = ()  # under auto: the ready engines that serve a model `engine` cannot, in order

    @property
    def url(self) -> str:
        return f"http://{self.config.serve.host}:{self.config.serve.port}"


@dataclass(frozen=True)
class ServeComponents:
    engine: "Engine"  # loaded, not started
    metrics: "ServiceMetrics"  # the engine reports its steps here


@dataclass(frozen=True)
class ServeResult:
    """What was served, once the server stopped (Ctrl-C or SIGTERM)."""

    url: str
    engine: str
    models: tuple[str, ...]


def plan(config: "QatuneConfig", runtime: "Runtime") -> ServePlan:
    """Every check that needs no weights; reads adapter configs, writes and loads nothing."""
    from qatune.models import locate_model

    engine, reason = pick_engine(config.serve.engine, runtime.device)
    chosen = plugins.load("engine", engine)
    chosen.check_here(runtime)
    _refuse(chosen.validate(config))
    locate_model(config.model)  # a model that is nowhere is reported before any adapter
    base_name = Path(config.model.name_or_path).name or config.model.name_or_path
    models = [PlannedModel(base_name, None, None)]
    for name, folder in config.serve.adapters.items():
        if any(m.name == name for m in models):
            raise ServeError(f"two served models are called {name!r}",
                             hint="give each adapter its own name: serve.adapters: {name: folder}")
        models.append(PlannedModel(name, folder, _lora_adapter(name, folder)))
    ready = [name for name, fit in _auto_fits(runtime.device) if fit.ready] if config.serve.engine == "auto" else []
    fallbacks = tuple(ready[ready.index(engine) + 1:]) if engine in ready else ()
    return ServePlan(config, runtime, tuple(models), next(iter(config.serve.adapters), base_name), engine, reason,
                     fallbacks)


def pick_engine(asked: str, device: str) -> tuple[str, str]:
    """The engine serve.engine names, with `auto` decided by asking each plug-in how it fits `device`; and why."""
    if asked != "auto":
        return asked, f"serve.engine {asked}"
    fits = _auto_fits(device)
    chosen = next(name for name, fit in fits if fit.ready)
    where = "a CUDA GPU" if device == "cuda" else "a CPU"
    return chosen, f"serve.engine auto: {where}, and {fits[0][1].why}"  # the best fit: why it serves, or why not


def _auto_fits(device: str) -> list[tuple[str, "AutoFit"]]:
    """The engines `serve.engine: auto` may take on `device`, best first, ready here or not."""
    fits = [(name, plugin.auto_fit(device)) for name, plugin in plugins.loaded("engine").items()]
    return sorted(((name, fit) for name, fit in fits if fit is not None), key=lambda pair: pair[1].rank)


def _refuse(problems: list["Problem"]) -> None:
    """One ServeError for the problems the engine's `validate` found."""
    if problems:
        raise ServeError("; ".join(f"{p.key}: {p.message}" for p in problems), hint="; ".join(p.fix for p in problems))


def _lora_adapter(name: str, folder: str) -> "AdapterInfo":
    from qatune.models import ADAPTER_FILE, read_adapter

    if not Path(folder).is_dir():
        raise ServeError(f"adapter {name!r}: {folder} is not a folder", hint=ADAPTER_HINT)
    adapter = read_adapter(folder)
    if adapter is None:
        raise ServeError(f"adapter {name!r}: {folder} has no {ADAPTER_FILE}", hint=ADAPTER_HINT)
    if not adapter.is_lora:
        raise ServeError(f"adapter {name!r} is {adapter.kind}, but only LoRA adapters share one base in a batch",
                         hint=f"talk to it with `qatune chat --adapter {folder}`, or retrain with method: lora")
    return adapter


def setup(plan: ServePlan) -> ServeComponents:
    """Each model's tokenizer and template, then the engine with the base model and every adapter loaded."""
    from qatune.serve.metrics import ServiceMetrics

    config, metrics, console = plan.config, ServiceMetrics(), plan.runtime.console
    models, tokenizer = _served_models(plan)
    request = EngineRequest(config.model, config.serve, plan.runtime, models, plan.default_model,
                            {m.name: m.adapter for m in plan.models if m.adapter is not None}, tokenizer,
                            metrics.on_step)
    console.print(f"Engine {plan.engine} ({plan.engine_reason})", highlight=False, soft_wrap=True)
    engines = [plan.engine, *plan.fallbacks]
    while True:
        engine = engines.pop(0)
        try:
            return ServeComponents(plugins.load("engine", engine).load(request), metrics)
        except ModelUnfit as exc:
            if not engines:
                raise
            console.print(f"Engine {engines[0]} instead: {exc.reason} ({exc.detail})", highlight=False, soft_wrap=True)


def _served_models(plan: ServePlan) -> tuple[dict[str, ServedModel], Any]:
    """Each model by the name clients use, with its training template and stop tokens; and the base tokenizer."""
    from qatune.data.templates import resolve_template
    from qatune.infer.generation import stop_token_ids
    from qatune.infer.load import inference_tokenizer

    config = plan.config

    def load(planned: PlannedModel) -> tuple[ServedModel, Any]:
        tokenizer = inference_tokenizer(config.model, planned.folder)
        template = resolve_template(tokenizer, config.data.template)
        stops = tuple(stop_token_ids(tokenizer, template.end_of_turn_id))
        return ServedModel(planned.name, planned.folder, template, stops), tokenizer

    base, base_tokenizer = load(plan.models[0])
    models = {base.name: base}
    for planned in plan.models[1:]:
        if planned.adapter is not None and planned.adapter.has_tokenizer:
            models[planned.name] = load(planned)[0]
        else:  # it answers with the base's tokenizer, so with the base's template
            models[planned.name] = replace(base, name=planned.name, adapter=planned.folder)
    return models, base_tokenizer


def run(plan: ServePlan, components: ServeComponents) -> ServeResult:
    """Start the engine and serve on serve.host:serve.port until Ctrl-C (the app stops the engine)."""
    import uvicorn

    from qatune.serve.app import create_app
    from qatune.serve.connections import uvicorn_options

    engine, cfg = components.engine, plan.config.serve
    engine.start()
    app = create_app(engine, cfg, components.metrics)
    plan.runtime.console.print(f"Serving {', '.join(engine.models)} (engine {engine.kind}) on {plan.url}  "
                               f"chat page: /  API: /v1/chat/completions  metrics: /metrics",
                               highlight=False, soft_wrap=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, timeout_graceful_shutdown=5, **uvicorn_options(cfg))
    return ServeResult(plan.url, engine.kind, tuple(engine.models))


def serve(config: "QatuneConfig", runtime: "Runtime | None" = None) -> ServeResult:
    """Check, load the engine with every adapter, then serve until Ctrl-C."""
    from qatune.recipe import execute
    from qatune.runtime import Runtime

    return execute(sys.modules[__name__], plan(config, runtime or Runtime.detect()))
