"""peft: LoRA's dropout modules and its input dtype casts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def lora_dropout_replaced(model: torch.nn.Module,
                          replacement: Callable[[torch.nn.Dropout], torch.nn.Module]) -> Iterator[int]:
    """Each plain nn.Dropout of peft's LoRA layers (`lora_dropout[adapter]`) replaced inside the block,
    put back after; yields how many were replaced."""
    replaced = []
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout:
                dropouts[name] = replacement(dropout)
                replaced.append((dropouts, name, dropout))
    try:
        yield len(replaced)
    finally:
        for dropouts, name, dropout in replaced:
            dropouts[name] = dropout


@contextmanager
def input_casts_off(model: Any, active: bool = True) -> Iterator[None]:
    """peft casts each LoRA input to the adapter's dtype; off inside the block where `active`."""
    from peft.helpers import disable_input_dtype_casting

    with disable_input_dtype_casting(model, active=active):
        yield
