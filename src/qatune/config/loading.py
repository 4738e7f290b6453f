"""`load_config`: YAML plus `key=value` overrides, every problem reported at once with its line and fix."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from qatune.config import rules
from qatune.config.root import QatuneConfig
from qatune.config.schema import field_at, type_name, valid_keys
from qatune.errors import ConfigError, Problem


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                command: str | None = None) -> QatuneConfig:
    """Read a YAML file (optional), apply `section.key=value` overrides, validate everything at once: each
    field, then the rules across sections (`qatune.config.rules`; with `command`, that command's too)."""
    raw: dict[str, Any] = {}
    lines: dict[tuple, int] = {}
    source = str(path) if path else None
    if path is not None:
        raw, lines = _read_yaml(Path(path))
    problems: list[str] = []
    for item in overrides:
        problem = _apply_override(raw, item)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(problems, source)
    try:
        config = QatuneConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err, lines) for err in exc.errors()]
        problems += [_located(p, lines) for p in rules.problems(_valid_sections(raw), command)]
        raise ConfigError(problems, source) from None
    found = rules.problems(config, command)
    if found:
        raise ConfigError([_located(p, lines) for p in found], source)
    return config


def _valid_sections(raw: dict[str, Any]) -> rules.ValidSections:
    """The sections of `raw` that validate on their own (the others at their defaults would mislead a rule)."""
    valid = {}
    for name in QatuneConfig.model_fields:
        try:
            valid[name] = getattr(QatuneConfig.model_validate({name: raw[name]} if name in raw else {}), name)
        except ValidationError:
            continue
    return rules.ValidSections(valid)


def _located(problem: Problem, lines: dict[tuple, int]) -> str:
    """A rule's problem said like a field's: its key, the key's YAML line where the file has it, what, the fix."""
    line = _line_of(tuple(int(p) if p.isdigit() else p for p in problem.key.split(".")), lines)
    return f"{problem.key}{f' (line {line})' if line else ''}: {problem.message}; {problem.fix}"


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError([f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"], str(path)) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping of sections, got {type(data).__name__}"], str(path))
    lines: dict[tuple, int] = {}
    _index_lines(node, (), lines)
    return data, lines


def _index_lines(node: yaml.Node, path: tuple, out: dict[tuple, int]) -> None:
    """Remember the YAML line of every key so that errors can point at it."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = path + (key_node.value,)
            out[key_path] = key_node.start_mark.line + 1
            _index_lines(value_node, key_path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _index_lines(item, path + (i,), out)


def _apply_override(raw: dict[str, Any], item: str) -> str | None:
    """Set `a.b.c=value` in the raw dict; the value is read as YAML (`3`, `true`, `[a, b]`)."""
    if "=" not in item:
        return f"override '{item}': expected section.key=value"
    key, _, text = item.partition("=")
    parts = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if value is not None and not isinstance(value, str) and _is_text_field(tuple(parts)):
        value = text  # `data.task_tag=[QA]` means the text "[QA]", not a YAML list
    target: Any = raw
    for depth, part in enumerate(parts[:-1]):
        here = tuple(parts[:depth + 1])
        if isinstance(target, list):
            if not isinstance(part, int) or part >= len(target):
                return f"override '{item}': no item {part} in {'.'.join(map(str, parts[:depth]))}"
        elif target.get(part) is None:
            target[part] = {}
        nxt = target[part]
        if isinstance(nxt, str) and _shorthand_key(here):
            nxt = target[part] = {_shorthand_key(here): nxt}  # `model: default`, then model.dtype=...
        if not isinstance(nxt, (dict, list)):
            return f"override '{item}': {'.'.join(map(str, here))} is {nxt!r}, not a section"
        target = nxt
    if isinstance(target, list):
        if not isinstance(parts[-1], int) or parts[-1] >= len(target):
            return f"override '{item}': no item {parts[-1]} in the list"
    target[parts[-1]] = value
    return None


def _shorthand_key(loc: tuple) -> str | None:
    """The key a plain string stands for: `model: x` is model.name_or_path, a source string its path."""
    if loc == ("model",):
        return "name_or_path"
    if len(loc) == 3 and loc[0] == "data" and loc[1].endswith("sources") and isinstance(loc[2], int):
        return "path"
    return None


def _is_text_field(loc: tuple) -> bool:
    info = field_at(loc)
    return info is not None and type_name(info.annotation) in ("string", "string or null")


def _describe(err: dict[str, Any], lines: dict[tuple, int]) -> str:
    """One line per pydantic error: key as written, YAML line, value, expected type, fix."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = ".".join(str(p) for p in loc) or "(top level)"
    line = _line_of(loc, lines)
    where = f"{key}{f' (line {line})' if line else ''}"
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = valid_keys(loc[:-1])
        close = _closest_key(str(loc[-1]), loc[:-1], valid)
        fix = f"did you mean '{close}'?" if close else f"valid keys here: {', '.join(valid)}"
        return f"{where}: unknown key; {fix}"
    if kind == "missing":
        return f"{where}: required key is missing"
    expected = _expected_type(loc)
    value = err.get("input")
    shown = f"{value!r} ({type(value).__name__})"
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ")
    return f"{where}: {msg}; got {shown}" + (f", expected {expected}" if expected else "")


def _line_of(loc: tuple, lines: dict[tuple, int]) -> int | None:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _closest_key(key: str, parent: tuple, valid: list[str]) -> str | None:
    """The valid key nearest to a misspelt one, looking one section deeper too (`clean.ngram`)."""
    candidates = {k: k for k in valid}
    for k in valid:
        for sub in valid_keys(parent + (k,)):
            candidates.setdefault(sub, f"{k}.{sub}")
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return candidates[close[0]] if close else None


def _expected_type(loc: tuple) -> str | None:
    info = field_at(loc)
    return type_name(info.annotation) if info is not None and not isinstance(loc[-1], int) else None

