"""Record formats -> Conversation. Each converter names the field it cannot use.

Formats: alpaca (`instruction`/`input`/`output`, optional `system`/`history`), qa
(`question`/`answer`), input_target (`input`/`target`), sharegpt (`conversations` of
`{from, value}`, roles human/gpt/system/function_call/observation), messages (`messages` of
`{role, content}`), text (`text`, for continued pre-training). `columns` renames fields. Chinese
headers are recognised without `columns`: 问题/提问 as question, 答案/回答 as answer, 指令 as
instruction, 输入 as input, 输出 as output (`COLUMN_ALIASES`), wherever the English name is absent.

Preference data: preference (`chosen` and `rejected`, each a text, a message or a list of assistant
messages, after a prompt given as `question`, `prompt` (text or messages), `messages`/`conversations`, or
alpaca's `instruction`/`input`/`history`: LLaMA-Factory's ranking sets and TRL's conversational pairs),
and the formats training stages add (a labelled answer: see `qatune.plugins.PLUGINS["format"]`).

Each format is a `RecordFormat` named in the plug-in table; `auto` tries them in the table's order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from qatune import plugins
from qatune.config import SharegptTags, SourceConfig
from qatune.data.records import Conversation
from qatune.errors import DataFormatError, Location, MissingColumnError

Converter = Callable[[dict[str, Any], SourceConfig, str, Location], Conversation]
TURN_FIELDS = {"messages", "conversations"}  # either holds a conversation's turns


@dataclass(frozen=True)
class RecordFormat:
    """A record format: the fields it reads, how it converts a record, how `auto` recognises it."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    convert: Converter
    # Whether a first record with these fields (after `columns` renames) is of this format; None: `required` present
    recognise: Callable[[set[str], dict[str, Any], SourceConfig], bool] | None = None
    either_turn_field: bool = False  # `messages` or `conversations` stands for the other in `required`
    dataset_info_column: str | None = None  # the LLaMA-Factory dataset_info.json column that marks this format

    def recognises(self, present: set[str], record: dict[str, Any], source: SourceConfig) -> bool:
        if self.recognise is not None:
            return self.recognise(present, record, source)
        return set(self.required) <= present


def record_formats() -> dict[str, RecordFormat]:
    """Every record format by name, in the order `auto` tries them."""
    return plugins.loaded("format")


# Column names read as a field when the file has no column of the field's own name and `columns` maps none:
# the headers Chinese Q&A tables are written with (CSV, Parquet, JSON keys alike).
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "question": ("问题", "提问"), "answer": ("答案", "回答"),
    "instruction": ("指令",), "input": ("输入",), "output": ("输出",),
}

PROMPT_FIELDS = ("messages", "conversations", "instruction", "question", "prompt")  # a pair's prompt, in order


def detect_format(record: dict[str, Any], source: SourceConfig, loc: Location) -> str:
    """Pick the format from the first record's keys (after `columns` renames)."""
    if source.format != "auto":
        return source.format
    formats = record_formats()
    fields = {f for fmt in formats.values() for f in fmt.required + fmt.optional}
    present = {field for field in fields if field_column(source, field, record) in record}
    for fmt in formats.values():
        if fmt.recognises(present, record, source):
            return fmt.name
    expected = "; ".join(f"{fmt.name}: {', '.join(fmt.required)}" for fmt in formats.values())
    raise MissingColumnError(
        f"cannot tell the format from the fields {sorted(record)}; expected one of [{expected}]",
        loc,
        hint="set `format:` on the source, and `columns:` to map your field names, e.g. "
        "columns: {question: ask, answer: reply}",
    )


def check_columns(columns: list[str], fmt: str, source: SourceConfig, loc: Location) -> None:
    """A table (CSV/Parquet) must have every required column of its format before any row is read."""
    spec = record_formats()[fmt]
    missing = [field_column(source, f, columns) for f in spec.required if field_column(source, f, columns) not in columns]
    if spec.either_turn_field and missing and (TURN_FIELDS & set(columns)):
        missing = [m for m in missing if m not in {field_column(source, f, columns) for f in TURN_FIELDS}]
    if missing:
        raise MissingColumnError(
            f"no column {', '.join(repr(m) for m in missing)} needed by format '{fmt}'; the file has {columns}",
            loc,
            hint="rename the column, or map it with `columns:` on the source",
        )


def to_conversation(fmt: str, record: dict[str, Any], source: SourceConfig, name: str, loc: Location) -> Conversation:
    """Convert one record; raises DataFormatError naming the field at fault."""
    return plugins.load("format", fmt).convert(record, source, name, loc)


def field_column(source: SourceConfig, field: str, present: Collection[str] = ()) -> str:
    """The column that holds `field`: the one `columns` maps it to, else its own name, else (when `present`,
    the record's keys or the table's header, lacks that) the first of its Chinese aliases present."""
    if field in source.columns:
        return source.columns[field]
    if field in present:
        return field
    return next((alias for alias in COLUMN_ALIASES.get(field, ()) if alias in present), field)


def _text(record: dict[str, Any], source: SourceConfig, field: str, loc: Location, required: bool = True) -> str:
    column = field_column(source, field, record)
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
    history_field = field_column(source, "history", record)
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


def from_turns(record: dict[str, Any], source: SourceConfig, name: str, loc: Location, sharegpt: bool) -> Conversation:
    field = field_column(source, "conversations" if sharegpt else "messages")
    if sharegpt and field not in record and field_column(source, "messages") in record:
        field = field_column(source, "messages")
    turns = record.get(field)
    if turns is None:
        raise DataFormatError("required field is missing", loc.with_field(field))
    if not isinstance(turns, list) or not turns:
        raise DataFormatError("expected a non-empty list of turns", loc.with_field(field))
    messages = _turns(turns, source.tags if sharegpt else _ROLE_CONTENT, field, loc)
    system = _text(record, source, "system", loc, required=False) if sharegpt else ""
    messages = _with_system(system, messages)
    _check_turn_order(messages, loc.with_field(field))
    tools = record.get(field_column(source, "tools"))
    return Conversation(messages, name, loc, tools=_tools(tools, loc.with_field(field_column(source, "tools"))))


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


def tags_of(turns: Any, source: SourceConfig) -> SharegptTags:
    """sharegpt's tags when the turns are written `{from, value}` (the source's role_tag), else role/content."""
    first = turns[0] if isinstance(turns, list) and turns else turns
    return source.tags if isinstance(first, dict) and source.tags.role_tag in first else _ROLE_CONTENT


def _prompt_turns(record: dict[str, Any], source: SourceConfig, loc: Location) -> list[dict[str, str]]:
    """The prompt of a preference pair: the turns before the answers, as messages ending with the user's."""
    field = next((f for f in PROMPT_FIELDS if field_column(source, f, record) in record), None)
    if field is None:
        raise MissingColumnError(f"a preference pair needs a prompt: one of {', '.join(PROMPT_FIELDS)}", loc,
                                 hint="name the prompt field with `columns:`, e.g. columns: {question: ask}")
    column = field_column(source, field, record)
    value = record[column]
    if field == "instruction":  # LLaMA-Factory's alpaca ranking format
        turns = _from_alpaca({**record, field_column(source, "output", record): "-"}, source, "", loc).messages[:-1]
        return turns
    if isinstance(value, str):
        if not value.strip():
            raise DataFormatError("the prompt is empty", loc.with_field(column))
        turns = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value:
        turns = _turns(value, tags_of(value, source), column, loc)
    else:
        raise DataFormatError("expected the prompt as a text or a non-empty list of turns", loc.with_field(column))
    system = _text(record, source, "system", loc, required=False)
    return turns if turns[0]["role"] == "system" else _with_system(system, turns)


def _answer_turns(record: dict[str, Any], source: SourceConfig, field: str, loc: Location) -> list[dict[str, str]]:
    """`chosen` or `rejected`: a text, one message, or a list of assistant messages."""
    column = field_column(source, field)
    value = record.get(column)
    if value is None:
        raise DataFormatError("required field is missing", loc.with_field(column))
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, list) or not turns:
        raise DataFormatError("expected a text, a message or a list of assistant messages", loc.with_field(column))
    messages = _turns(turns, tags_of(turns, source), column, loc)
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
    tools = record.get(field_column(source, "tools"))
    return Conversation(messages, name, loc, tools=_tools(tools, loc.with_field(field_column(source, "tools"))),
                        rejected=rejected)


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


def _recognise_sharegpt(present: set[str], record: dict[str, Any], source: SourceConfig) -> bool:
    """`conversations`, or `messages` whose turns are written with the source's sharegpt role tag."""
    if "conversations" in present:
        return True
    turns = record[field_column(source, "messages")] if "messages" in present else None
    first = turns[0] if isinstance(turns, list) and turns else {}
    return isinstance(first, dict) and source.tags.role_tag in first


PREFERENCE = RecordFormat("preference", ("chosen", "rejected"),
                          ("question", "prompt", "messages", "conversations", "instruction", "input", "system",
                           "history", "tools"), _from_preference)
SHAREGPT = RecordFormat("sharegpt", ("conversations",), ("system", "tools"),
                        lambda r, s, n, l: from_turns(r, s, n, l, sharegpt=True), _recognise_sharegpt,
                        either_turn_field=True)
MESSAGES = RecordFormat("messages", ("messages",), ("tools",),
                        lambda r, s, n, l: from_turns(r, s, n, l, sharegpt=False))
ALPACA = RecordFormat("alpaca", ("instruction", "output"), ("input", "system", "history"), _from_alpaca)
QA = RecordFormat("qa", ("question", "answer"), ("system",), _pair("question", "answer"))
INPUT_TARGET = RecordFormat("input_target", ("input", "target"), ("system",), _pair("input", "target"))
TEXT = RecordFormat("text", ("text",), (), _from_text)
