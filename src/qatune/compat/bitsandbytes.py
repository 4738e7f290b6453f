"""bitsandbytes: the CPU kernel switch of its 4-bit linear layers, and its process-wide optimizer overrides."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def keep_4bit_weights_differentiable(model: torch.nn.Module) -> int:
    """bitsandbytes (0.50.2) repacks a Linear4bit's weight for its AVX512-BF16 CPU kernel the first time it
    runs in eval mode without grad (an evaluation, a preview answer), and keeps it so: that kernel has no
    backward, so every later training step passes no gradient through the base (measured: layer 0's
    lora_B gradient fell from 0.25 to 0.0 after one eval forward). A model being trained keeps the
    autograd layout; returns how many layers were switched."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


@contextmanager
def optimizer_overrides_scoped() -> Iterator[None]:
    """bitsandbytes' `GlobalOptimManager` is a process-wide singleton: the Trainer registers every embedding
    of the model for 32-bit optimizer state with it and nothing ever unregisters them, so each training
    in one process (`qatune tune` trials, a library caller's loop) keeps the earlier models alive and
    hands their per-position overrides to the next 8-bit optimizer. Whatever a training registers is
    dropped when it ends; the manager's state from before is restored. Nothing happens where
    bitsandbytes was never imported."""
    manager = _optim_manager()
    saved = None if manager is None else _manager_state(manager)
    try:
        yield
    finally:
        manager = manager or _optim_manager()
        if manager is not None:
            if saved is None:
                manager.initialize()
            else:
                manager.__dict__.update(saved)


def _optim_manager() -> object | None:
    if "bitsandbytes" not in sys.modules:
        return None
    from bitsandbytes.optim import GlobalOptimManager

    return GlobalOptimManager.get_instance()


def _manager_state(manager: object) -> dict:
    # shallow copies of its dicts and list: the modules and parameters they name are not copied
    return {key: copy.copy(value) for key, value in vars(manager).items()}
