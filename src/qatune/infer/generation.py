"""Batched generation with the chat template the model was trained on.

Prompts are rendered with the training template plus the generation prompt, left-padded into
one batch, and stopped at the template's end-of-turn token as well as eos: a fine-tuned model
that learned `<|im_end|>` stops there instead of rambling on.
"""

from __future__ import annotations

import re
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qatune.config import DecodingConfig
from qatune.data.templates import control_tokens, render
from qatune.errors import QatuneError

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
    token_ids: tuple[int, ...] = ()  # the answer's tokens, before the stop token
    stopped: bool = False  # the model ended its turn (a stop token); False: cut at max_new_tokens


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


class ForgedTurnError(QatuneError, ValueError):
    """A message holds a control token that cannot be kept as plain text with this tokenizer or template."""


_CONTROL: "weakref.WeakKeyDictionary[Any, re.Pattern[str]]" = weakref.WeakKeyDictionary()
_SENTINEL = "\ue000qatune-content-{}\ue001"  # private-use marks no template changes and no tokenizer knows


def _control_pattern(tokenizer: "PreTrainedTokenizerBase") -> "re.Pattern[str]":
    try:
        return _CONTROL[tokenizer]
    except KeyError:
        pattern = _CONTROL[tokenizer] = control_tokens(tokenizer)
        return pattern
    except TypeError:  # a tokenizer that cannot be weakly referenced
        return control_tokens(tokenizer)


def prompt_ids(tokenizer: "PreTrainedTokenizerBase", template: str, messages: list[dict[str, str]]) -> list[int]:
    """The tokens a model answers after: the messages in `template`, plus the assistant header.

    Message content is text, never markup: a `<|im_end|>` a user typed is tokenized as the characters
    `<|im_end|>`, not as the control token, so user text cannot close its turn and open a system turn.
    serve, chat, generate and eval all tokenize prompts here. (A template that rewrites the content it
    is given leaves no way to tell its markup from the user's: such a message is refused.)"""
    text = render(tokenizer, template, messages, add_generation_prompt=True)
    pattern = _control_pattern(tokenizer)
    forged = [(i, found.group()) for i, m in enumerate(messages) if (found := pattern.search(m.get("content") or ""))]
    if not forged:
        return tokenizer.encode(text, add_special_tokens=False)
    return _ids_with_content_as_text(tokenizer, template, messages, text, pattern, forged[0])


def _ids_with_content_as_text(tokenizer: "PreTrainedTokenizerBase", template: str, messages: list[dict[str, str]],
                              text: str, pattern: "re.Pattern[str]", first: tuple[int, str]) -> list[int]:
    """`text` tokenized with the template's control tokens as tokens and the messages' content as plain text."""
    marked = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
    skeleton = render(tokenizer, template, marked, add_generation_prompt=True)
    cuts = re.split("(" + "|".join(re.escape(_SENTINEL.format(i)) for i in range(len(messages))) + ")", skeleton)
    order = [int(piece[len("\ue000qatune-content-"):-1]) for piece in cuts[1::2]]
    contents = [messages[i].get("content") or "" for i in order]
    index, token = first
    refused = ForgedTurnError(
        f"message {index} ({messages[index].get('role')}) contains {token!r}, a control token of the tokenizer, "
        "and this chat template does not render the message content as given, so it cannot be kept as text",
        hint=f"remove {token!r} from the message (or use a template that inserts message content unchanged)")
    if sorted(order) != list(range(len(messages))) or \
            "".join(c if k % 2 == 0 else contents[k // 2] for k, c in enumerate(cuts)) != text:
        raise refused
    typed = {tokenizer.convert_tokens_to_ids(t) for c in contents for t in pattern.findall(c)}
    ids: list[int] = []
    plain = ""  # markup text between control tokens, and content, tokenized together as the whole text would be
    for k, piece in enumerate(cuts):
        if k % 2:
            plain += contents[k // 2]
            continue
        last = 0
        for found in pattern.finditer(piece):
            plain += piece[last:found.start()]
            ids += _as_text(tokenizer, plain, typed, refused)
            ids.append(tokenizer.convert_tokens_to_ids(found.group()))
            plain, last = "", found.end()
        plain += piece[last:]
    return ids + _as_text(tokenizer, plain, typed, refused)


def _as_text(tokenizer: "PreTrainedTokenizerBase", text: str, typed: set[int], refused: ForgedTurnError) -> list[int]:
    """Tokens of `text` with none of the control tokens `typed` in the messages: special tokens become characters."""
    if not text:
        return []
    ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    if typed.intersection(ids):  # an added non-special token, which the tokenizer does not split
        raise refused
    return ids


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
                answers[index] = Answer(text, new_tokens, clock.seconds_until(new_tokens), tuple(row[:cut]),
                                        stopped=cut < len(row))
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
