"""Cross-entropy on the labelled tokens only, in chunks: the vocabulary logits are never whole.

A causal LM's usual loss projects every position onto the vocabulary (49,152 columns for SmolLM2,
128k for Llama 3), keeps those logits for the backward pass and upcasts them to fp32: for a batch of
4 x 512 tokens that is 0.4 GB of fp32 logits plus their softmax and its gradient, and a fifth of the
model's forward FLOPs spent on prompt positions whose labels are ignored. Here the model's forward
stops at the last hidden state (the Trainer asks for no logits), the positions that carry a label
are gathered, and `chunked_linear_loss` projects them a chunk of `chunk_tokens` at a time:
the loss and the gradient of each chunk are computed together in the forward pass (softmax minus
one-hot, fp32), so only the hidden-state gradient (and, when the output layer trains, its weight
gradient) outlives the chunk. Same idea as Liger's fused linear cross-entropy, in plain torch so it
runs on CPUs too. The result equals transformers' `ForCausalLMLoss` (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from qatune.data.templates import IGNORE_INDEX

# fp32 logits held at a time. On CPU a chunk that stays in the last-level cache is fastest (SmolLM2's
# 49k vocabulary, 1,300 labelled tokens: 0.60 s for 128-row chunks, 0.65-0.75 s for 256-2048);
# a GPU wants large chunks (few kernel launches).
CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 2**30}


# A chunk's loss: the fp32 logits of rows [start, stop) in, (their summed loss, d loss / d logits) out. It may
# overwrite the logits (cross-entropy turns them into its own gradient in place).
ChunkLoss = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


class _ChunkedLinearLoss(torch.autograd.Function):
    """sum over chunks of chunk_loss(hidden @ weight.T), without keeping the logits: each chunk's gradient is
    taken in the forward pass and only the hidden-state (and weight) gradients are kept."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, chunk_loss: ChunkLoss,
                chunk_tokens: int, compute_dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes below are chosen, not cast
            return _ChunkedLinearLoss._forward(ctx, hidden, weight, chunk_loss, chunk_tokens, compute_dtype)

    @staticmethod
    def _forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, chunk_loss: ChunkLoss,
                 chunk_tokens: int, compute_dtype: torch.dtype) -> torch.Tensor:
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens].to(compute_dtype)
            loss, grad_logits = chunk_loss((h @ w.T).float(), start, start + h.shape[0])
            total += loss
            grad_logits = grad_logits.to(compute_dtype)
            grad_hidden[start:start + chunk_tokens] = grad_logits @ w
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T.float(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_dtype = weight.dtype
        ctx.has_weight_grad = grad_weight is not None
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        weight_grad = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.has_weight_grad else None
        return grad_hidden * grad_output.to(grad_hidden.dtype), weight_grad, None, None, None


def chunked_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, chunk_loss: ChunkLoss, chunk_tokens: int,
                        compute_dtype: torch.dtype) -> torch.Tensor:
    """The sum of `chunk_loss` over the rows of `hidden @ weight.T`, `chunk_tokens` rows at a time,
    differentiable in `hidden` and (where it requires grad) `weight`."""
    return _ChunkedLinearLoss.apply(hidden, weight, chunk_loss, chunk_tokens, compute_dtype)


def cross_entropy_chunks(targets: torch.Tensor) -> ChunkLoss:
    """Next-token cross-entropy of each row against `targets`, with its gradient softmax - one_hot."""

    def chunk(logits: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = targets[start:stop]
        log_norm = torch.logsumexp(logits, dim=-1)
        loss = (log_norm - logits.gather(1, t[:, None]).squeeze(1)).sum()
        # d(loss)/d(logits) = softmax - one_hot, computed in place over the logits buffer
        grad_logits = logits.sub_(log_norm[:, None]).exp_()
        grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
        return loss, grad_logits

    return chunk


def chunk_rows(weight: torch.Tensor) -> int:
    """Rows per chunk so that one chunk's fp32 logits fit the device's budget (CHUNK_BYTES)."""
    budget = CHUNK_BYTES.get(weight.device.type, CHUNK_BYTES["cuda"])
    return max(budget // (4 * weight.shape[0]), 16)


def labelled_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden states that predict a labelled token, and those tokens (next-token shift)."""
    hidden = hidden[:, :-1]
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != IGNORE_INDEX
    return hidden[keep], targets[keep]


def mean_over_items(total: torch.Tensor, count: int, num_items_in_batch: Any) -> torch.Tensor:
    """`total` over the accumulated batch's labelled tokens (`num_items_in_batch`), else over this batch's."""
    if num_items_in_batch is None:
        return total / max(count, 1)
    return total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch)
                    else num_items_in_batch)


class LabelledCrossEntropy:
    """The Trainer's `compute_loss_func`: next-token cross-entropy over the labelled positions.

    `model_kwargs` go into every forward call (QatuneTrainer adds them): the model returns its last
    hidden state and computes logits for no position. The sum is divided by `num_items_in_batch`
    (the labelled tokens of the whole accumulated batch, as the Trainer counts them for its own
    loss), or by this batch's labelled tokens when it is not given (evaluation)."""

    def __init__(self, output_layer: torch.nn.Linear, compute_dtype: torch.dtype,
                 chunk_tokens: int | None = None) -> None:
        self.output_layer = output_layer
        # The dtype the model computes in (bf16 under mixed precision). The Trainer calls the loss outside
        # the model's autocast region, on hidden states accelerate has already converted to fp32.
        self.compute_dtype = compute_dtype
        self.chunk_tokens = chunk_tokens or chunk_rows(output_layer.weight)
        self.model_kwargs = {"logits_to_keep": torch.empty(0, dtype=torch.long), "output_hidden_states": [-1]}

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        hidden, targets = labelled_positions(outputs.hidden_states[-1], labels)
        total = chunked_linear_loss(hidden, self.output_layer.weight, cross_entropy_chunks(targets),
                                    self.chunk_tokens, self.compute_dtype)
        return mean_over_items(total, targets.numel(), num_items_in_batch)


def plain_output_layer(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's vocabulary projection where logits are exactly `hidden @ weight.T` (LLaMA, Mistral,
    Qwen...), else None: a bias, a logit scale or soft-capping (Cohere, Gemma 2) need the model's own loss."""
    layer = model.get_output_embeddings()
    config = model.config
    if type(layer) is not torch.nn.Linear or layer.bias is not None:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1.0):
        return None
    return layer
