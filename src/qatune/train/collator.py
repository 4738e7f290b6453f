"""Batching: dynamic padding to the longest sample of each batch, labels from the data stage.

Samples come tokenized with assistant-only labels (IGNORE_INDEX elsewhere). Padding only to the
batch's longest sample, with length-grouped sampling in the Trainer, keeps padding small; on a GPU
the length is rounded up to a multiple of 8 for tensor cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qatune.data.templates import IGNORE_INDEX


@dataclass
class PaddingCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(s["input_ids"]) for s in samples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(samples)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, :n] = torch.as_tensor(sample["input_ids"])
            labels[row, :n] = torch.as_tensor(sample["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
