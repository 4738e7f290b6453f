"""bitsandbytes: the CPU kernel switch of its 4-bit linear layers."""

from __future__ import annotations

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
