"""Record formats -> Conversation. Each converter names the field it cannot use.

Formats: alpaca (`instruction`/`input`/`output`, optional `system`/`history`), qa
(`question`/`answer`), input_target (`input`/`target`), sharegpt (`conversations` of
`{from, value}`, roles human/gpt/system/function_call/observation), messages (`messages` of
`{role, content}`), text (`text`, for continued pre-training). `columns` renames fields.

Preference data: preference (`chosen` and `rejected`, each a text, a message or a list of assistant
messages, after a prompt given as `question`, `prompt` (text or messages), `messages`/`conversations`, or
alpaca's `instruction`/`input`/`history`: LLaMA-Factory's ranking sets and TRL's conversational pairs),
kto (`messages` or `conversations` ending with the answer, and a boolean `label`: desirable or not).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from qatune.config import SharegptTags, SourceConfig
from qatune.data.records import Conversation
from qatune.errors import DataFormatError, Location, MissingColumnError

# The fields each format reads: (required, optional).
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "alpaca": (("instruction", "output"), ("input", "system", "history")),
    "qa": (("question", "answer"), ("system",)),
    "input_target": (("input", "target"), ("system",)),
    "sharegpt": (("conversations",), ("system", "tools")),
    "messages": (("messages",), ("tools",)),
    "text": (("text",), ()),
    "preference": (("chosen", "rejected"), ("question", "prompt", "messages", "conversations", "instruction",
                                            "input", "system", "history", "tools")),
    "kto": (("messages", "label"), ("conversations", "tools")),
}
PROMPT_FIELDS = ("messages", "conversations", "instruction", "question", "prompt")  # a pair's prompt, in order


def detect_format(record: dict[str, Any], source: SourceConfig, loc: Location) -> str:
    """Pick the format from the first record's keys (after `columns` renames)."""
    if source.format != "auto":
        return source.format
    present = {field for field in _all_fields() if _column(source, field) in record}
    if {"chosen", "rejected"} <= present:
        return "preference"
    if "label" in present and present & {"messages", "conversations"}:
        return "kto"
    if "conversations" in present:
        return "sharegpt"
    if "messages" in present:
        turns = record[_column(source, "messages")]
        first = turns[0] if isinstance(turns, list) and turns else {}
        return "sharegpt" if isinstance(first, dict) and source.tags.role_tag in first else "messages"
    for fmt in ("alpaca", "qa", "input_target", "text"):
        if set(FORMAT_FIELDS[fmt][0]) <= present:
            return fmt
    expected = "; ".join(f"{fmt}: {', '.join(req)}" for fmt, (req, _) in FORMAT_FIELDS.items())
    raise MissingColumnError(
        f"cannot tell the format from the fields {sorted(record)}; expected one of [{expected}]",
        loc,
        hint="set `format:` on the source, and `columns:` to map your field names, e.g. "
        "columns: {question: ask, answer: reply}",
    )


def check_columns(columns: list[str], fmt: str, source: SourceConfig, loc: Location) -> None:
    """A table (CSV/Parquet) must have every required column of its format before any row is read."""
    missing = [_column(source, f) for f in FORMAT_FIELDS[fmt][0] if _column(source, f) not in columns]
    if fmt in ("sharegpt", "kto") and missing and ({"messages", "conversations"} & set(columns)):
        missing = [m for m in missing if m not in (_column(source, "messages"), _column(source, "conversations"))]
    if missing:
        raise MissingColumnError(
            f"no column {', '.join(repr(m) for m in missing)} needed by format '{fmt}'; the file has {columns}",
            loc,
            hint="rename the column, or map it with `columns:` on the source",
        )


def to_conversation(fmt: str, record: dict[str, Any], source: SourceConfig, name: str, loc: Location) -> Conversation:
    """Convert one record; raises DataFormatError naming the field at fault."""
    return _CONVERTERS[fmt](record, source, name, loc)


def _all_fields() -> set[str]:
    return {f for req, opt in FORMAT_FIELDS.values() for f in req + opt}


def _column(source: SourceConfig, field: str) -> str:
    return source.columns.get(field, field)


def _text(record: dict[str, Any], source: SourceConfig, field: str, loc: Location, required: bool = True) -> str:
    column = _column(source, field)
    value = record.get(column)
    if value is None:
        if required:
            raise DataFormatError("required field is missing", loc.with_field(column))
        return ""
    if not isinstance(value, str):
        raise DataFormatError(f"expected a string, got {type(value).__name__} {value!r:.60}", loc.with_field(column))
    return value


def _with_system(system: str, turns: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system.strip() else []) + turns


def _from_alpaca(record: dict[str, Any], source: SourceConfig, name: str, loc: Location) -> Conversation:
    instruction = _text(record, source, "instruction", loc)
    query = _text(record, source, "input", loc, required=False)
    prompt = f"{instruction}\n{query}" if query.strip() else instruction  # LLaMA-Factory joins them so
    turns: list[dict[str, str]] = []
    history_field = _column(source, "history")
    history = record.get(history_field) or []
    if not isinstance(history, list):
        raise DataFormatError(f"expected a list of [question, answer] pairs, got {type(history).__name__}",
                              loc.with_field(history_field))
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataFormatError("expected a [question, answer] pair of strings", loc.with_field(f"{history_field}[{i}]"))
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, source, "output", loc)}]
    return Conversation(_with_system(_text(record, source, "system", loc, False), turns), name, loc)


def _pair(question_field: str, answer_field: str) -> Callable[..., Conversation]:
    def convert(record: dict[str, Any], source: SourceConfig, name: str, loc: Location) -> Conversation:
        turns = [
            {"role": "user", "content": _text(record, source, question_field, loc)},
            {"role": "assistant", "content": _text(record, source, answer_field, loc)},
        ]
        return Conversation(_with_system(_text(record, source, "system", loc, False), turns), name, loc)

    return convert


def _from_text(record: dict[str, Any], source: SourceConfig, name: str, loc: Location) -> Conversation:
    return Conversation([{"role": "text", "content": _text(record, source, "text", loc)}], name, loc)


_ROLE_CONTENT = SharegptTags(role_tag="role", content_tag="content", user_tag="user", assistant_tag="assistant",
                             observation_tag="tool", function_tag="function_call")


def _from_turns(record: dict[str, Any], source: SourceConfig, name: str, loc: Location, sharegpt: bool) -> Conversation:
    field = _column(source, "conversations" if sharegpt else "messages")
    if sharegpt and field not in record and _column(source, "messages") in record:
        field = _column(source, "messages")
    turns = record.get(field)
    if turns is None:
        raise DataFormatError("required field is missing", loc.with_field(field))
    if not isinstance(turns, list) or not turns:
        raise DataFormatError("expected a non-empty list of turns", loc.with_field(field))
    messages = _turns(turns, source.tags if sharegpt else _ROLE_CONTENT, field, loc)
    system = _text(record, source, "system", loc, required=False) if sharegpt else ""
    messages = _with_system(system, messages)
    _check_turn_order(messages, loc.with_field(field))
    tools = record.get(_column(source, "tools"))
    return Conversation(messages, name, loc, tools=_tools(tools, loc.with_field(_column(source, "tools"))))


def _turns(turns: list, tags: SharegptTags, field: str, loc: Location) -> list[dict[str, str]]:
    """A list of `{role, content}` (or sharegpt `{from, value}`) turns as qatune's messages."""
    roles = {
        tags.user_tag: "user", tags.assistant_tag: "assistant", tags.system_tag: "system",
        tags.observation_tag: "tool", tags.function_tag: "assistant",
    }
    messages = []
    for i, turn in enumerate(turns):
        where = loc.with_field(f"{field}[{i}]")
        if not isinstance(turn, dict):
            raise DataFormatError(f"expected an object with '{tags.role_tag}' and '{tags.content_tag}'", where)
        role, content = turn.get(tags.role_tag), turn.get(tags.content_tag)
        if role not in roles:
            raise DataFormatError(
                f"unknown role {role!r} in '{tags.role_tag}'; expected one of {sorted(roles)}",
                loc.with_field(f"{field}[{i}].{tags.role_tag}"),
                hint="map your role names with `tags:` on the source (user_tag, assistant_tag, ...)",
            )
        if not isinstance(content, str):
            raise DataFormatError(f"expected a string, got {type(content).__name__}",
                                  loc.with_field(f"{field}[{i}].{tags.content_tag}"))
        messages.append({"role": roles[role], "content": content})
    return messages


def _tags_of(turns: Any, source: SourceConfig) -> SharegptTags:
    """sharegpt's tags when the turns are written `{from, value}` (the source's role_tag), else role/content."""
    first = turns[0] if isinstance(turns, list) and turns else turns
    return source.tags if isinstance(first, dict) and source.tags.role_tag in first else _ROLE_CONTENT


def _prompt_turns(record: dict[str, Any], source: SourceConfig, loc: Location) -> list[dict[str, str]]:
    """The prompt of a preference pair: the turns before the answers, as messages ending with the user's."""
    field = next((f for f in PROMPT_FIELDS if _column(source, f) in record), None)
    if field is None:
        raise MissingColumnError(f"a preference pair needs a prompt: one of {', '.join(PROMPT_FIELDS)}", loc,
                                 hint="name the prompt field with `columns:`, e.g. columns: {question: ask}")
    column = _column(source, field)
    value = record[column]
    if field == "instruction":  # LLaMA-Factory's alpaca ranking format
        turns = _from_alpaca({**record, _column(source, "output"): "-"}, source, "", loc).messages[:-1]
        return turns
    if isinstance(value, str):
        if not value.strip():
            raise DataFormatError("the prompt is empty", loc.with_field(column))
        turns = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value:
        turns = _turns(value, _tags_of(value, source), column, loc)
    else:
        raise DataFormatError("expected the prompt as a text or a non-empty list of turns", loc.with_field(column))
    system = _text(record, source, "system", loc, required=False)
    return turns if turns[0]["role"] == "system" else _with_system(system, turns)


def _answer_turns(record: dict[str, Any], source: SourceConfig, field: str, loc: Location) -> list[dict[str, str]]:
    """`chosen` or `rejected`: a text, one message, or a list of assistant messages."""
    column = _column(source, field)
    value = record.get(column)
    if value is None:
        raise DataFormatError("required field is missing", loc.with_field(column))
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, list) or not turns:
        raise DataFormatError("expected a text, a message or a list of assistant messages", loc.with_field(column))
    messages = _turns(turns, _tags_of(turns, source), column, loc)
    wrong = next((i for i, m in enumerate(messages) if m["role"] != "assistant"), None)
    if wrong is not None:
        raise DataFormatError(f"expected the assistant's answer, got a '{messages[wrong]['role']}' turn",
                              loc.with_field(f"{column}[{wrong}]"),
                              hint="give the prompt in its own field; chosen/rejected hold only the answers")
    return messages


def _from_preference(record: dict[str, Any], source: SourceConfig, name: str, loc: Location) -> Conversation:
    prompt = _prompt_turns(record, source, loc)
    chosen, rejected = (_answer_turns(record, source, field, loc) for field in ("chosen", "rejected"))
    messages = prompt + chosen
    _check_turn_order(messages, loc)
    _check_turn_order(prompt + rejected, loc)
    tools = record.get(_column(source, "tools"))
    return Conversation(messages, name, loc, tools=_tools(tools, loc.with_field(_column(source, "tools"))),
                        rejected=rejected)


_LABELS = {True: True, False: False, "true": True, "false": False, "1": True, "0": False}  # 1 == True, 0 == False


def _from_kto(record: dict[str, Any], source: SourceConfig, name: str, loc: Location) -> Conversation:
    field = "conversations" if _column(source, "conversations") in record else "messages"
    turns = record.get(_column(source, field))
    conv = _from_turns(record, source, name, loc, sharegpt=_tags_of(turns, source) is source.tags)
    column = _column(source, "label")
    value = record.get(column)
    label = _LABELS.get(value.strip().lower() if isinstance(value, str) else value) \
        if isinstance(value, (bool, int, str)) else None
    if label is None:
        raise DataFormatError(f"expected a boolean label (true: the last answer is desirable), got {value!r:.40}",
                              loc.with_field(column))
    conv.label = label
    return conv


def _tools(value: Any, loc: Location) -> list | None:
    """Tool schemas as a list of dicts (LLaMA-Factory stores them as a JSON string)."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"tools is not valid JSON: {exc.msg}", loc) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataFormatError("expected a list of tool schemas (objects)", loc)
    return value


def _check_turn_order(messages: list[dict[str, str]], loc: Location) -> None:
    """System first (optional), then user/tool and assistant turns alternating, ending with the assistant."""
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body:
        raise DataFormatError("conversation has no user or assistant turn", loc)
    for i, message in enumerate(body):
        expected = ("user", "tool") if i % 2 == 0 else ("assistant",)
        if message["role"] not in expected:
            raise DataFormatError(
                f"turn {i + 1} is '{message['role']}', expected {' or '.join(expected)}: turns must alternate "
                "user and assistant after an optional system prompt",
                loc,
            )
    if body[-1]["role"] != "assistant":
        raise DataFormatError("the last turn must be the assistant's (nothing to learn from otherwise)", loc)


_CONVERTERS: dict[str, Callable[..., Conversation]] = {
    "alpaca": _from_alpaca,
    "qa": _pair("question", "answer"),
    "input_target": _pair("input", "target"),
    "sharegpt": lambda r, s, n, l: _from_turns(r, s, n, l, sharegpt=True),
    "messages": lambda r, s, n, l: _from_turns(r, s, n, l, sharegpt=False),
    "text": _from_text,
    "preference": _from_preference,
    "kto": _from_kto,
}
