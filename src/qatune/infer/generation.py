"""Batched generation with the chat template the model was trained on.

Prompts are rendered with the training template plus the generation prompt, left-padded into
one batch, and stopped at the template's end-of-turn token as well as eos: a fine-tuned model
that learned `<|im_end|>` stops there instead of rambling on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qatune.config import DecodingConfig
from qatune.data.templates import render

GREEDY = DecodingConfig()

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Answer:
    text: str
    new_tokens: int  # generated tokens, the stop token included
    seconds: float  # from the start of its batch to its last token


def length_sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length, longest first: a batch holds little padding, and an
    out-of-memory error, if any, comes with the first batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def left_pad(rows: list[list[int]], value: int) -> "torch.Tensor":
    """Rows padded on the left to the longest: every row ends at the last position."""
    import torch

    longest = max(len(r) for r in rows)
    return torch.tensor([[value] * (longest - len(r)) + r for r in rows])


@contextmanager
def evaluating(model: "PreTrainedModel") -> Iterator["torch.device"]:
    """Eval mode (no dropout) and no gradients for the block; the model's mode is restored after. Yields its device."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


class _StepClock:
    """A stopping criterion that never stops: it notes when each token of a batch was generated."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.times: list[float] = []

    def __call__(self, input_ids: "torch.Tensor", scores: "torch.Tensor", **kwargs: object) -> "torch.Tensor":
        import torch

        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def seconds_until(self, tokens: int) -> float:
        """Time from the start of generation to the `tokens`-th token of a row."""
        return self.times[min(tokens, len(self.times)) - 1] - self.started if self.times else 0.0


def stop_token_ids(tokenizer: "PreTrainedTokenizerBase", end_of_turn_id: int | None = None) -> list[int]:
    ids = [end_of_turn_id, tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _generate_options(tokenizer: "PreTrainedTokenizerBase", decoding: DecodingConfig,
                      end_of_turn_id: int | None) -> tuple[list[int], dict[str, Any]]:
    """Stop ids and `model.generate` options for `decoding`."""
    stops = stop_token_ids(tokenizer, end_of_turn_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = decoding.temperature > 0
    options: dict[str, Any] = dict(max_new_tokens=decoding.max_new_tokens, do_sample=sampling,
                                   repetition_penalty=decoding.repetition_penalty, eos_token_id=stops,
                                   pad_token_id=pad_id)
    if sampling:
        options.update(temperature=decoding.temperature, top_p=decoding.top_p)
    else:  # silence the model's own sampling defaults, which greedy decoding ignores anyway
        options.update(temperature=None, top_p=None, top_k=None)
    return stops, options


def prompt_ids(tokenizer: "PreTrainedTokenizerBase", template: str, messages: list[dict[str, str]]) -> list[int]:
    """The tokens a model answers after: the messages in `template`, plus the assistant header."""
    return tokenizer.encode(render(tokenizer, template, messages, add_generation_prompt=True), add_special_tokens=False)


def generate(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", template: str,
             prompts: list[list[dict[str, str]]], decoding: DecodingConfig = GREEDY,
             end_of_turn_id: int | None = None, batch_size: int = 8) -> list[Answer]:
    """Answer each prompt (a message list ending with a user turn), in the prompts' order.

    Prompts are batched by length (longest first) so that a batch holds little padding.
    """
    stops, options = _generate_options(tokenizer, decoding, end_of_turn_id)
    encoded = [prompt_ids(tokenizer, template, p) for p in prompts]
    answers: list[Answer | None] = [None] * len(encoded)
    with evaluating(model) as device:
        for rows in length_sorted_batches([len(ids) for ids in encoded], batch_size):
            input_ids = left_pad([encoded[i] for i in rows], options["pad_token_id"]).to(device)
            mask = left_pad([[1] * len(encoded[i]) for i in rows], 0).to(device)
            clock = _StepClock()
            out = model.generate(input_ids=input_ids, attention_mask=mask, stopping_criteria=[clock], **options)
            for index, row in zip(rows, out[:, input_ids.shape[1]:].tolist()):
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                # A cut at max_new_tokens can split a multi-byte character: drop the replacement mark.
                text = tokenizer.decode(row[:cut], skip_special_tokens=True).strip().rstrip("\ufffd")
                new_tokens = min(cut + 1, len(row))
                answers[index] = Answer(text, new_tokens, clock.seconds_until(new_tokens))
    return answers


def stream(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", template: str,
           messages: list[dict[str, str]], decoding: DecodingConfig = GREEDY,
           end_of_turn_id: int | None = None) -> Iterator[str]:
    """Answer one conversation, yielding the text piece by piece as it is generated."""
    import threading

    import torch
    from transformers import TextIteratorStreamer

    _, options = _generate_options(tokenizer, decoding, end_of_turn_id)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids(tokenizer, template, messages)], device=device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            with evaluating(model):
                model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                               **options)
        except BaseException as exc:  # re-raised in the caller's thread below
            failures.append(exc)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    yield from (piece for piece in streamer if piece)
    worker.join()
    if failures:
        raise failures[0]


def save_generation_config(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", end_of_turn_id: int,
                           folder: "str | Path") -> None:
    """Stop at the template's end-of-turn (and eos): the usual cause of endless answers after tuning."""
    generation = model.generation_config
    generation.eos_token_id = stop_token_ids(tokenizer, end_of_turn_id)
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id
    generation.save_pretrained(str(folder))
