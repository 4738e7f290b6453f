"""Conversations -> token rows: chat samples (template, labels, length limit), packed plain-text blocks
for continued pre-training, and preference rows (a prompt and its answers). Which builder a dataset
uses is the training stage's choice (`qatune.train.stages`): nothing here knows a stage by name.
Rows are plain dicts until `to_dataset`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from qatune.config import DataConfig
from qatune.data.records import CONTROL_TOKEN, TOO_LONG, Conversation, DropLog

if TYPE_CHECKING:
    from datasets import Dataset

    from qatune.data.templates import ChatTemplate

COLUMNS = ("input_ids", "labels", "length", "truncated", "source", "location", "messages", "tools")
# A preference row from (prompt, chosen answer turns, rejected answer turns or None, label or None, the shared
# fields): the stage decides its columns (pairs, or answers with a label).
PreferenceRow = Callable[[list, list, "list | None", "bool | None", dict[str, Any]], list[dict[str, Any]]]


class SampleBuilder(Protocol):
    """What the data stage asks of the training stage it prepares for (`qatune.train.stages.base.TrainingStage`)."""

    def template(self, tokenizer: Any, data_cfg: DataConfig) -> "ChatTemplate": ...

    def check_records(self, convs: list[Conversation]) -> None: ...

    def make_rows(self, convs: list[Conversation], tokenizer: Any, template: "ChatTemplate", data: DataConfig,
                  log: DropLog) -> list[dict[str, Any]]: ...


def chat_rows(convs: list[Conversation], tokenizer: Any, template: "ChatTemplate", data: DataConfig,
              log: DropLog) -> list[dict[str, Any]]:
    """One row per sample of each conversation; a record with a control token or no room for its
    answer is counted in `log`, not lost silently."""
    from qatune.data.templates import control_token_in, control_tokens, tokenize

    pattern = control_tokens(tokenizer)
    usable = []
    for conv in convs:
        problem = control_token_in(conv, pattern)
        if problem:
            log.add(CONTROL_TOKEN, conv.source, conv.location, problem)
        else:
            usable.append(conv)
    rows = []
    for conv, samples in tokenize(usable, tokenizer, template, data.max_length, data.train_on_prompt):
        if not samples:
            log.add(TOO_LONG, conv.source, conv.location,
                    f"prompt leaves less than a quarter of max_length={data.max_length} for the answer")
            continue
        for sample in samples:
            rows.append({
                "input_ids": sample.input_ids, "labels": sample.labels, "length": len(sample.input_ids),
                "truncated": sample.truncated, "source": conv.source, "location": str(conv.location),
                "messages": conv.messages,
                "tools": json.dumps(conv.tools, ensure_ascii=False) if conv.tools else "",
            })
    return rows


def packed_rows(convs: list[Conversation], tokenizer: Any, max_length: int, batch: int = 256) -> list[dict[str, Any]]:
    """Continued pre-training samples, as LLaMA-Factory's pt stage makes them: every document followed by
    eos, all joined into one token stream and cut into blocks of max_length, labels on every token. No
    padding is wasted on short documents; only the last block may be shorter. A block records the
    document it starts in (`source`, `location`) and every document it covers (`covers`, for the report)."""
    import bisect

    stream: list[int] = []
    starts: list[int] = []  # where each document begins in the stream
    for first in range(0, len(convs), batch):
        texts = [conv.messages[0]["content"] for conv in convs[first:first + batch]]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            starts.append(len(stream))
            stream += ids + [tokenizer.eos_token_id]
    rows = []
    for begin in range(0, len(stream), max_length):
        block = stream[begin:begin + max_length]
        if len(block) < 2:  # a lone final eos has nothing to predict
            continue
        first_doc = bisect.bisect_right(starts, begin) - 1
        last_doc = bisect.bisect_right(starts, begin + len(block) - 1) - 1
        conv = convs[first_doc]
        rows.append({
            "input_ids": block, "labels": list(block), "length": len(block), "truncated": False,
            "source": conv.source, "location": str(conv.location),
            "messages": [{"role": "text", "content": tokenizer.decode(block)}], "tools": "",
            "covers": [(c.source, str(c.location)) for c in convs[first_doc:last_doc + 1]],
        })
    return rows


def paired_row(prompt: list, chosen: list, rejected: list | None, label: bool | None,
               common: dict[str, Any]) -> list[dict[str, Any]]:
    """A (prompt, chosen, rejected) row, as TRL's pairwise trainers read it."""
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected, **common}]


def preference_rows(convs: list[Conversation], tokenizer: Any, template: "ChatTemplate", data: DataConfig,
                    log: DropLog, make_row: PreferenceRow = paired_row) -> list[dict[str, Any]]:
    """Rows TRL's trainers read: the prompt's messages and the answers after it, laid out by `make_row`. TRL
    renders them with the training template and masks the prompt as sft does; here each is measured with that
    template, and one whose prompt leaves less than a quarter of max_length for the answer is counted as too
    long, like sft's."""
    from qatune.data.templates import control_token_in, control_tokens, render

    pattern = control_tokens(tokenizer)
    rows = []
    for conv in convs:
        problem = control_token_in(conv, pattern) or (
            control_token_in(Conversation(conv.rejected, conv.source, conv.location), pattern) if conv.rejected else None)
        if problem:
            log.add(CONTROL_TOKEN, conv.source, conv.location, problem)
            continue
        answers = len(conv.rejected) if conv.rejected is not None else 1
        prompt, chosen = conv.messages[:-answers], conv.messages[-answers:]
        texts = [render(tokenizer, template.source, prompt, add_generation_prompt=True, tools=conv.tools)]
        texts += ["".join(m["content"] + template.end_of_turn for m in turns) for turns in (chosen, conv.rejected or [])]
        prompt_ids, *answer_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) > data.max_length - data.max_length // 4:
            log.add(TOO_LONG, conv.source, conv.location,
                    f"prompt leaves less than a quarter of max_length={data.max_length} for the answer")
            continue
        length = len(prompt_ids) + max(len(ids) for ids in answer_ids)
        common = {"length": min(length, data.max_length), "truncated": length > data.max_length,
                  "answer_tokens": sum(len(ids) for ids in answer_ids),
                  "source": conv.source, "location": str(conv.location), "messages": conv.messages,
                  "tools": json.dumps(conv.tools, ensure_ascii=False) if conv.tools else ""}
        rows += make_row(prompt, chosen, conv.rejected, conv.label, common)
    return rows


def to_dataset(rows: list[dict[str, Any]]) -> "Dataset":
    """The rows' own columns (chat, pt and preference rows differ), COLUMNS for none; pt's `covers` stays out."""
    from datasets import Dataset

    columns = [c for c in rows[0] if c != "covers"] if rows else COLUMNS
    return Dataset.from_dict({c: [r[c] for r in rows] for c in columns})
