"""The shared model helpers: the dtype every stage loads in."""

from __future__ import annotations

import torch

from qatune.config import ModelConfig
from qatune.models import compute_dtype, configured_dtype, native_bf16


def test_model_dtype_is_what_was_asked_and_auto_is_the_fastest_safe_one() -> None:
    assert configured_dtype(ModelConfig(dtype="float32"), "cpu") is torch.float32
    assert configured_dtype(ModelConfig(dtype="bfloat16"), "cpu") is torch.bfloat16
    auto = configured_dtype(ModelConfig(), "cpu")
    assert auto is compute_dtype("cpu") is (torch.bfloat16 if native_bf16("cpu") else torch.float32)
