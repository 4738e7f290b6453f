"""The engines behind `qatune serve`: what the HTTP layer asks of a model, and the local one.

An engine knows the models it serves (the base and each LoRA adapter, with the chat template each
was trained on), turns messages into prompt tokens, and starts generations that report `Update`s
to the event loop. `LocalEngine` runs qatune's continuous batcher on transformers (CPU or GPU);
`serve.vllm_engine.VLLMEngine` hands the same requests to vLLM on a CUDA GPU.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from qatune.errors import QatuneError
from qatune.serve.batcher import ContinuousBatcher, QueueFull, Request, Sampling, Update

if TYPE_CHECKING:
    from qatune.config import QatuneConfig
    from qatune.data.templates import ChatTemplate

__all__ = ["Engine", "Generation", "LocalEngine", "QueueFull", "ServedModel", "Sampling", "Update", "load_engine"]


class ServeError(QatuneError):
    """The service cannot start as configured."""


@dataclass(frozen=True)
class ServedModel:
    """A model name clients can ask for: the base (adapter None) or one LoRA adapter on it."""

    name: str
    adapter: str | None
    template: "ChatTemplate"
    stop_ids: tuple[int, ...]


class Generation:
    """One running generation, read from the event loop: `await next_update()` until a finish reason."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cancel: Any) -> None:
        self._loop = loop
        self._updates: asyncio.Queue[Update] = asyncio.Queue()
        self._cancel = cancel

    def deliver(self, update: Update) -> None:
        """Called from any thread."""
        try:
            self._loop.call_soon_threadsafe(self._updates.put_nowait, update)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            pass

    async def next_update(self) -> Update:
        return await self._updates.get()

    def cancel(self) -> None:
        """Stop generating (client gone, timeout); harmless once finished."""
        self._cancel()


class Engine(Protocol):
    kind: str
    models: dict[str, ServedModel]
    default_model: str
    tokenizer: Any
    max_positions: int | None

    @property
    def queue_depth(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def generate(self, prompt_ids: list[int], sampling: Sampling, model: str) -> Generation:
        """Start a generation (raises QueueFull when the queue is full)."""
        ...


def chat_prompt(engine: Engine, model: str, messages: list[dict[str, str]]) -> list[int]:
    """Prompt tokens for a chat: the messages in the model's training template, plus the assistant header."""
    from qatune.infer.generation import prompt_ids

    return prompt_ids(engine.tokenizer, engine.models[model].template.source, messages)


class LocalEngine:
    """transformers model with its adapters, decoded by a ContinuousBatcher in its own thread."""

    kind = "hf"

    def __init__(self, batcher: ContinuousBatcher, models: dict[str, ServedModel], default_model: str,
                 max_positions: int | None) -> None:
        self.batcher = batcher
        self.tokenizer = batcher.tokenizer
        self.models = models
        self.default_model = default_model
        self.max_positions = max_positions

    @property
    def queue_depth(self) -> int:
        return self.batcher.waiting

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()

    def generate(self, prompt_ids: list[int], sampling: Sampling, model: str) -> Generation:
        served = self.models[model]
        holder: list[Request] = []
        generation = Generation(asyncio.get_running_loop(), lambda: holder[0].cancel())
        request = Request(prompt_ids, sampling, served.stop_ids, generation.deliver,
                          adapter=served.name if served.adapter else None)
        holder.append(request)
        self.batcher.submit(request)
        return generation


def served_models(config: "QatuneConfig") -> tuple[dict[str, ServedModel], str]:
    """The base model and each adapter, by the name clients use; and the default name."""
    from qatune.infer.generation import stop_token_ids
    from qatune.data.templates import resolve_template
    from qatune.infer.load import inference_tokenizer

    base_name = Path(config.model.name_or_path).name or config.model.name_or_path
    entries = [(base_name, None)] + list(config.serve.adapters.items())
    models: dict[str, ServedModel] = {}
    for name, adapter in entries:
        if name in models:
            raise ServeError(f"two served models are called {name!r}",
                             hint="give each adapter its own name: serve.adapters: {name: folder}")
        if adapter is not None and not Path(adapter).is_dir():
            raise ServeError(f"adapter {name!r}: {adapter} is not a folder",
                             hint="give the output folder of a lora or qlora training run")
        tokenizer = inference_tokenizer(config.model, config.model.name_or_path, adapter)
        template = resolve_template(tokenizer, config.data.template)
        models[name] = ServedModel(name, adapter, template, tuple(stop_token_ids(tokenizer, template.end_of_turn_id)))
    default = next(iter(config.serve.adapters), base_name)
    return models, default


def load_engine(config: "QatuneConfig", on_step: Any = None) -> Engine:
    """The engine `serve.engine` names, with the base model and every adapter loaded."""
    if config.serve.engine == "vllm":
        from qatune.serve.vllm_engine import VLLMEngine

        return VLLMEngine.from_config(config)
    import torch

    from qatune.infer.load import load_for_inference
    from qatune.models import attach_adapter, configured_dtype

    models, default = served_models(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = models[next(iter(models))]
    model, tokenizer, _ = load_for_inference(config.model, config.model.name_or_path, None, base.template.source,
                                             configured_dtype(config.model, device), device)
    for served in models.values():
        if served.adapter is not None:
            _check_lora(served)
            model = attach_adapter(model, served.adapter, config.model.name_or_path, name=served.name)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else base.stop_ids[0]
    prefixes = {served.name if served.adapter else None: template_prefix(tokenizer, served) for served in models.values()}
    batcher = ContinuousBatcher(model, tokenizer, config.serve.max_batch_size, config.serve.max_queue, pad_id, on_step,
                                prefixes)
    return LocalEngine(batcher, models, default, getattr(model.config, "max_position_embeddings", None))


def template_prefix(tokenizer: Any, served: ServedModel) -> list[int]:
    """The tokens every one-question prompt of this model starts with (system prompt and headers)."""
    from qatune.infer.generation import prompt_ids

    first, second = (prompt_ids(tokenizer, served.template.source, [{"role": "user", "content": q}]) for q in "ab")
    shared = next((i for i, (x, y) in enumerate(zip(first, second)) if x != y), min(len(first), len(second)))
    return first[:shared]


def _check_lora(served: ServedModel) -> None:
    import json

    from qatune.models import ADAPTER_FILE

    config_file = Path(served.adapter) / ADAPTER_FILE
    if not config_file.is_file():
        raise ServeError(f"adapter {served.name!r}: {served.adapter} has no {ADAPTER_FILE}",
                         hint="give the output folder of a lora or qlora training run")
    kind = json.loads(config_file.read_text(encoding="utf-8")).get("peft_type")
    if kind != "LORA":
        raise ServeError(f"adapter {served.name!r} is {kind}, but only LoRA adapters share one base in a batch",
                         hint=f"talk to it with `qatune chat --adapter {served.adapter}`, or retrain with method: lora")
