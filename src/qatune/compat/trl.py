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


@contextmanager
def forward_replaced(model: Any, forward: Any) -> Iterator[None]:
    """`model.forward` is `forward` inside, and the one it replaced again after."""
    replaced = model.forward
    model.forward = forward
    try:
        yield
    finally:
        model.forward = replaced


@contextmanager
def run_prompts_once(model: Any) -> Iterator[None]:
    """DPO's policy and reference passes run each pair's prompt once instead of once per answer, while inside.

    TRL's DPO batch is [chosen rows; rejected rows], each `prompt + answer`, and the model's fused forward
    (`add_fused_lm_head`, on `model`) scores them. Here each pair becomes one row, `prompt, chosen, p', rejected`:
    `p'` repeats the prompt's last token at its position, the rejected tokens see the prompt (without its last
    token, which `p'` stands for) and themselves but not the chosen answer, and positions restart after the
    prompt, so every answer token is computed as in its own row; the scores are put back where TRL reads them.
    A batch that does not have that shape (a pair whose prompts differ, left padding, an empty answer, extra
    inputs) goes through TRL's forward unchanged. sdpa attention only (the custom mask is a boolean one).
    """
    fused = model.forward

    def forward(*args: Any, fused_lm_head: bool = False, labels: Any = None, **kwargs: Any) -> Any:
        packed = (_pack_pairs(kwargs, labels) if fused_lm_head and not args and labels is not None
                  and model.config._attn_implementation == "sdpa" else None)
        if packed is None:
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        inputs, shape, (rows, columns), (packed_rows, packed_columns) = packed
        out = fused(**inputs, fused_lm_head=True, use_cache=False)

        def unpacked(field: torch.Tensor | None) -> torch.Tensor | None:
            if field is None:
                return None
            return field.new_zeros(shape).index_put((rows, columns), field[packed_rows, packed_columns])

        for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask"):
            setattr(out, name, unpacked(getattr(out, name)))
        return out  # its loss is already the same: the same labels, each scored once

    with forward_replaced(model, forward):
        yield


def _pack_pairs(kwargs: dict[str, Any], labels: torch.Tensor) -> tuple | None:
    """The packed inputs, TRL's output shape and the index pairs (TRL's row, column) <- (packed row, column)."""
    input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    extra = [key for key, value in kwargs.items()
             if value is not None and key not in ("input_ids", "attention_mask", "use_cache")]
    if input_ids is None or attention_mask is None or input_ids.ndim != 2 or input_ids.shape[0] % 2 or extra:
        return None
    pairs, width = input_ids.shape[0] // 2, input_ids.shape[1]
    device = input_ids.device
    row_lengths = attention_mask.sum(1)
    lengths = row_lengths.tolist()
    right_padded = torch.arange(width, device=device) < row_lengths[:, None]
    if not torch.equal(attention_mask.bool(), right_padded):
        return None  # not right-padded
    labelled = labels != -100
    rows, packs = [], []
    for pair in range(pairs):
        chosen, rejected = pair, pairs + pair
        starts = [int(labelled[row].int().argmax()) for row in (chosen, rejected)]
        start = starts[0]
        if (start < 1 or starts[1] != start or not torch.equal(input_ids[chosen, :start], input_ids[rejected, :start])
                or any(lengths[row] <= start or int(labelled[row].sum()) != lengths[row] - start
                       for row in (chosen, rejected))):
            return None  # prompts differ, an answer is empty, or labels are not the answer's tokens
        ids_c, ids_r = input_ids[chosen, :lengths[chosen]], input_ids[rejected, start:lengths[rejected]]
        rows.append((chosen, rejected, start, lengths[chosen], lengths[rejected]))
        packs.append((torch.cat([ids_c, ids_c[start - 1:start], ids_r]),
                      list(range(lengths[chosen])) + list(range(start - 1, lengths[rejected]))))
    total = max(len(ids) for ids, _ in packs)
    ids = input_ids.new_zeros((pairs, total))
    positions = input_ids.new_zeros((pairs, total))
    shift_labels = torch.full((pairs, total), -100, dtype=labels.dtype, device=device)
    mask = torch.zeros((pairs, 1, total, total), dtype=torch.bool, device=device)
    index: list[list[int]] = [[], [], [], []]  # TRL row, TRL column, packed row, packed column
    for pair, ((chosen, rejected, start, end_c, end_r), (pack_ids, pack_positions)) in enumerate(zip(rows, packs)):
        size, dup = len(pack_ids), end_c  # `dup`: the prompt's last token again, where the rejected branch starts
        ids[pair, :size] = pack_ids
        positions[pair, :size] = torch.tensor(pack_positions, device=device)
        causal = torch.ones((size, size), dtype=torch.bool, device=device).tril()
        causal[dup:, start - 1:dup] = False  # the rejected branch sees neither the chosen answer...
        mask[pair, 0, :size, :size] = causal  # ...nor the prompt's last token (p' is in its place)
        mask[pair, 0, size:, 0] = True  # padding rows attend somewhere (their outputs are never read)
        # TRL's column t scores token t + 1 of its row: the chosen answer from the prompt's last token on, then
        # the rejected answer from p'.
        for column in range(start - 1, end_c - 1):
            index[0].append(chosen), index[1].append(column), index[2].append(pair), index[3].append(column)
        for column in range(start - 1, end_r - 1):
            packed_column = dup + column - (start - 1)
            index[0].append(rejected), index[1].append(column), index[2].append(pair), index[3].append(packed_column)
        shift_labels[pair, :end_c - 1] = labels[chosen, 1:end_c]
        shift_labels[pair, dup:dup + end_r - start] = labels[rejected, start:end_r]
    rows_t, columns_t, packed_rows, packed_columns = (torch.tensor(i, device=device) for i in index)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "shift_labels": shift_labels}
    return inputs, (2 * pairs, width - 1), (rows_t, columns_t), (packed_rows, packed_columns)


@contextmanager
def lean_reference_head(model: Any) -> Iterator[None]:
    """The reference pass of a LoRA dpo/kto run (no gradient, adapters switched off) scores log-probabilities only,
    while inside.

    TRL gives `model` one fused LM head for every call, with the entropy, mean logit and top-1 fields its metrics
    read; the reference pass discards them, and on a CPU they are most of the head's forward (about half its time
    at the default model's 49k-token vocabulary). A second fused head with log-probabilities alone serves the calls
    made without gradient while the adapters are off; evaluation (adapters on) keeps TRL's.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from trl.trainer.utils import add_fused_lm_head

    adapter_layer = next((m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)
    if adapter_layer is None:
        yield
        return
    with_metrics = model.forward
    add_fused_lm_head(model, outputs=("log_probs",))
    log_probs_only = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        reference = not torch.is_grad_enabled() and adapter_layer.disable_adapters
        return (log_probs_only if reference else with_metrics)(*args, **kwargs)

    model.forward = with_metrics  # what add_fused_lm_head replaced: the one to come back after
    with forward_replaced(model, forward):
        yield
