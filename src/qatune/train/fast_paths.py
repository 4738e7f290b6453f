"""How batches are built, attended and scored: train.padding_free, train.chunked_loss and
train.lean_dropout, decided where they apply and held only while the Trainer runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from qatune.config import QatuneConfig


@dataclass
class FastPaths:
    collator: Any
    loss: Any  # a Trainer compute_loss_func, or None for the model's own loss
    padding_free_on: str | None  # the device whose padding-free attention the training loop uses
    lean_dropout: bool  # LoRA dropout swapped for LeanDropout while training (CPU)
    mixed_precision: bool
    summary: str
    model_patches: tuple[AbstractContextManager[None], ...] = ()  # a stage's own, entered while the Trainer runs

    @contextmanager
    def training(self, model: Any) -> Iterator[None]:
        """What holds while the Trainer runs; the model is as loaded again afterwards (for generation)."""
        from qatune.compat.peft import input_casts_off, lora_dropout_replaced
        from qatune.train.attention import padding_free_attention
        from qatune.train.dropout import LeanDropout

        with ExitStack() as stack:
            if self.padding_free_on:
                stack.enter_context(padding_free_attention(model, self.padding_free_on))
            if self.lean_dropout:
                stack.enter_context(lora_dropout_replaced(model, lambda dropout: LeanDropout(dropout.p)))
            # peft casts each LoRA input to the adapter's fp32 and autocast casts it back to bf16 for the
            # product: under mixed precision both copies are waste (same values, measured ~2% of a step).
            stack.enter_context(input_casts_off(model, active=self.mixed_precision))
            for patch in self.model_patches:
                stack.enter_context(patch)
            yield


def decide_fast_paths(config: QatuneConfig, model: Any, device: str, dtype: Any, processes: int,
                      pad_token_id: int) -> FastPaths:
    """Batching, attention, loss and dropout for this model, method and device; changes nothing yet."""
    import torch

    from qatune.train.attention import padding_free_implementation
    from qatune.train.collator import PackingCollator, PaddingCollator
    from qatune.train.distributed import backend
    from qatune.train.dropout import plain_lora_dropouts
    from qatune.train.loss import LabelledCrossEntropy, plain_output_layer

    cfg = config.train
    # Prefix tuning prepends virtual keys to every row: the samples of a row would share them.
    padding_free = cfg.padding_free and config.method.name != "prefix"
    # FSDP and ZeRO-3 hold the output layer in shards outside the forward pass.
    sharded = processes > 1 and backend(cfg.distributed).shards_model
    output_layer = plain_output_layer(model) if cfg.chunked_loss and not sharded else None
    parts = [f"padding-free rows ({padding_free_implementation(device)} attention)" if padding_free else
             "padded batches" + (" (prefix tuning pads)" if cfg.padding_free else "")]
    if output_layer is not None:
        parts.append("loss chunked over answer tokens")
    else:
        reason = "" if not cfg.chunked_loss else " (sharded output layer)" if sharded else " (output layer not plain)"
        parts.append("the model's own loss" + reason)
    lean_dropout = cfg.lean_dropout and device == "cpu" and plain_lora_dropouts(model) > 0
    if lean_dropout:
        parts.append("lean LoRA dropout")
    return FastPaths(
        collator=PackingCollator() if padding_free else PaddingCollator(pad_token_id, 8 if device == "cuda" else None),
        loss=LabelledCrossEntropy(output_layer, dtype) if output_layer is not None else None,
        padding_free_on=device if padding_free else None,
        lean_dropout=lean_dropout,
        mixed_precision=dtype != torch.float32,
        summary="Fast paths: " + "; ".join(parts),
    )
