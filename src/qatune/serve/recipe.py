"""`qatune serve` as a recipe: plan (checks, touches nothing) -> setup (loads the engine) -> run (HTTP).

`plan` picks the engine (`serve.engine: auto`: llamacpp on a CPU where llama-cpp-python is
installed, vllm on a CUDA GPU where vLLM is, else hf) and refuses everything it can before a
weight is read: two models of one name, an adapter folder that is missing, not an adapter or not
LoRA (only LoRA adapters share one base in a batch), vLLM without its package or a CUDA GPU,
llamacpp without llama-cpp-python. `setup` prints the engine and why, loads each model's
tokenizer and chat template and then the engine (this module is the only one that imports an
engine, so engines never import each other); for llamacpp it finds or converts each model's GGUF
first, and under `auto` a model the GGUF writer cannot express is served by hf instead, saying so.
`run` starts the engine and serves until Ctrl-C.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune.serve.protocol import Engine, ServedModel, ServeError

if TYPE_CHECKING:
    from qatune.config import QatuneConfig
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
    engine: str = "hf"  # hf | llamacpp | vllm: serve.engine, with auto decided
    engine_reason: str = "serve.engine hf"  # why, as printed

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
    if engine == "vllm":
        from qatune.serve.vllm_engine import check_vllm

        check_vllm(runtime.device)
    if engine == "llamacpp":
        from qatune.serve.llamacpp_engine import check_llamacpp

        check_llamacpp(config.serve.max_batch_size)
    locate_model(config.model)  # a model that is nowhere is reported before any adapter
    base_name = Path(config.model.name_or_path).name or config.model.name_or_path
    models = [PlannedModel(base_name, None, None)]
    for name, folder in config.serve.adapters.items():
        if any(m.name == name for m in models):
            raise ServeError(f"two served models are called {name!r}",
                             hint="give each adapter its own name: serve.adapters: {name: folder}")
        models.append(PlannedModel(name, folder, _lora_adapter(name, folder)))
    return ServePlan(config, runtime, tuple(models), next(iter(config.serve.adapters), base_name), engine, reason)


def pick_engine(asked: str, device: str) -> tuple[str, str]:
    """The engine serve.engine names, with `auto` decided from the device and what is installed; and why."""
    import importlib.util

    if asked != "auto":
        return asked, f"serve.engine {asked}"
    if device == "cuda":
        if importlib.util.find_spec("vllm") is not None:
            return "vllm", "serve.engine auto: a CUDA GPU, and vLLM is installed"
        return "hf", "serve.engine auto: a CUDA GPU, and vLLM is not installed (pip install 'qatune[vllm]')"
    from qatune.serve.llamacpp_api import installed

    if installed():
        return "llamacpp", "serve.engine auto: a CPU, and llama-cpp-python is installed"
    return "hf", ("serve.engine auto: a CPU, and llama-cpp-python is not installed (pip install 'qatune[llamacpp]' "
                  "answers several times faster here)")


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

    config, metrics = plan.config, ServiceMetrics()
    models, tokenizer = _served_models(plan)
    plan.runtime.console.print(f"Engine {plan.engine} ({plan.engine_reason})", highlight=False, soft_wrap=True)
    ggufs = _gguf_files(plan) if plan.engine == "llamacpp" else None
    engine: Engine
    if ggufs is not None:
        from qatune.serve.llamacpp_engine import LlamaCppEngine

        engine = LlamaCppEngine.load(config.serve, models, plan.default_model, tokenizer, ggufs, metrics.on_step)
    elif plan.engine == "vllm":
        from qatune.serve.vllm_engine import VLLMEngine

        ranks = [m.adapter.rank for m in plan.models if m.adapter is not None]
        engine = VLLMEngine.load(config.model, config.serve, models, plan.default_model, tokenizer, ranks,
                                 plan.runtime.dtype(config.model))
    else:
        from qatune.serve.hf_engine import LocalEngine

        engine = LocalEngine.load(config.model, config.serve, models, plan.default_model, plan.runtime, tokenizer,
                                  metrics.on_step)
    return ServeComponents(engine, metrics)


def _gguf_files(plan: ServePlan) -> dict[str, Path] | None:
    """Each served model's GGUF file, by name (converted once where it is a Hugging Face model or an adapter);
    None where the GGUF writer cannot express the model and serve.engine is auto (hf serves it then)."""
    from qatune.errors import GGUFExportError
    from qatune.serve.gguf_files import converted, model_gguf

    config, console = plan.config, plan.runtime.console
    qtype = config.serve.llamacpp_gguf
    try:
        files = {plan.models[0].name: model_gguf(config.model, qtype, console)}
        for planned in plan.models[1:]:  # each adapter merged into its own GGUF
            files[planned.name] = converted(config.model, planned.folder, qtype, console)
    except GGUFExportError as exc:
        if config.serve.engine != "auto":
            raise ServeError(f"llama.cpp cannot serve this model: {exc.message}",
                             hint=f"{exc.hint}; or use serve.engine=hf" if exc.hint else "use serve.engine=hf") from None
        console.print(f"Engine hf instead: llama.cpp cannot serve this model ({exc.message})", highlight=False,
                      soft_wrap=True)
        return None
    for name, path in files.items():
        console.print(f"  {name}: {path}", highlight=False, soft_wrap=True)
    return files


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
