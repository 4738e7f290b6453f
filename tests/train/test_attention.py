"""Padding-free attention: in a row of several samples, each sample gets exactly what it gets alone."""

from __future__ import annotations

import torch

from qatune.config import ModelConfig
from qatune.models import load_model
from qatune.train.attention import VARLEN_SDPA, padding_free_attention
from qatune.train.collator import PackingCollator


def test_a_packed_row_equals_each_sample_alone(tiny_model_dir) -> None:
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randint(3, 1000, (n,), generator=generator).tolist() for n in (7, 19, 4)]
    batch = PackingCollator()([{"input_ids": ids, "labels": ids} for ids in samples])
    before = model.config._attn_implementation
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in samples]
        with padding_free_attention(model, "cpu") as implementation:
            assert implementation == VARLEN_SDPA and model.config._attn_implementation == VARLEN_SDPA
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           cu_seq_lens_q=batch["cu_seq_lens_q"]).logits[0]
    assert model.config._attn_implementation == before, "generation gets the model's own attention back"
    for got, want in zip(packed.split([len(ids) for ids in samples]), alone):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_packed_row_without_boundaries_is_refused(tiny_model_dir) -> None:
    import pytest

    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32).eval()
    with padding_free_attention(model, "cpu"), pytest.raises(ValueError, match="cu_seq_lens_q"):
        model(input_ids=torch.tensor([[5, 6, 7]]))
