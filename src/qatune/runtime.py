"""The Runtime: what this process runs on, probed once and passed down to every stage.

Device, dtype policy, world size and rank, and the console: a stage never probes the device or
reads torchrun's environment itself, so a library caller (or a test) decides all of it in one
place by building its own `Runtime`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from qatune.config import ModelConfig


def _console() -> "Console":
    from rich.console import Console

    return Console()


@dataclass(frozen=True)
class Runtime:
    device: str = "cpu"  # "cuda" or "cpu"
    native_bf16: bool = False  # bf16 matrix products run in hardware here
    world_size: int = 1  # processes of this run (torchrun's WORLD_SIZE)
    rank: int = 0
    console: "Console" = field(default_factory=_console, compare=False)

    @classmethod
    def detect(cls, console: "Console | None" = None) -> "Runtime":
        """The one probe: CUDA or CPU, native bf16, and the process's place under torchrun."""
        import torch

        from qatune.compat.torch import cpu_has_native_bf16

        device = "cuda" if torch.cuda.is_available() else "cpu"
        bf16 = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_native_bf16()
        world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        if console is None or rank != 0:
            from rich.console import Console

            # One voice: rank 0 reports. A caller's console is never changed, only not used on other ranks.
            console = Console(quiet=rank != 0)
        return cls(device=device, native_bf16=bf16, world_size=world_size, rank=rank, console=console)

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes outputs and reports."""
        return self.rank == 0

    def compute_dtype(self) -> "torch.dtype":
        """The fastest safe dtype here: bf16 where native, fp16 on an older CUDA GPU, else fp32.

        On a CPU without AVX512-BF16 or AMX, oneDNN emulates bf16 and a matmul gets ~100x slower than
        fp32 (measured on AMD EPYC Milan, AVX2 only)."""
        import torch

        if self.native_bf16:
            return torch.bfloat16
        return torch.float16 if self.device == "cuda" else torch.float32

    def dtype(self, model_cfg: "ModelConfig") -> "torch.dtype":
        """`model.dtype`: the one asked for, or with `auto` the compute dtype."""
        import torch

        return self.compute_dtype() if model_cfg.dtype == "auto" else getattr(torch, model_cfg.dtype)
