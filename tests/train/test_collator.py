"""The collators: padding to the batch's longest sample, or one padding-free row; never training on
padding or across samples."""

from __future__ import annotations

from qatune.data.templates import IGNORE_INDEX
from qatune.train.collator import PackingCollator, PaddingCollator


def test_pads_to_longest_in_batch_with_ignored_labels() -> None:
    samples = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = PaddingCollator(pad_token_id=0)(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_rounds_length_up_to_multiple() -> None:
    batch = PaddingCollator(pad_token_id=2, pad_to_multiple_of=8)([{"input_ids": [1] * 9, "labels": [1] * 9}])
    assert batch["input_ids"].shape == (1, 16)
    assert batch["attention_mask"].sum().item() == 9
    assert (batch["labels"][0, 9:] == IGNORE_INDEX).all()


def test_packing_lays_samples_end_to_end_without_padding() -> None:
    samples = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = PackingCollator()(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # The first token of every sample is never a target: the last token of the sample before
    # would otherwise be trained to predict it.
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5]
    assert batch["max_length_q"] == batch["max_length_k"] == 3
    assert "attention_mask" not in batch
