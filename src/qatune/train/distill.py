"""`train.stage: distill`: the student learns a teacher's token distributions on the answer tokens.

loss = alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE(student, reference answer), where `_T` is a
softmax at temperature T and D is forward KL (Hinton; covers every mode of the teacher), reverse KL
(MiniLLM; mode-seeking) or Jensen-Shannon (GKD). The T^2 keeps the divergence's gradient on the scale of
the cross-entropy's whatever T (Hinton et al. 2015).

Like the training loss (`train.loss`), only labelled positions are projected onto the vocabulary, a chunk
at a time, by both models: the student's and the teacher's vocabulary-wide logits are never held whole
(SmolLM2's 49k columns: 0.4 GB a model for 2,000 answer tokens in fp32). Each chunk's gradient is taken
in the forward pass by autograd over that chunk alone, so the divergences stay the textbook formulas
(tested against a direct full-logits computation) and only the hidden-state gradient outlives a chunk.

The teacher runs in eval mode under no_grad, in the compute dtype, on the same rows (padding-free or
padded) as the student. Evaluation (eval loss, best checkpoint) stays the cross-entropy on the reference
answers, so a distilled run's eval loss compares with an sft run's.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from qatune.config import DistillConfig, ModelConfig, QatuneConfig
from qatune.errors import QatuneError
from qatune.train.loss import (
    ChunkLoss,
    chunk_rows,
    chunked_linear_loss,
    cross_entropy_chunks,
    labelled_positions,
    mean_over_items,
    plain_output_layer,
)
from qatune.train.trainer import QatuneTrainer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class DistillError(QatuneError):
    """Teacher and student do not fit together, or the settings cannot distil."""


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Per row: D(teacher, student) of the softmaxes of the two (already temperature-scaled) logit rows."""
    log_q = F.log_softmax(student_logits, dim=-1)
    log_p = F.log_softmax(teacher_logits, dim=-1)
    if kind == "forward_kl":  # KL(p || q)
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "reverse_kl":  # KL(q || p)
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if kind == "jsd":  # (KL(p || m) + KL(q || m)) / 2, m the mixture
        log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0, device=log_p.device))
        return 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1))
    raise ValueError(f"unknown divergence {kind!r}")


def distillation_chunks(targets: torch.Tensor, teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                        cfg: DistillConfig, compute_dtype: torch.dtype) -> ChunkLoss:
    """Each chunk's alpha * T^2 * D + (1 - alpha) * CE and its gradient in the student's logits; the teacher's
    logits of the same rows are made here, one chunk at a time."""
    temperature, alpha = cfg.temperature, cfg.alpha
    teacher_w = teacher_weight.to(compute_dtype)

    def chunk(logits: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            teacher_logits = (teacher_hidden[start:stop].to(compute_dtype) @ teacher_w.T).float()
        student = logits.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = torch.zeros((), device=logits.device)
            if alpha > 0:
                scaled = divergence(student / temperature, teacher_logits / temperature, cfg.divergence)
                loss = loss + alpha * temperature ** 2 * scaled.sum()
            if alpha < 1:
                loss = loss + (1 - alpha) * F.cross_entropy(student, targets[start:stop], reduction="sum")
            (grad,) = torch.autograd.grad(loss, student)
        return loss.detach(), grad

    return chunk


class DistillationLoss:
    """The Trainer's `compute_loss_func` for distillation. `DistillTrainer` hands it each batch's inputs first
    (`read_teacher`), so the teacher sees exactly the student's rows; without them (evaluation) it is the
    cross-entropy on the reference answers alone."""

    def __init__(self, output_layer: torch.nn.Linear, teacher: "PreTrainedModel | None", cfg: DistillConfig,
                 compute_dtype: torch.dtype, chunk_tokens: int | None = None) -> None:
        self.output_layer = output_layer
        self.teacher = self.teacher_output_layer = None  # None: alpha 0, cross-entropy alone
        if teacher is not None:
            self.teacher = teacher.eval().requires_grad_(False)
            self.teacher_output_layer = plain_output_layer(teacher)
            if self.teacher_output_layer is None:
                raise DistillError(f"the teacher {type(teacher).__name__} reshapes its logits (a bias, a scale or "
                                   "soft-capping): the chunked distillation loss needs a plain output layer",
                                   hint="choose a LLaMA/Mistral/Qwen-style teacher")
        self.cfg = cfg
        self.compute_dtype = compute_dtype
        # two models' chunks (and the divergence's softmaxes) at a time: half the cross-entropy's rows
        self.chunk_tokens = chunk_tokens or max(chunk_rows(output_layer.weight) // 2, 16)
        self.model_kwargs = {"logits_to_keep": torch.empty(0, dtype=torch.long), "output_hidden_states": [-1]}
        self.teacher_hidden: torch.Tensor | None = None

    def read_teacher(self, inputs: dict[str, Any] | None) -> None:
        """The teacher's last hidden states on `inputs` (the student's batch), for the next call; None: CE only."""
        if inputs is None or self.teacher is None:  # alpha 0 is cross-entropy alone: no teacher to run
            self.teacher_hidden = None
            return
        self.teacher_hidden = teacher_hidden_states(self.teacher, inputs, self.model_kwargs)

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        hidden, targets = labelled_positions(outputs.hidden_states[-1], labels)
        if self.teacher_hidden is None:
            chunks = cross_entropy_chunks(targets)
        else:
            teacher, _ = labelled_positions(self.teacher_hidden, labels)
            self.teacher_hidden = None  # one batch's
            chunks = distillation_chunks(targets, teacher, self.teacher_output_layer.weight, self.cfg,
                                         self.compute_dtype)
        total = chunked_linear_loss(hidden, self.output_layer.weight, chunks, self.chunk_tokens, self.compute_dtype)
        return mean_over_items(total, targets.numel(), num_items_in_batch)


def teacher_hidden_states(teacher: "PreTrainedModel", inputs: dict[str, Any],
                          model_kwargs: dict[str, Any]) -> torch.Tensor:
    """The teacher's last hidden state on a batch as the collator made it (padding-free rows attend per sample)."""
    from qatune.train.attention import padding_free_attention

    batch = {k: v for k, v in inputs.items() if k != "labels"}
    device = batch["input_ids"].device
    if next(teacher.parameters()).device != device:
        teacher.to(device)
    packed = "cu_seq_lens_q" in batch
    with torch.no_grad(), padding_free_attention(teacher, device.type) if packed else nullcontext():
        return teacher(**batch, **model_kwargs).hidden_states[-1]


class DistillTrainer(QatuneTrainer):
    """Runs the teacher on every training batch before the student's loss; evaluation stays cross-entropy."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.compute_loss_func.read_teacher(inputs if model.training else None)
        return super().compute_loss(model, inputs, *args, **kwargs)


def teacher_config(config: QatuneConfig) -> ModelConfig:
    """The teacher's model section: distill.teacher, else `model` itself."""
    if config.distill.teacher is None:
        return config.model
    return config.model.model_copy(update={"name_or_path": config.distill.teacher, "gguf_file": None,
                                           "revision": None})


def tokenizer_difference(student: "PreTrainedTokenizerBase", teacher: "PreTrainedTokenizerBase") -> str | None:
    """What differs between two tokenizers in a way that would make their token distributions incomparable."""
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if len(student_vocab) != len(teacher_vocab):
        return f"vocabulary sizes differ: the student's has {len(student_vocab):,} tokens, the teacher's " \
               f"{len(teacher_vocab):,}"
    moved = [(token, ids, teacher_vocab.get(token)) for token, ids in student_vocab.items()
             if teacher_vocab.get(token) != ids]
    if moved:
        shown = ", ".join(f"{t!r} is {a} for the student and {b} for the teacher" for t, a, b in moved[:3])
        return f"{len(moved):,} tokens have different ids ({shown})"
    for name in ("bos_token", "eos_token", "pad_token"):
        if getattr(student, name) != getattr(teacher, name):
            return f"{name} differs: {getattr(student, name)!r} for the student, {getattr(teacher, name)!r} " \
                   "for the teacher"
    return None


def load_teacher(config: QatuneConfig, tokenizer: "PreTrainedTokenizerBase", dtype: torch.dtype) -> "PreTrainedModel":
    """The teacher in the compute dtype, after checking its tokenizer is the student's."""
    from qatune.models import load_model, load_tokenizer

    model_cfg = teacher_config(config)
    difference = tokenizer_difference(tokenizer, load_tokenizer(model_cfg))
    if difference:
        raise DistillError(f"the teacher {model_cfg.name_or_path} and the student {config.model.name_or_path} "
                           f"do not share a tokenizer: {difference}",
                           hint="distil between models of one family (same tokenizer), or make the student from "
                                "the teacher with distill.student_layers")
    return load_model(model_cfg, dtype=dtype)


def distillation_loss(config: QatuneConfig, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase",
                      dtype: torch.dtype) -> DistillationLoss:
    """The loss for the student `model` (as the method wrapped it), with its teacher loaded (not at alpha 0)."""
    output_layer = plain_output_layer(model)
    if output_layer is None:
        raise DistillError(f"the student {type(model).__name__} reshapes its logits (a bias, a scale or "
                           "soft-capping): the chunked distillation loss needs a plain output layer",
                           hint="choose a LLaMA/Mistral/Qwen-style student")
    if config.distill.alpha == 0:  # cross-entropy alone: the teacher would only take memory
        return DistillationLoss(output_layer, None, config.distill, dtype)
    teacher = load_teacher(config, tokenizer, dtype)
    width, teacher_width = output_layer.weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if width != teacher_width:
        raise DistillError(f"the student's output layer has {width:,} rows and the teacher's {teacher_width:,}: "
                           "their token distributions cannot be compared", hint="use models of one family")
    return DistillationLoss(output_layer, teacher, config.distill, dtype)


def held_out_divergence(student: "PreTrainedModel", teacher: "PreTrainedModel", rows: Iterable[dict[str, Any]],
                        kind: str = "forward_kl", temperature: float = 1.0) -> float:
    """Mean divergence per answer token between teacher and student on tokenized rows (`input_ids`, `labels`),
    one row at a time, chunked like training."""
    cfg = DistillConfig(alpha=1.0, temperature=temperature, divergence=kind, student_layers=1)
    student_layer, teacher_layer = plain_output_layer(student), plain_output_layer(teacher)
    kwargs = {"logits_to_keep": torch.empty(0, dtype=torch.long), "output_hidden_states": [-1]}
    device = next(student.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            batch = {"input_ids": torch.as_tensor(row["input_ids"], device=device)[None]}
            labels = torch.as_tensor(row["labels"], device=device)[None]
            hidden, targets = labelled_positions(student(**batch, **kwargs).hidden_states[-1], labels)
            teacher_hidden, _ = labelled_positions(teacher_hidden_states(teacher, batch, kwargs), labels)
            chunks = distillation_chunks(targets, teacher_hidden, teacher_layer.weight, cfg, torch.float32)
            weight = student_layer.weight.float()
            for start in range(0, hidden.shape[0], 256):
                piece = hidden[start:start + 256].float()
                total += chunks(piece @ weight.T, start, start + piece.shape[0])[0].item() / temperature ** 2
            tokens += targets.numel()
    return total / max(tokens, 1)
