"""TRL: qatune's subclass of a preference trainer, the private Trainer method it extends there, and
the fused LM head's CPU path.

TRL's CPO and ORPO trainers batch chosen and rejected sequences under their own keys
(`chosen_input_ids`, `rejected_attention_mask`, ...), so the Trainer's token count (which looks for
`input_ids`) would see nothing and tokens/s would read 0; the count is taken over both masks instead.
Imported by the preference stage only, inside its functions (it imports the Trainer at the top)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


# Vocabulary columns per tile of the fused LM head on a CPU. Each tile's fp32 temporaries (the backward keeps five
# or six) are positions x columns: TRL's 32768 columns held about 1 GB at 2 pairs of 256 tokens; 4096 was the
# fastest of 4096, 8192 and 32768 on the default model (the tiles' matrix products stay large enough).
CPU_VOCAB_TILE = 4096


@contextmanager
def labelled_positions_only() -> Iterator[None]:
    """TRL's fused LM head (dpo and kto log-probabilities) on a CPU scores only the positions that have a label,
    as it does under Triton, in `CPU_VOCAB_TILE`-column tiles; as TRL has it after.

    Elsewhere TRL scores every position, prompt and padding included, to keep tile shapes fixed for devices that
    compile each shape (Neuron); a CPU compiles nothing. The result is the same (the other positions are zeroed
    after); the head's work falls with the answers' share of the batch (2.3x faster alone on the default model).
    """
    from trl.trainer import utils

    use_triton, tile = utils._use_triton, utils._CHUNKED_LOGPROB_CHUNK_SIZE
    utils._use_triton = lambda device: device.type == "cpu" or use_triton(device)
    utils._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_VOCAB_TILE
    try:
        yield
    finally:
        utils._use_triton, utils._CHUNKED_LOGPROB_CHUNK_SIZE = use_triton, tile
