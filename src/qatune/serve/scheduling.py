"""What every qatune-run engine loop shares, whatever computes the tokens (transformers or llama.cpp).

`BatchLoop` owns the waiting queue and the engine thread: `submit` from any thread (bounded by
`max_queue`, requests whose client left dropped first), one loop that admits waiting requests up to
`max_batch_size` running ones and calls the engine's `_step`, a step that fails answers its
requests with an error and the service goes on, a thread that dies fails every request and
`alive` turns False (so /health says 503). `append_token` is the one rule for what text a request
may be sent after each token: stop tokens, stop strings cut off, and text that may still become a
stop string (or half of a multi-byte character) held back until it cannot.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qatune.serve.guard import ThrottledLog
from qatune.serve.protocol import EngineDown, Generation, QueueFull, Sampling, ServedModel, Update

if TYPE_CHECKING:
    import torch

log = logging.getLogger("qatune.serve")
GREEDY_BELOW = 1e-5  # a temperature this small is greedy (as in vLLM): dividing by it overflows


@dataclass
class Request:
    """One generation. `on_update` is called from the engine thread; it must return quickly."""

    prompt_ids: list[int]
    sampling: Sampling
    stop_ids: tuple[int, ...]
    on_update: Callable[[Update], None]
    adapter: str | None = None  # the served model's name when it is not the base
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the answer already sent
    generator: "torch.Generator | None" = None  # hf: the request's own seeded random numbers

    def cancel(self) -> None:
        self.cancelled.set()

    def finish(self, reason: str, error: str | None = None) -> None:
        """Tell the request it ended without a last token (cancelled, error)."""
        self.on_update(Update(finish_reason=reason, error=error, prompt_tokens=len(self.prompt_ids),
                              completion_tokens=len(self.generated)))


class BatchLoop:
    """The engine thread and its queue; a subclass computes the tokens in `_step` and frees rows in `_reset`."""

    tokenizer: Any  # the subclass's: renders answers (and prompts) as text

    def __init__(self, max_batch_size: int, max_queue: int, on_step: Callable[[int, int, int], None] | None) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.on_step = on_step  # (waiting, running, tokens generated this step) for metrics
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()
        self._running: list[Request] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._active = 0  # submitted and not yet finished: what max_queue bounds
        self.step_failures = ThrottledLog(log)  # a step that fails for every batch logs one traceback a minute

    # -- what a subclass provides -----------------------------------------------------------------
    def _step(self, admitted: list[Request]) -> int | None:
        """Take the admitted requests into the running batch and advance it: the tokens generated, None when
        there was nothing to run."""
        raise NotImplementedError

    def _reset(self) -> None:
        """Forget every running row (after a failed step, or when the thread dies)."""
        raise NotImplementedError

    def _prepare(self, request: Request) -> None:
        """Per-request setup at submit time (any thread)."""

    def _admit(self) -> list[Request]:
        """Waiting requests that join the running batch now (called holding the lock)."""
        room = self.max_batch_size - len(self._running)
        return [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]

    # -- public, any thread -------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def active(self) -> int:
        """Requests submitted and not finished (waiting, being admitted or running), less those that wait
        after their client left (the next submit drops them)."""
        with self._wake:
            return self._active - sum(1 for r in self._waiting if r.cancelled.is_set())

    @property
    def alive(self) -> bool:
        """The engine thread runs (False before `start`, after `stop` and once it died)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, request: Request) -> None:
        """Queue a request; QueueFull when `max_queue` requests are already submitted and not finished."""
        with self._wake:
            if self._thread is not None and not self.alive:
                raise EngineDown("the engine thread has stopped")
            if self._active >= self.max_queue:  # requests whose client left go first
                for gone in [r for r in self._waiting if r.cancelled.is_set()]:
                    self._waiting.remove(gone)
                    gone.finish("cancelled")
            if self._active >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting or running")
            self._count(request)
            self._prepare(request)
            self._waiting.append(request)
            self._wake.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="qatune-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _count(self, request: Request) -> None:
        """Count `request` as active until its final update (with a finish reason) is sent."""
        tell, done = request.on_update, threading.Event()

        def on_update(update: Update) -> None:
            if update.finish_reason and not done.is_set():
                done.set()
                with self._wake:
                    self._active -= 1
            tell(update)

        request.on_update = on_update
        self._active += 1

    # -- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._steps()
        except BaseException as exc:  # the thread dies: /health says so, and no request waits for it
            self.step_failures.error("the engine thread died", exc, always=True)
            with self._wake:
                self._stopping = True
                pending, self._waiting = list(self._waiting) + self._running, deque()
            for r in {id(r): r for r in pending}.values():
                r.finish("error", "the engine thread died; the server must restart")
            self._reset()

    def _steps(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._running and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
                admitted = self._admit()
            admitted = [r for r in admitted if not self._dropped_while_waiting(r)]
            try:
                stepped = self._step(admitted)
            except Exception as exc:  # one bad step must not take the service down
                self.step_failures.error("generation step failed", exc)
                for r in {id(r): r for r in self._running + admitted}.values():  # admitted may be running
                    r.finish("error", f"{type(exc).__name__}: {exc}"[:300])
                self._reset()
                stepped = 0
            else:
                if stepped is None:
                    continue  # every admitted request had been cancelled
            if self.on_step is not None:
                self.on_step(len(self._waiting), len(self._running), stepped)
        for r in list(self._waiting) + self._running:
            r.finish("cancelled")

    def _dropped_while_waiting(self, request: Request) -> bool:
        if request.cancelled.is_set():
            request.finish("cancelled")
            return True
        return False


class BatchedEngine:
    """The Engine protocol around a BatchLoop: what the hf and llamacpp engines share."""

    kind: str

    def __init__(self, batcher: BatchLoop, models: dict[str, ServedModel], default_model: str,
                 max_positions: int | None) -> None:
        self.batcher = batcher
        self.tokenizer = batcher.tokenizer
        self.models = models
        self.default_model = default_model
        self.max_positions = max_positions

    @property
    def queue_depth(self) -> int:
        return self.batcher.waiting

    @property
    def in_flight(self) -> int:
        return self.batcher.active

    @property
    def alive(self) -> bool:
        return self.batcher.alive

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


def append_token(request: Request, token: int, tokenizer: Any) -> str | None:
    """Add one token to a request and send it what it may see of its answer; the finish reason once it is done."""
    if request.cancelled.is_set():
        request.finish("cancelled")
        return "cancelled"
    request.generated.append(token)
    stopped = token in request.stop_ids
    text = tokenizer.decode(request.generated[:-1] if stopped else request.generated, skip_special_tokens=True)
    stops = request.sampling.stop
    reason = "stop" if stopped else None
    cut = first_stop(text, stops)
    if cut is not None:
        text, reason = text[:cut], "stop"
    if reason is None and len(request.generated) >= request.sampling.max_new_tokens:
        reason = "length"
    # Text that may still become a stop string, or half of a multi-byte character, waits.
    ready = text if reason else text[:len(text) - held_back(text, stops)]
    if reason == "length":
        ready = ready.rstrip("\ufffd")
    delta, request.emitted = ready[request.emitted:], max(request.emitted, len(ready))
    if delta or reason:
        request.on_update(Update(delta, reason, len(request.prompt_ids), len(request.generated)))
    return reason


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` to hold back: half of a multi-byte character, or a possible start of a stop string."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        hold = max([hold] + [n for n in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:n])])
    return hold
