"""Errors that tell the user where the problem is and how to fix it.

Every error a user can cause carries its location (file, line or row, record field, config key)
and, where we know one, the fix. The CLI prints `str(error)` and exits without a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Location:
    """Where a record or value came from: `file:line` plus the field inside the record."""

    file: str | None = None
    line: int | None = None
    field: str | None = None
    line_kind: str = "line"  # "line" in text files (JSON, JSONL, CSV), "row" in Parquet

    def __str__(self) -> str:
        parts = []
        if self.file:
            parts.append(self.file)
        if self.line is not None:
            parts.append(f"{self.line_kind} {self.line}")
        if self.field:
            parts.append(f"field '{self.field}'")
        return ", ".join(parts)

    def with_field(self, field: str) -> "Location":
        return Location(self.file, self.line, field, self.line_kind)


class QatuneError(Exception):
    """Base class: a message, an optional location and an optional fix."""

    def __init__(self, message: str, location: Location | None = None, hint: str | None = None):
        self.message = message
        self.location = location
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.location}: {self.message}" if self.location and str(self.location) else self.message
        if self.hint:
            text += f"\n  fix: {self.hint}"
        return text


@dataclass(frozen=True)
class Problem:
    """One config problem found by a rule that reads several sections: the key as the user writes it, what is
    wrong, and the fix. `load_config` gathers every problem before it raises one ConfigError."""

    key: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}; {self.fix}"


class ConfigError(QatuneError):
    """One or more problems in a config file or its overrides, reported together."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        header = f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in the config{where}:"
        super().__init__(header + "".join(f"\n  - {p}" for p in problems))


class DataError(QatuneError):
    """A record or file that cannot be read or understood."""


class DataFormatError(DataError):
    """A record whose fields do not fit its format (missing, mistyped, bad roles)."""


class EmptyFileError(DataError):
    """A data file with no records in it."""


class EncodingError(DataError):
    """A data file that is not in the expected text encoding."""


class MissingColumnError(DataError):
    """A CSV/Parquet file (or a first record) without a column the format needs."""


class TemplateError(QatuneError):
    """A chat template that cannot produce assistant-only labels, or does not fit the tokenizer."""


class ModelLoadError(QatuneError):
    """A model or tokenizer that cannot be found or loaded."""


class GGUFExportError(QatuneError):
    """A model this GGUF writer (export.gguf) or llama.cpp's quantizer (export.llamacpp) cannot express."""
