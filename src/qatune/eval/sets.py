"""Evaluation sets: question/answer items and multiple-choice items, read with the data stage's readers.

A record with a `choices` field is multiple choice (`question`, `choices` as a list or an
{letter: text} object, `answer` as a letter, a 0-based index or the choice's text); any other
record is read in the data stage's formats (qa, alpaca, sharegpt, messages...) and its last
answer is the reference. A record that cannot be scored is skipped and counted with its reason
and location; a set left with no item is an error.

Control tokens: prompts are tokenized by `infer.generation.prompt_ids`, which keeps a `<|im_end|>`
typed inside a message as text; but reference answers and choices are scored as the training
tokenization reads them, where it would be markup. So once the tokenizer is known,
`drop_control_tokens` skips an item whose text holds one of its control tokens, counted as
`control_token` with its location, as training drops such records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any

from qatune.config import SourceConfig
from qatune.data import clean
from qatune.data.formats import detect_format, to_conversation
from qatune.data.readers import data_files, read_records
from qatune.data.records import CONTROL_TOKEN, MALFORMED, Conversation, DropLog
from qatune.errors import DataError, Location, QatuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Why an evaluation record was skipped (besides the data stage's MALFORMED).
NO_REFERENCE = "no_reference"
BAD_CHOICES = "bad_choices"
BAD_ANSWER = "bad_answer"
SKIP_REASONS = (MALFORMED, NO_REFERENCE, BAD_CHOICES, BAD_ANSWER, CONTROL_TOKEN)


class EvalError(QatuneError):
    """An evaluation that cannot run: no usable item, a model that does not load, a bad review sheet."""


@dataclass
class QAItem:
    """A conversation whose last assistant turn is the reference answer."""

    id: str
    conversation: Conversation

    @property
    def _last(self) -> int:
        return max(i for i, m in enumerate(self.conversation.messages) if m["role"] == "assistant")

    @property
    def prompt(self) -> list[dict[str, str]]:
        return self.conversation.messages[: self._last]

    @property
    def question(self) -> str:
        return next((m["content"] for m in reversed(self.prompt) if m["role"] == "user"), "")

    @property
    def reference(self) -> str:
        return self.conversation.messages[self._last]["content"]


@dataclass
class ChoiceItem:
    id: str
    question: str
    choices: list[str]
    answer: int  # index into choices
    location: str = ""  # file and line, for the skip log


@dataclass
class EvalSet:
    name: str
    role: str  # "domain" or "general" (the forgetting check reads general sets)
    qa: list[QAItem] = field(default_factory=list)
    choice: list[ChoiceItem] = field(default_factory=list)
    skipped: DropLog = field(default_factory=lambda: DropLog(reasons=SKIP_REASONS))
    # preference records (chosen, rejected): (prompt, chosen, rejected), scored by eval.preference; the chosen
    # answer is also the item's reference
    pairs: list[tuple[list[dict[str, str]], str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.qa) + len(self.choice)


def load_eval_set(source: SourceConfig, role: str = "domain", max_items: int | None = None,
                  encoding: str = "utf-8", unicode_form: str = "NFC") -> EvalSet:
    """Read one evaluation source (file or folder); skips are counted in `EvalSet.skipped`."""
    from pathlib import Path

    name = source.name or Path(source.path).stem
    out = EvalSet(name, role)
    for path in data_files(source.path):
        fmt = None
        for raw in islice(read_records(path, encoding), source.max_records):  # as the data stage reads
            if max_items is not None and len(out) >= max_items:
                break
            item_id = f"{path.name}:{raw.location.line}"
            if raw.error is not None:
                out.skipped.add(MALFORMED, name, raw.location, raw.error.message)
                continue
            record = raw.data
            if "choices" in record:
                item = _choice_item(record, item_id, raw.location, out.skipped, name)
                if item is not None:
                    item.question = clean.normalize_text(item.question, unicode_form)
                    out.choice.append(item)
                continue
            try:
                fmt = fmt or detect_format(record, source, raw.location)
                conv = to_conversation(fmt, record, source, name, raw.location)
            except DataError as exc:
                out.skipped.add(MALFORMED, name, exc.location or raw.location, exc.message)
                continue
            clean.normalize(conv, unicode_form)
            if conv.is_text or not any(m["role"] == "assistant" for m in conv.messages):
                out.skipped.add(NO_REFERENCE, name, raw.location, "no assistant answer to compare with")
                continue
            item = QAItem(item_id, conv)
            if not item.reference.strip():
                out.skipped.add(NO_REFERENCE, name, raw.location, "the reference answer is empty")
                continue
            out.qa.append(item)
            if conv.rejected is not None:
                out.pairs.append((item.prompt, item.reference, "\n".join(m["content"] for m in conv.rejected)))
    if not len(out):
        reasons = ", ".join(f"{n} {r}" for r, n in out.skipped.by_reason().items()) or "no records"
        raise EvalError(f"no usable evaluation item ({reasons})", Location(str(source.path)),
                        hint="give question/answer records, or multiple-choice records with question, choices "
                             "and answer")
    return out


def _choice_item(record: dict[str, Any], item_id: str, loc: Location, skipped: DropLog,
                 name: str) -> ChoiceItem | None:
    question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    if isinstance(choices, dict):  # {"A": "...", "B": "..."}
        letters = sorted(choices)
        choices = [choices[k] for k in letters]
    else:
        letters = [chr(ord("A") + i) for i in range(len(choices))] if isinstance(choices, list) else []
    if not isinstance(question, str) or not question.strip():
        skipped.add(MALFORMED, name, loc.with_field("question"), "missing or empty question")
        return None
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        skipped.add(BAD_CHOICES, name, loc.with_field("choices"), "expected at least 2 non-empty strings")
        return None
    index = _answer_index(answer, choices, letters)
    if index is None:
        skipped.add(BAD_ANSWER, name, loc.with_field("answer"),
                    f"{answer!r} is not one of {', '.join(letters)}, a 0-based index or a choice's text")
        return None
    return ChoiceItem(item_id, question, choices, index, str(loc))


def _answer_index(answer: Any, choices: list[str], letters: list[str]) -> int | None:
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < len(choices) else None
    if not isinstance(answer, str):
        return None
    text = answer.strip()
    letter = text.rstrip(".)").upper()
    if letter in [str(x).upper() for x in letters]:
        return [str(x).upper() for x in letters].index(letter)
    return choices.index(text) if text in choices else None


def set_from_conversations(name: str, convs: list[Conversation], role: str = "domain") -> EvalSet:
    """An evaluation set from conversations already read (the training run's held-out split).

    Plain texts (continued pre-training) have no answer to compare and are skipped."""
    out = EvalSet(name, role)
    for i, conv in enumerate(convs):
        if any(m["role"] == "assistant" for m in conv.messages):
            out.qa.append(QAItem(f"{name}:{i}", conv))
        else:
            out.skipped.add(NO_REFERENCE, name, conv.location, "no assistant answer to compare with")
    return out


def drop_control_tokens(eval_set: EvalSet, tokenizer: "PreTrainedTokenizerBase") -> EvalSet:
    """Skip the items whose text holds a control token of `tokenizer` (counted as control_token); returns the set."""
    from qatune.data.templates import control_token_in, control_tokens

    pattern = control_tokens(tokenizer)
    kept_qa = []
    for item in eval_set.qa:
        problem = control_token_in(item.conversation, pattern)
        if problem:
            eval_set.skipped.add(CONTROL_TOKEN, eval_set.name, item.conversation.location, problem)
        else:
            kept_qa.append(item)
    kept_choice = []
    for choice in eval_set.choice:
        found = next((m for m in map(pattern.search, [choice.question, *choice.choices]) if m), None)
        if found:
            eval_set.skipped.add(CONTROL_TOKEN, eval_set.name, choice.location,
                                 f"{found.group()!r} is a control token of the tokenizer")
        else:
            kept_choice.append(choice)
    eval_set.qa, eval_set.choice = kept_qa, kept_choice
    return eval_set
