"""Stream records out of JSON, JSONL, CSV/TSV and Parquet files, each with its line or row.

A plain .txt or .md file is one `text` record (a document for `train.stage: pt`).

Nothing here loads a whole file: JSONL and CSV go line by line, JSON arrays are decoded one
element at a time from a buffer (`json_stream`: linear in the record's size however long it is),
Parquet batch by batch. A record that cannot be read comes out as a `RawRecord` with `error` set,
so the caller decides to stop (`on_error: raise`) or to count and skip it. Data is only ever parsed
as JSON/CSV/Parquet: never executed or unpickled.

Every record (a JSON value, a JSONL line, a CSV or Parquet row) is capped at `max_record_bytes`
(data.max_record_bytes): a longer one is a `RecordTooLargeError` naming file, record and key. In
JSON, JSONL and CSV it is read to its end without being kept, so one huge record cannot exhaust
memory, and reading goes on after it.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from qatune.data.json_stream import CHUNK, JsonRecords, Oversized, loads
from qatune.errors import (
    DataError,
    DataFormatError,
    EmptyFileError,
    EncodingError,
    Location,
)

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
# Read as one `text` record each: named directly, or in a folder whose source has `format: text`
# (a folder of Q&A files often holds a README.md that is not training data).
PLAIN_TEXT_SUFFIXES = (".txt", ".md")
REGISTRY_FILE = "dataset_info.json"
MAX_RECORD_BYTES = 16 << 20  # the default of data.max_record_bytes
_NEWLINES = ("\n", "\r")


class RecordTooLargeError(DataError):
    """A record (JSON value, JSONL line, CSV or Parquet row) over data.max_record_bytes."""


@dataclass(slots=True)
class RawRecord:
    """A record as read (`data`), or why it could not be read (`error`), and where it is."""

    location: Location
    data: dict[str, Any] | None = None
    error: DataError | None = None


def data_files(path: str | Path, plain_text: bool = False) -> list[Path]:
    """The data files at `path`: the file itself, or every supported file under a folder, sorted.
    A folder's .txt/.md files count only with `plain_text` (a source of format text)."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES + PLAIN_TEXT_SUFFIXES:
            raise DataError(
                f"unsupported file type '{path.suffix}'",
                Location(str(path)),
                hint=f"use one of {', '.join(SUPPORTED_SUFFIXES + PLAIN_TEXT_SUFFIXES)}",
            )
        return [path]
    suffixes = SUPPORTED_SUFFIXES + (PLAIN_TEXT_SUFFIXES if plain_text else ())
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in suffixes
            and p.name != REGISTRY_FILE
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"folder holds no {', '.join(suffixes)} files", Location(str(path)))
        return files
    raise DataError("no such file or folder", Location(str(path)))


def read_records(path: Path, encoding: str = "utf-8", max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[RawRecord]:
    """Stream the records of one file, each at most `max_record_bytes` (plain text files are not capped).
    An empty file raises EmptyFileError."""
    suffix = path.suffix.lower()
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv, ".parquet": _read_parquet,
              ".txt": _read_plain_text, ".md": _read_plain_text}[suffix]
    if suffix != ".parquet":
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise DataError(f"unknown text encoding '{encoding}'", hint="set data.encoding to e.g. utf-8 or gb18030") from None
    count = 0
    for record in reader(path, encoding, max_record_bytes):
        count += 1
        yield record
    if count == 0:
        raise EmptyFileError("file holds no records", Location(str(path)), hint="remove it or fill it")


def _text_encoding(encoding: str) -> str:
    # A UTF-8 byte-order mark (Windows editors add one) is not part of the first record.
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def _encoding_error(path: Path, line: int, exc: UnicodeDecodeError, encoding: str) -> EncodingError:
    return EncodingError(
        f"not valid {encoding} text (byte {exc.object[exc.start:exc.start + 1]!r} at byte {exc.start + 1} of the line)",
        Location(str(path), line),
        hint="set data.encoding to the file's encoding (e.g. gb18030 for many Chinese files), "
        "or convert it: iconv -f GB18030 -t UTF-8 in > out",
    )


def _first_undecodable_line(path: Path, encoding: str) -> EncodingError:
    """Chunked decoders only know a byte offset: find the exact line again, reading line by line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as exc:
                return _encoding_error(path, number, exc, encoding)
    return EncodingError(f"not valid {encoding} text", Location(str(path)))


def _size(n: int) -> str:
    return f"{n:,} bytes" + (f" ({n / (1 << 20):.1f} MiB)" if n >= 1 << 20 else "")


def _too_large(loc: Location, what: str, size: int, cap: int, at_least: bool = False) -> RecordTooLargeError:
    return RecordTooLargeError(
        f"{what} is {'at least ' if at_least else ''}{_size(size)}, over data.max_record_bytes ({_size(cap)})",
        loc,
        hint="raise data.max_record_bytes if records this large are meant, "
        "or set data.on_error=skip to drop and count them",
    )


def _rest_of_line(f: BinaryIO, piece: bytes) -> int:
    """Read on to the end of the line `piece` began, keeping nothing; the line's length, line break excluded."""
    size = len(piece)
    while not piece.endswith(b"\n") and (piece := f.readline(CHUNK)):
        size += len(piece)
    return size - (len(piece) - len(piece.rstrip(b"\r\n")))


def _read_jsonl(path: Path, encoding: str, cap: int) -> Iterator[RawRecord]:
    first_line_encoding = _text_encoding(encoding)  # a byte-order mark can only start the first line
    with open(path, "rb") as f:
        number = index = 0
        # A line is read whole only up to the cap (+ its line break), so one huge line cannot exhaust memory.
        while raw := f.readline(cap + 3):
            number += 1
            loc = Location(str(path), number)
            if len(raw) == cap + 3 and not raw.endswith(b"\n"):
                index += 1
                yield RawRecord(loc, error=_too_large(loc, f"record {index}", _rest_of_line(f, raw), cap))
                continue
            try:
                line = raw.decode(first_line_encoding if number == 1 else encoding)
            except UnicodeDecodeError as exc:
                yield RawRecord(loc, error=_encoding_error(path, number, exc, encoding))
                continue
            if not line.strip():
                continue
            index += 1
            if (size := len(raw.rstrip(b"\r\n"))) > cap:
                yield RawRecord(loc, error=_too_large(loc, f"record {index}", size, cap))
                continue
            try:
                data = loads(line)
            except json.JSONDecodeError as exc:
                yield RawRecord(loc, error=DataFormatError(f"malformed JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}", loc))
                continue
            yield _as_object(data, loc)


def _read_plain_text(path: Path, encoding: str, cap: int) -> Iterator[RawRecord]:
    # A document for `train.stage: pt` is one record of any size, as before the cap (pt packs it into blocks).
    raw = path.read_bytes()
    if not raw.strip():
        return
    try:
        text = raw.decode(_text_encoding(encoding))
    except UnicodeDecodeError:
        yield RawRecord(Location(str(path), 1), error=_first_undecodable_line(path, encoding))
        return
    yield RawRecord(Location(str(path), 1), data={"text": text})


def _as_object(data: Any, loc: Location) -> RawRecord:
    if not isinstance(data, dict):
        return RawRecord(loc, error=DataFormatError(f"expected a JSON object, got {type(data).__name__}", loc))
    return RawRecord(loc, data=data)


def _read_json(path: Path, encoding: str, cap: int) -> Iterator[RawRecord]:
    """A JSON array of objects, one object, or objects one after another (JSONL saved as .json).

    A syntax error inside an array stops the file: after it, record boundaries cannot be trusted, so
    skipping would lose records silently. A record over the cap is reported and reading goes on.
    """
    with open(path, "rb") as f:
        try:
            for line, value in JsonRecords(f, str(path), _text_encoding(encoding), encoding, cap):
                loc = Location(str(path), line)
                if isinstance(value, Oversized):
                    error = _too_large(loc, f"record {value.index}", value.size, cap, at_least=not value.exact)
                    yield RawRecord(loc, error=error)
                else:
                    yield _as_object(value, loc)
        except UnicodeDecodeError:
            raise _first_undecodable_line(path, encoding) from None


class _CsvLines:
    """The lines csv.reader reads, one physical line each, with every row kept under `cap` characters.

    A row over it is read on to its end (a line break after an even number of quotes) without being
    kept, and csv.reader is handed a line that closes the row it is in; `end_row` then reports it.
    Each row's size is counted in bytes of `encoding` (line breaks excluded) where it could be near the
    cap. For CSV whose quotes are unbalanced, a row over the cap may end elsewhere than csv would end it.
    """

    def __init__(self, text: io.TextIOBase, encoding: str, cap: int):
        self.text, self.encoding, self.cap = text, encoding, cap
        self.line = 0  # physical lines read
        self.parts: list[str] = []  # the current row's lines
        self.chars = self.quotes = self.dropped = 0  # `dropped`: size of a row read past, 0 if none

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        line = self.text.readline(self.cap - self.chars + 3)
        if not line:
            raise StopIteration
        self.line += 1
        size = self.chars + len(line.rstrip("\r\n"))
        if size <= self.cap:
            self.parts.append(line)
            self.chars, self.quotes = size, self.quotes + line.count('"')
            return line
        quotes, piece = self.quotes + line.count('"'), line
        while not (piece.endswith(_NEWLINES) and quotes % 2 == 0):
            previous, piece = piece, self.text.readline(CHUNK)
            if not piece:
                break
            if previous.endswith(_NEWLINES) and not (previous.endswith("\r") and piece.startswith("\n")):
                self.line += 1
            size, quotes = size + len(piece.rstrip("\r\n")), quotes + piece.count('"')
        self.dropped = size
        return '"\n' if self.quotes % 2 else "\n"  # inside a quoted field, close it first

    def end_row(self) -> int:
        """The size of the row csv.reader just returned; the count starts again for the next row."""
        if self.dropped:
            size = self.dropped
        elif self.chars * 8 > self.cap:  # 1 to 4 bytes a character (a few more in stateful encodings)
            size = sum(len(part.rstrip("\r\n").encode(self.encoding)) for part in self.parts)
        else:
            size = self.chars
        self.parts, self.chars, self.quotes, self.dropped = [], 0, 0, 0
        return size


def _read_csv(path: Path, encoding: str, cap: int) -> Iterator[RawRecord]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(1 << 30)  # the default 128 KiB per field is too small for long answers
    with open(path, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding=_text_encoding(encoding), newline="")
        lines = _CsvLines(text, encoding, cap)
        reader = csv.reader(lines, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            if (size := lines.end_row()) > cap:
                raise _too_large(Location(str(path), lines.line), "the header row", size, cap)
            number = 0
            for row in reader:
                size = lines.end_row()
                loc = Location(str(path), lines.line, line_kind="line")
                if size <= cap and not any(cell.strip() for cell in row):
                    continue
                number += 1
                if size > cap:
                    yield RawRecord(loc, error=_too_large(loc, f"row {number}", size, cap))
                    continue
                if len(row) != len(header):
                    yield RawRecord(
                        loc,
                        error=DataFormatError(f"row has {len(row)} fields, the header has {len(header)}", loc),
                    )
                    continue
                yield RawRecord(loc, data=dict(zip(header, row)))
        except UnicodeDecodeError:
            raise _first_undecodable_line(path, encoding) from None
        except csv.Error as exc:
            raise DataFormatError(f"malformed CSV: {exc}", Location(str(path), lines.line)) from None


def _value_bytes(value: Any, exact: bool) -> int:
    """A Parquet value's size as UTF-8; with `exact` False, an upper bound that needs no encoding."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode()) if exact else 4 * len(value)
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, dict):
        return sum(_value_bytes(v, exact) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_value_bytes(v, exact) for v in value)
    return 8  # a number, bool, date or null


def _read_parquet(path: Path, encoding: str, cap: int) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"not a readable Parquet file: {exc}", Location(str(path))) from None
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for data in batch.to_pylist():
            row += 1
            loc = Location(str(path), row, line_kind="row")
            if _value_bytes(data, exact=False) > cap and (size := _value_bytes(data, exact=True)) > cap:
                yield RawRecord(loc, error=_too_large(loc, f"row {row}", size, cap))
                continue
            yield RawRecord(loc, data=data)
