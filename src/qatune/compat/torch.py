"""torch: private CPU feature probes, and the global random state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matrix products in hardware (torch has no public probe for either)."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@contextmanager
def seeded(seed: int, device: str = "cpu") -> Iterator[None]:
    """Python's, NumPy's and torch's (CPU and CUDA) random state seeded for the block, as it was after:
    a training run is reproducible and leaves the caller's random state alone."""
    import random

    import numpy as np
    import torch
    from transformers import set_seed

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if device == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        set_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
