"""TRL: qatune's subclass of a preference trainer, and the private Trainer method it extends there.

TRL's CPO and ORPO trainers batch chosen and rejected sequences under their own keys
(`chosen_input_ids`, `rejected_attention_mask`, ...), so the Trainer's token count (which looks for
`input_ids`) would see nothing and tokens/s would read 0; the count is taken over both masks instead.
Imported by the preference stage only, inside its functions (it imports the Trainer at the top)."""

from __future__ import annotations

from typing import Any

import torch

from qatune.compat.transformers import TrainerOverrides

PAIRED_MASKS = ("chosen_attention_mask", "rejected_attention_mask")


def preference_trainer(base: type) -> type:
    """`base` (a TRL trainer class) with qatune's Trainer overrides and its seeded length-grouped sampler."""
    from qatune.train.trainer import QatuneTrainer

    class PreferenceTrainer(TrainerOverrides, base):  # type: ignore[misc, valid-type]
        train_sampler = QatuneTrainer.train_sampler

        def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
            if "input_ids" not in inputs and all(key in inputs for key in PAIRED_MASKS):
                masks = torch.cat([inputs[key].flatten() for key in PAIRED_MASKS])
                inputs = {"input_ids": masks, "attention_mask": masks}
            super()._track_num_input_tokens(inputs)

    PreferenceTrainer.__name__ = PreferenceTrainer.__qualname__ = f"Qatune{base.__name__}"
    return PreferenceTrainer
