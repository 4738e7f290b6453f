"""What the HTTP layer asks of an engine, and the values that cross between them.

Every engine (`hf_engine.LocalEngine`, `llamacpp_engine.LlamaCppEngine`, `vllm_engine.VLLMEngine`) imports
these and nothing of the others, so engines never import each other; `serve.recipe` is the one place that picks an engine.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from qatune.errors import QatuneError

if TYPE_CHECKING:
    from qatune.data.templates import ChatTemplate

__all__ = ["Engine", "EngineDown", "Generation", "QueueFull", "Sampling", "ServeError", "ServedModel", "Update", "chat_prompt",
           "template_prefix"]


class ServeError(QatuneError):
    """The service cannot start as configured."""


class QueueFull(Exception):
    """More requests are waiting or running than the engine accepts."""


class EngineDown(Exception):
    """The engine stopped or died: no request can be answered until the service restarts."""


@dataclass
class Sampling:
    """One request's decoding, checked by the app (defaults from serve.decoding)."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Update:
    """What a request learns after a step: new text, and at the end why it finished."""

    text: str = ""
    finish_reason: str | None = None  # stop | length | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


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
    def queue_depth(self) -> int:
        """Requests waiting for a place in the running batch."""
        ...

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished: what serve.max_queue bounds."""
        ...

    @property
    def alive(self) -> bool:
        """The engine can still answer (False when its thread or process died)."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def generate(self, prompt_ids: list[int], sampling: Sampling, model: str) -> Generation:
        """Start a generation (raises QueueFull when the queue is full, EngineDown when the engine died)."""
        ...


def chat_prompt(engine: Engine, model: str, messages: list[dict[str, str]]) -> list[int]:
    """Prompt tokens for a chat: the messages in the model's training template, plus the assistant header."""
    from qatune.infer.generation import prompt_ids

    return prompt_ids(engine.tokenizer, engine.models[model].template.source, messages)


def template_prefix(tokenizer: Any, served: ServedModel) -> list[int]:
    """The tokens every one-question prompt of this model starts with (system prompt and headers): what an
    engine computes once and shares between requests."""
    from qatune.infer.generation import prompt_ids

    first, second = (prompt_ids(tokenizer, served.template.source, [{"role": "user", "content": q}]) for q in "ab")
    shared = next((i for i, (x, y) in enumerate(zip(first, second)) if x != y), min(len(first), len(second)))
    return first[:shared]
