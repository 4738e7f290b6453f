"""Batched generation with the chat template the model was trained on.

Prompts are rendered with the training template plus the generation prompt, left-padded into
one batch, and stopped at the template's end-of-turn token as well as eos: a fine-tuned model
that learned `<|im_end|>` stops there instead of rambling on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qatune.data.templates import render

if TYPE_CHECKING:
    from qatune.config import EvalConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_config(cls, cfg: "EvalConfig") -> "Decoding":
        return cls(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.repetition_penalty)


@dataclass(frozen=True)
class Answer:
    text: str
    new_tokens: int  # generated tokens, the stop token included
    seconds: float  # wall time of the batch that produced it (answers in one batch finish together)


def stop_token_ids(tokenizer: "PreTrainedTokenizerBase", end_of_turn_id: int | None = None) -> list[int]:
    ids = [end_of_turn_id, tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


def generate(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", template: str,
             prompts: list[list[dict[str, str]]], decoding: Decoding = Decoding(),
             end_of_turn_id: int | None = None, batch_size: int = 8) -> list[Answer]:
    """Answer each prompt (a message list ending with a user turn), in the prompts' order.

    Prompts are batched by length (longest first) so that a batch holds little padding.
    """
    import time

    import torch

    stops = stop_token_ids(tokenizer, end_of_turn_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    encoded = [tokenizer.encode(render(tokenizer, template, p, add_generation_prompt=True), add_special_tokens=False)
               for p in prompts]
    sampling = decoding.temperature > 0
    options = dict(max_new_tokens=decoding.max_new_tokens, do_sample=sampling,
                   repetition_penalty=decoding.repetition_penalty, eos_token_id=stops, pad_token_id=pad_id)
    if sampling:
        options.update(temperature=decoding.temperature, top_p=decoding.top_p)
    else:  # silence the model's own sampling defaults, which greedy decoding ignores anyway
        options.update(temperature=None, top_p=None, top_k=None)
    answers: list[Answer | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            chunk = [encoded[i] for i in rows]
            longest = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([[pad_id] * (longest - len(ids)) + ids for ids in chunk], device=device)
            mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
            started = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=mask, **options)
            seconds = time.perf_counter() - started
            for index, row in zip(rows, out[:, longest:].tolist()):
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                # A cut at max_new_tokens can split a multi-byte character: drop the replacement mark.
                text = tokenizer.decode(row[:cut], skip_special_tokens=True).strip().rstrip("\ufffd")
                answers[index] = Answer(text, min(cut + 1, len(row)), seconds)
    finally:
        model.train(was_training)
    return answers
