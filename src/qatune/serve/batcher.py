"""Continuous batching: concurrent requests share each decoding step of one model.

One engine thread owns the model. Each loop it admits waiting requests (up to `max_batch_size`
rows), runs their prompts through the model together (prefill), merges their key/value cache
into the running batch, then takes one decoding step for every running row. A row that finishes
(stop token, stop string, max_tokens, cancelled) leaves at once and its slot is free at the
next step, so a short answer never waits for a long one and a new request never waits for a
whole batch to end.

Rows of different lengths share one left-padded cache with an attention mask and explicit
position ids, the layout `generate` uses for a padded batch, so each row is computed as if alone.
Padding is only ever on the left of a row (joining pads on the left, leaving trims columns off the left
of every row), so each row's tokens are contiguous columns: the sliding-window layers of Gemma 3 window
by column, and then a row's window is the one it has alone. The cache keeps the full keys and values
of every layer (a `DynamicCache` without a config) and the mask does the windowing.

Prefix cache: the tokens every prompt of a model starts with (the chat template's system prompt
and header, e.g. SmolLM's default system prompt: about 30 tokens) are run once per model; a prompt
that starts with them, token for token, is prefilled from its first own token (or a few before it,
see `_prefill_group`). On a CPU, where prefill is compute-bound, that removes most of the cost of
admitting a short question.
LoRA adapters are chosen per row (peft's mixed-adapter batches): every adapter is served on one
shared base model.

transformers' own continuous batching manager takes no per-request adapter, hence this loop. The queue,
the engine thread and the stop rules are `scheduling`'s, shared with the llama.cpp engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qatune.serve.protocol import Sampling
from qatune.serve.scheduling import GREEDY_BELOW, BatchLoop, Request, append_token

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


class ContinuousBatcher(BatchLoop):
    """The engine: `submit` requests from any thread; `start` runs the loop in its own thread."""

    def __init__(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", max_batch_size: int = 16,
                 max_queue: int = 64, pad_id: int = 0, on_step: Callable[[int, int, int], None] | None = None,
                 prefixes: dict[str | None, list[int]] | None = None):
        super().__init__(max_batch_size, max_queue, on_step)
        self.model = model
        self.prefixes = {adapter: ids for adapter, ids in (prefixes or {}).items() if ids}  # by adapter (None: base)
        self._prefix_cache: dict[str | None, list[tuple["torch.Tensor", "torch.Tensor"]]] = {}
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.mixed_adapters = hasattr(model, "peft_config")
        from qatune.compat.transformers import cache_keyword

        self.cache_keyword = cache_keyword(model)  # the forward's KV-cache argument in this transformers
        self.device = next(model.parameters()).device
        self._cache: Any = None
        self._mask: "torch.Tensor | None" = None

    def _prepare(self, request: Request) -> None:
        if request.sampling.seed is not None:
            import torch

            request.generator = torch.Generator(device=self.device).manual_seed(request.sampling.seed)

    def _reset(self) -> None:
        self._running, self._cache, self._mask = [], None, None

    def _step(self, admitted: list[Request]) -> int | None:
        import torch

        stepped = len(admitted) or len(self._running)  # rows that get a token in this step
        with torch.inference_mode():
            if admitted:
                self._prefill(admitted)
            elif self._running:
                self._decode()
            else:
                return None
        return stepped

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
        """Prefill `rows` from column `cached` on, the columns before it coming from the cached prefix.

        Each row is its whole prompt left-padded to the group's width, so its tokens stay contiguous: a
        sliding-window layer (Gemma 3) windows by column, and padding between the prefix and the rest of a prompt
        would push the prefix out of that row's window too early. A shorter prompt's padding therefore comes
        before its prefix, and the prefix tokens shifted into the prefilled columns are computed again, in
        columns that would otherwise be padding."""
        import torch
        from transformers import DynamicCache

        width = cached + max(len(r.prompt_ids) - cached for r in rows)
        pads = [width - len(r.prompt_ids) for r in rows]
        ids = torch.tensor([[self.pad_id] * p + r.prompt_ids for r, p in zip(rows, pads)], device=self.device)
        mask = torch.tensor([[0] * p + [1] * len(r.prompt_ids) for r, p in zip(rows, pads)], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        if cached:  # the prefix's keys and values, one row per request (each its own model's), shifted by its padding
            layers = [self._cached_prefix(r.adapter) for r in rows]
            for index in range(len(layers[0])):
                cache.update(torch.cat([_shift(row[index][0], p) for row, p in zip(layers, pads)]),
                             torch.cat([_shift(row[index][1], p) for row, p in zip(layers, pads)]), index)
        logits = self._forward(ids[:, cached:], mask, positions[:, cached:], cache, rows)
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
            reason = append_token(request, token, self.tokenizer)
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

    def _drop(self, finished: set[int]) -> None:
        import torch

        keep = [i for i, r in enumerate(self._running) if i not in finished and not r.cancelled.is_set()]
        for i, r in enumerate(self._running):
            if i not in finished and r.cancelled.is_set():
                r.finish("cancelled")
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


def _shift(states: "torch.Tensor", padding: int) -> "torch.Tensor":
    """A prefix's keys or values moved `padding` columns right, as that many padding columns in front of it: the
    same width, the prefix tokens pushed past the end are the ones the row computes again."""
    import torch.nn.functional as F

    kept = max(states.shape[2] - padding, 0)
    return F.pad(states[:, :, :kept], (0, 0, states.shape[2] - kept, 0))
