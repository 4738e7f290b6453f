"""Conversations -> token rows: chat samples for sft (template, labels, length limit), packed
plain-text blocks for continued pre-training (pt), and preference rows (dpo/orpo/simpo pairs, kto's
labelled answers). Rows are plain dicts until `to_dataset`."""

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
PREFERENCE_STAGES = ("dpo", "kto", "orpo", "simpo")  # train.stage values whose data is preference rows


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


def check_stage_fits(convs: list[Conversation], stage: str) -> None:
    """Preference records go to preference stages, and those stages need them: a mismatch names the record."""
    for conv in convs:
        paired, labelled = conv.rejected is not None, conv.label is not None
        if stage not in PREFERENCE_STAGES and (paired or labelled):
            raise DataError(f"train.stage={stage} trains on conversations, and this record is "
                            f"{'a preference pair' if paired else 'a KTO example (label)'}", conv.location,
                            hint="set train.stage=dpo (or orpo, simpo; kto for labelled answers), or give "
                                 "chosen answers as plain conversations")
        if stage in PREFERENCE_STAGES and not paired and not (labelled and stage == "kto"):
            what = "chosen and rejected answers" + (" or a label" if stage == "kto" else "")
            raise DataError(f"train.stage={stage} needs {what}, and this record has none", conv.location,
                            hint="give {question|prompt|messages, chosen, rejected} records"
                                 + (" or {messages, label}" if stage == "kto" else "")
                                 + "; `qatune data feedback` makes them from a scored review sheet")


def preference_rows(convs: list[Conversation], tokenizer: Any, template: "ChatTemplate", data: DataConfig,
                    log: DropLog, stage: str) -> list[dict[str, Any]]:
    """Rows TRL's trainers read: the prompt's messages and the answers after it (`chosen`/`rejected`, or for
    kto `completion` with its `label`: a pair gives one desirable and one undesirable row). TRL renders them with
    the training template and masks the prompt as sft does; here each is measured with that template, and one
    whose prompt leaves less than a quarter of max_length for the answer is counted as too long, like sft's."""
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
        if stage != "kto":
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": conv.rejected, **common})
        elif conv.rejected is None:
            rows.append({"prompt": prompt, "completion": chosen, "label": conv.label, **common})
        else:  # a pair is one desirable and one undesirable example (TRL's unpairing)
            rows += [{"prompt": prompt, "completion": chosen, "label": True, **common},
                     {"prompt": prompt, "completion": conv.rejected, "label": False, **common,
                      "messages": prompt + conv.rejected}]
    return rows


def to_dataset(rows: list[dict[str, Any]]) -> "Dataset":
    """The rows' own columns (chat, pt and preference rows differ), COLUMNS for none; pt's `covers` stays out."""
    from datasets import Dataset

    columns = [c for c in rows[0] if c != "covers"] if rows else COLUMNS
    return Dataset.from_dict({c: [r[c] for r in rows] for c in columns})
