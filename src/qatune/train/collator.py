"""Batching, labels from the data stage: padding-free rows (the default) or dynamic padding.

Samples come tokenized with assistant-only labels (IGNORE_INDEX elsewhere). `PackingCollator` lays
a micro-batch's samples end to end in one row with no padding at all (`train.padding_free`), and
train/attention.py keeps each sample's attention to itself. `PaddingCollator` pads to the batch's
longest sample (with length-grouped sampling in the Trainer that keeps padding small; on a GPU the
length is rounded up to a multiple of 8 for tensor cores).
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


@dataclass
class PackingCollator:
    """One row of all the samples, positions restarting at 0 for each, and their boundaries.

    The first label of every sample is IGNORE_INDEX, so the last token of one sample is never
    trained to predict the first token of the next. `cu_seq_lens_*`/`max_length_*` are
    FlashAttention's varlen arguments; transformers passes them through to the attention."""

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        lengths = [len(s["input_ids"]) for s in samples]
        input_ids = torch.cat([torch.as_tensor(s["input_ids"], dtype=torch.long) for s in samples])
        labels = torch.cat([torch.as_tensor(s["labels"], dtype=torch.long) for s in samples])
        bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        labels[bounds[:-1].long()] = IGNORE_INDEX
        position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])
        longest = max(lengths)
        return {"input_ids": input_ids[None], "labels": labels[None], "position_ids": position_ids[None],
                "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}
