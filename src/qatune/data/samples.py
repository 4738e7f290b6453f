"""Conversations -> token rows: chat samples for sft (template, labels, length limit) and packed
plain-text blocks for continued pre-training (pt). Rows are plain dicts until `to_dataset`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from qatune.config import DataConfig
from qatune.data.records import CONTROL_TOKEN, TOO_LONG, Conversation, DropLog
from qatune.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

    from qatune.data.templates import ChatTemplate

COLUMNS = ("input_ids", "labels", "length", "truncated", "source", "location", "messages", "tools")


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


def check_plain_text(convs: list[Conversation]) -> None:
    """Continued pre-training reads documents, not conversations: a Q&A record there is a mistake."""
    for conv in convs:
        if not conv.is_text:
            raise DataError("train.stage=pt trains on plain text, and this record is a conversation", conv.location,
                            hint="give pt sources of format text ({\"text\": ...} records, .txt or .md files), "
                                 "or set train.stage=sft")


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


def to_dataset(rows: list[dict[str, Any]]) -> "Dataset":
    from datasets import Dataset

    return Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS})
