"""transformers: the attention registry, a model's attention implementation, the Trainer's private
methods qatune overrides, the forward's cache keyword, and the progress-bar switch.

Imported by the train stage only, inside its functions (it imports the Trainer at the top)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from transformers import AttentionInterface, Trainer

_ABSENT = object()


@contextmanager
def registered_attention(name: str, function: Callable[..., Any]) -> Iterator[None]:
    """`function` in transformers' global attention registry as `name` for the block; removed after
    (or the earlier entry put back)."""
    registry = AttentionInterface._global_mapping
    before = registry.get(name, _ABSENT)
    AttentionInterface.register(name, function)
    try:
        yield
    finally:
        if before is _ABSENT:
            registry.pop(name, None)
        else:
            registry[name] = before


@contextmanager
def attention_implementation(model: Any, implementation: str) -> Iterator[None]:
    """The model (or a peft model's base) attends with `implementation` in the block, with its own after."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = inner.config._attn_implementation
    inner.set_attn_implementation(implementation)
    try:
        yield
    finally:
        inner.set_attn_implementation(before)


def progress_bars_off() -> AbstractContextManager[None]:
    """No weight-loading bars (noise on every start); as before afterwards."""
    from transformers.utils import logging

    from qatune.compat.process import switched_off

    return switched_off(logging.is_progress_bar_enabled, logging.disable_progress_bar, logging.enable_progress_bar)


def cache_keyword(model: Any) -> str:
    """The keyword a causal LM's forward takes its KV cache by: `cache` from transformers 5.2x (where
    `past_key_values` warns on every call), `past_key_values` before."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def tokens_seen_this_run(trainer: Trainer) -> int:
    """Input tokens of this run alone: a resumed run starts from the checkpoint's count."""
    return trainer.state.num_input_tokens_seen - (trainer._initial_num_input_tokens_seen or 0)


class TrainerOverrides(Trainer):
    """The Trainer's private methods qatune changes, each for a reason given beside it."""

    _predicting = False

    def prediction_step(self, *args: Any, **kwargs: Any) -> Any:
        self._predicting = True
        try:
            return super().prediction_step(*args, **kwargs)
        finally:
            self._predicting = False

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | int | None:
        # An eval batch's loss is its own token mean. The Trainer would divide by the tokens of every
        # rank's current batch, which is wrong on a rank whose last batch is a duplicate pad, dropped
        # after gathering (an eval set that does not divide over the processes).
        if self._predicting:
            return None
        return super()._get_num_items_in_batch(batch_samples, device)

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        # A padding-free row has no attention mask and no padding. Counting tokens unlike pad_token_id
        # would miss real end-of-turn tokens wherever the pad token is the end-of-turn token (SmolLM2).
        if "cu_seq_lens_q" in inputs:
            inputs = {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}
        super()._track_num_input_tokens(inputs)

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        sampler = self.train_sampler(dataset)
        return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

    def train_sampler(self, dataset: Any) -> torch.utils.data.Sampler | None:
        """The sampler of the training set; None keeps the Trainer's own."""
        return None
