"""The Runtime: the dtype every stage loads in, probed once."""

from __future__ import annotations

import torch

from qatune.config import ModelConfig
from qatune.runtime import Runtime


def test_model_dtype_is_what_was_asked_and_auto_is_the_fastest_safe_one() -> None:
    here = Runtime.detect()
    assert here.dtype(ModelConfig(dtype="float32")) is torch.float32
    assert here.dtype(ModelConfig(dtype="bfloat16")) is torch.bfloat16
    auto = here.dtype(ModelConfig())
    assert auto is here.compute_dtype() is (torch.bfloat16 if here.native_bf16 else torch.float32)


def test_a_runtime_built_by_hand_decides_the_dtype_alone() -> None:
    assert Runtime(device="cpu", native_bf16=False).dtype(ModelConfig()) is torch.float32
    assert Runtime(device="cpu", native_bf16=True).dtype(ModelConfig()) is torch.bfloat16
    assert Runtime(device="cuda", native_bf16=False).compute_dtype() is torch.float16


def test_other_ranks_are_quiet_and_the_callers_console_is_left_alone(monkeypatch) -> None:
    from rich.console import Console

    mine = Console()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    worker = Runtime.detect(mine)
    assert (worker.world_size, worker.rank, worker.main) == (2, 1, False)
    assert worker.console is not mine and worker.console.quiet and not mine.quiet
    monkeypatch.setenv("RANK", "0")
    assert Runtime.detect(mine).console is mine
