"""Continuous batching: concurrent requests share each decoding step of one model.

One engine thread owns the model. Each loop it admits waiting requests (up to `max_batch_size`
rows), runs their prompts through the model together (prefill), merges their key/value cache
into the running batch, then takes one decoding step for every running row. A row that finishes
(stop token, stop string, max_tokens, cancelled) leaves at once and its slot is free at the
next step, so a short answer never waits for a long one and a new request never waits for a
whole batch to end.

Rows of different lengths share one left-padded cache with an attention mask and explicit
position ids, the layout `generate` uses for a padded batch, so each row is computed as if alone.

Prefix cache: the tokens every prompt of a model starts with (the chat template's system prompt
and header, e.g. SmolLM's default system prompt: about 30 tokens) are run once per model; a prompt
that starts with them, token for token, is prefilled from its first own token. On a CPU, where
prefill is compute-bound, that removes most of the cost of admitting a short question.
LoRA adapters are chosen per row (peft's mixed-adapter batches): every adapter is served on one
shared base model.

transformers' own continuous batching manager takes no per-request adapter, hence this loop.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qatune.serve.guard import ThrottledLog
from qatune.serve.protocol import EngineDown, QueueFull, Sampling, Update

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("qatune.serve")
STEP_FAILED = ThrottledLog(log)  # a step that fails for every batch logs one traceback a minute
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
GREEDY_BELOW = 1e-5  # a temperature this small is greedy (as in vLLM): dividing by it overflows


@dataclass
class Request:
    """One generation. `on_update` is called from the engine thread; it must return quickly."""

    prompt_ids: list[int]
    sampling: Sampling
    stop_ids: tuple[int, ...]
    on_update: Callable[[Update], None]
    adapter: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the answer already sent
    generator: "torch.Generator | None" = None

    def cancel(self) -> None:
        self.cancelled.set()


class ContinuousBatcher:
    """The engine: `submit` requests from any thread; `start` runs the loop in its own thread."""

    def __init__(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", max_batch_size: int = 16,
                 max_queue: int = 64, pad_id: int = 0, on_step: Callable[[int, int, int], None] | None = None,
                 prefixes: dict[str | None, list[int]] | None = None):
        self.model = model
        self.prefixes = {adapter: ids for adapter, ids in (prefixes or {}).items() if ids}  # by adapter (None: base)
        self._prefix_cache: dict[str | None, list[tuple["torch.Tensor", "torch.Tensor"]]] = {}
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.pad_id = pad_id
        self.on_step = on_step  # (waiting, running, tokens generated this step) for metrics
        self.mixed_adapters = hasattr(model, "peft_config")
        from qatune.compat.transformers import cache_keyword

        self.cache_keyword = cache_keyword(model)  # the forward's KV-cache argument in this transformers
        self.device = next(model.parameters()).device
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()
        self._running: list[Request] = []
        self._cache: Any = None
        self._mask: "torch.Tensor | None" = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._active = 0  # submitted and not yet finished: what max_queue bounds

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
                    gone.on_update(Update(finish_reason="cancelled", prompt_tokens=len(gone.prompt_ids)))
            if self._active >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting or running")
            self._count(request)
            if request.sampling.seed is not None:
                import torch

                request.generator = torch.Generator(device=self.device).manual_seed(request.sampling.seed)
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
            STEP_FAILED.last = -STEP_FAILED.interval  # this one is always told
            STEP_FAILED.error("the engine thread died", exc)
            with self._wake:
                self._stopping = True
                pending, self._waiting = list(self._waiting) + self._running, deque()
            for r in {id(r): r for r in pending}.values():
                r.on_update(Update(finish_reason="error", error="the engine thread died; the server must restart",
                                   prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.generated)))
            self._running, self._cache, self._mask = [], None, None

    def _steps(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._waiting and not self._running and not self._stopping:
                        self._wake.wait()
                    if self._stopping:
                        break
                    room = self.max_batch_size - len(self._running)
                    admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                admitted = [r for r in admitted if not self._dropped_while_waiting(r)]
                stepped = len(admitted) or len(self._running)  # rows that get a token in this step
                try:
                    if admitted:
                        self._prefill(admitted)
                    elif self._running:
                        self._decode()
                    else:
                        continue  # every admitted request had been cancelled
                except Exception as exc:  # one bad step must not take the service down
                    STEP_FAILED.error("generation step failed", exc)
                    for r in {id(r): r for r in self._running + admitted}.values():  # admitted may be running
                        r.on_update(Update(finish_reason="error", error=f"{type(exc).__name__}: {exc}"[:300],
                                           prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.generated)))
                    self._running, self._cache, self._mask = [], None, None
                if self.on_step is not None:
                    self.on_step(len(self._waiting), len(self._running), stepped)
        for r in list(self._waiting) + self._running:
            r.on_update(Update(finish_reason="cancelled", prompt_tokens=len(r.prompt_ids)))

    def _dropped_while_waiting(self, request: Request) -> bool:
        if request.cancelled.is_set():
            request.on_update(Update(finish_reason="cancelled", prompt_tokens=len(request.prompt_ids)))
            return True
        return False

    def _forward(self, input_ids: "torch.Tensor", mask: "torch.Tensor", positions: "torch.Tensor", cache: Any,
                 rows: list[Request]) -> "torch.Tensor":
        """Logits of the last position of each row."""
        extra = {"adapter_names": [r.adapter or BASE_ADAPTER for r in rows]} if self.mixed_adapters else {}
        extra[self.cache_keyword] = cache
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **extra)
        return out.logits[:, -1, :].float()

    def _prefill(self, admitted: list[Request]) -> None:
        """Run the admitted prompts (those starting with their model's cached prefix, from after it)."""
        hits = [r for r in admitted if self._prefix_of(r)]
        lengths = {len(self._prefix_of(r)) for r in hits}
        if len(lengths) > 1:  # prefixes of one chat template have one length; anything else runs whole
            hits = []
        rest = [r for r in admitted if all(r is not hit for hit in hits)]
        if hits:
            self._prefill_group(hits, lengths.pop())
        if rest:
            self._prefill_group(rest, 0)

    def _prefix_of(self, request: Request) -> list[int]:
        prefix = self.prefixes.get(request.adapter, [])
        return prefix if len(request.prompt_ids) > len(prefix) and request.prompt_ids[:len(prefix)] == prefix else []

    def _prefill_group(self, rows: list[Request], cached: int) -> None:
        import torch
        from transformers import DynamicCache

        own = [r.prompt_ids[cached:] for r in rows]
        longest = max(len(ids) for ids in own)
        ids = torch.tensor([[self.pad_id] * (longest - len(i)) + i for i in own], device=self.device)
        mask = torch.tensor([[1] * cached + [0] * (longest - len(i)) + [1] * len(i) for i in own], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, cached:]
        cache = DynamicCache()
        if cached:  # the prefix's keys and values, one row per request (each its own model's)
            layers = [self._cached_prefix(r.adapter) for r in rows]
            for index in range(len(layers[0])):
                cache.update(torch.cat([row[index][0] for row in layers]),
                             torch.cat([row[index][1] for row in layers]), index)
        logits = self._forward(ids, mask, positions, cache, rows)
        self._merge(rows, cache, mask)
        self._advance(rows, logits, offset=len(self._running) - len(rows))

    def _cached_prefix(self, adapter: str | None) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
        if adapter not in self._prefix_cache:
            import torch
            from transformers import DynamicCache

            prefix = self.prefixes[adapter]
            cache = DynamicCache()
            ids = torch.tensor([prefix], device=self.device)
            probe = Request(prefix, Sampling(1), (), lambda update: None, adapter=adapter)
            self._forward(ids, torch.ones_like(ids), torch.arange(len(prefix), device=self.device)[None], cache,
                          [probe])
            self._prefix_cache[adapter] = [(layer.keys, layer.values) for layer in cache.layers]
        return self._prefix_cache[adapter]

    def _decode(self) -> None:
        import torch

        rows = self._running
        ids = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        positions = self._mask.sum(-1, keepdim=True) - 1
        logits = self._forward(ids, self._mask, positions, self._cache, rows)
        self._advance(rows, logits, offset=0)

    def _merge(self, admitted: list[Request], cache: Any, mask: "torch.Tensor") -> None:
        """Append the admitted rows to the running batch, left-padding whichever cache is shorter."""
        import torch
        import torch.nn.functional as F

        if not self._running:
            self._running, self._cache, self._mask = list(admitted), cache, mask
            return
        length = max(self._mask.shape[1], mask.shape[1])

        def pad(tensor: "torch.Tensor", dim_from_end: int) -> "torch.Tensor":
            missing = length - tensor.shape[-dim_from_end]
            return F.pad(tensor, (0, 0) * (dim_from_end - 1) + (missing, 0)) if missing else tensor

        for running, new in zip(self._cache.layers, cache.layers):
            running.keys = torch.cat([pad(running.keys, 2), pad(new.keys, 2)])
            running.values = torch.cat([pad(running.values, 2), pad(new.values, 2)])
        self._mask = torch.cat([pad(self._mask, 1), pad(mask, 1)])
        self._running += admitted

    def _advance(self, rows: list[Request], logits: "torch.Tensor", offset: int) -> None:
        """Pick each row's next token, tell its request, and drop the rows that finished."""
        tokens = self._next_tokens(rows, logits)
        finished: set[int] = set()
        for i, (request, token) in enumerate(zip(rows, tokens)):
            reason = self._append(request, token)
            if reason:
                finished.add(offset + i)
        if finished or any(r.cancelled.is_set() for r in self._running):
            self._drop(finished)

    def _next_tokens(self, rows: list[Request], logits: "torch.Tensor") -> list[int]:
        import torch
        from transformers import (
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        tokens = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            s = r.sampling
            greedy = s.temperature < GREEDY_BELOW
            if greedy and s.repetition_penalty == 1.0:
                continue
            history = torch.tensor([r.prompt_ids + r.generated], device=logits.device)
            scores = logits[i:i + 1]
            if s.repetition_penalty != 1.0:
                scores = RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(history, scores)
            if greedy:
                tokens[i] = int(scores.argmax(-1))
                continue
            scores = TemperatureLogitsWarper(s.temperature)(history, scores)
            if s.top_p < 1.0:
                scores = TopPLogitsWarper(s.top_p)(history, scores)
            probs = torch.softmax(scores, dim=-1)
            if torch.isfinite(probs).all():  # else (overflowing logits) keep the greedy token
                tokens[i] = int(torch.multinomial(probs, 1, generator=r.generator))
        return tokens

    def _append(self, request: Request, token: int) -> str | None:
        """Add one token to a request and send the new text; the finish reason once it is done."""
        if request.cancelled.is_set():
            request.on_update(Update(finish_reason="cancelled", prompt_tokens=len(request.prompt_ids),
                                     completion_tokens=len(request.generated)))
            return "cancelled"
        request.generated.append(token)
        stopped = token in request.stop_ids
        answer = request.generated[:-1] if stopped else request.generated
        text = self.tokenizer.decode(answer, skip_special_tokens=True)
        reason = "stop" if stopped else None
        cut = _first_stop(text, request.sampling.stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
        if reason is None and len(request.generated) >= request.sampling.max_new_tokens:
            reason = "length"
        # Text that may still become a stop string, or half of a multi-byte character, waits.
        ready = text if reason else text[:len(text) - _held_back(text, request.sampling.stop)]
        if reason == "length":
            ready = ready.rstrip("\ufffd")
        delta, request.emitted = ready[request.emitted:], max(request.emitted, len(ready))
        if delta or reason:
            request.on_update(Update(delta, reason, len(request.prompt_ids), len(request.generated)))
        return reason

    def _drop(self, finished: set[int]) -> None:
        import torch

        keep = [i for i, r in enumerate(self._running) if i not in finished and not r.cancelled.is_set()]
        for i, r in enumerate(self._running):
            if i not in finished and r.cancelled.is_set():
                r.on_update(Update(finish_reason="cancelled", prompt_tokens=len(r.prompt_ids),
                                   completion_tokens=len(r.generated)))
        if not keep:
            self._running, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._running = [self._running[i] for i in keep]
        # Columns that are padding in every remaining row cost attention time for nothing.
        unused = int((self._mask.sum(0) == 0).long().cumprod(0).sum())
        if unused:
            self._mask = self._mask[:, unused:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` to hold back: half of a multi-byte character, or a possible start of a stop string."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        hold = max([hold] + [n for n in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:n])])
    return hold
