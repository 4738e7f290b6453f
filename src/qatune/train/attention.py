"""Attention for padding-free batches: the samples of a micro-batch lie end to end in one row, and
each attends only to itself.

`PackingCollator` gives the row, per-sample position ids and the sample boundaries (`cu_seq_lens_q`,
FlashAttention's varlen convention). On a CUDA GPU with flash-attn installed, transformers'
`flash_attention_2` reads those boundaries itself. Elsewhere (CPUs, GPUs without flash-attn) the
row is split at the boundaries and each sample goes through PyTorch's SDPA with a causal mask: the
cost is the sum of the squared sample lengths, and nothing crosses from one sample to the next.

transformers' own route for a packed row under SDPA (a block-diagonal mask derived from the
position ids) costs the square of the whole row, and in transformers 5.24 it is silently skipped
whenever the model builds a KV cache, which `use_cache=True` in a model's config does in training
too: samples then attend to each other (measured: loss 3.75 instead of 2.65 on three packed samples).

Sliding-window layers (Gemma 3: five of every six layers see only the last `sliding_window` tokens, 512 in
gemma-3-270m; Mistral) pass `sliding_window` to the attention: a sample longer than the window gets a
banded causal mask, so it attends in the packed row exactly as alone; a shorter one needs none.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

VARLEN_SDPA = "qatune_varlen_sdpa"


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          cu_seq_lens_q: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (1, heads, tokens, dim) holding several samples end to end."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        raise ValueError(f"attention {VARLEN_SDPA} needs the sample boundaries (cu_seq_lens_q) of a packed batch")
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    window = kwargs.get("sliding_window")
    # split, not slicing: the backward of a slice would allocate a zeroed gradient of the whole row per sample
    outputs = [sdpa_attention_forward(module, q, k, v, _window_mask(q.shape[2], window, q.device), dropout=dropout,
                                      scaling=scaling, is_causal=True, softcap=kwargs.get("softcap"))[0]
               for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    return torch.cat(outputs, dim=1), None  # (1, tokens, heads, dim), as sdpa_attention_forward returns


def _window_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """The boolean mask of causal attention within `window` tokens (transformers' sliding_window_overlay:
    key > query - window), or None where plain causal attention is the same (no window, or a shorter sample)."""
    if not window or length <= window:
        return None
    index = torch.arange(length, device=device)
    distance = index[:, None] - index[None, :]
    return ((distance >= 0) & (distance < window))[None, None]


def padding_free_implementation(device: str) -> str:
    """flash_attention_2 where it runs (CUDA with flash-attn), else the per-sample SDPA above."""
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return VARLEN_SDPA


@contextmanager
def padding_free_attention(model: Any, device: str) -> Iterator[str]:
    """The model attends per sample inside the block; its own implementation is back afterwards
    (generation with a KV cache, and saved checkpoints, use that one), and the registry as it was."""
    from qatune.compat.transformers import (
        attention_implementation,
        registered_attention,
    )

    implementation = padding_free_implementation(device)
    with registered_attention(VARLEN_SDPA, varlen_sdpa_attention), attention_implementation(model, implementation):
        yield implementation
