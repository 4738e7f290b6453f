"""Stream records out of JSON, JSONL, CSV/TSV and Parquet files, each with its line or row.

A plain .txt or .md file is one `text` record (a document for `train.stage: pt`).

Nothing here loads a whole file: JSONL and CSV go line by line, JSON arrays are decoded one
element at a time from a growing buffer, Parquet batch by batch. A record that cannot be read
comes out as a `RawRecord` with `error` set, so the caller decides to stop (`on_error: raise`) or
to count and skip it. Data is only ever parsed as JSON/CSV/Parquet: never executed or unpickled.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
_CHUNK = 1 << 20


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


def read_records(path: Path, encoding: str = "utf-8") -> Iterator[RawRecord]:
    """Stream the records of one file. An empty file raises EmptyFileError."""
    suffix = path.suffix.lower()
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv, ".parquet": _read_parquet,
              ".txt": _read_plain_text, ".md": _read_plain_text}[suffix]
    if suffix != ".parquet":
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise DataError(f"unknown text encoding '{encoding}'", hint="set data.encoding to e.g. utf-8 or gb18030") from None
    count = 0
    for record in reader(path, encoding):
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


def _read_jsonl(path: Path, encoding: str) -> Iterator[RawRecord]:
    first_line_encoding = _text_encoding(encoding)  # a byte-order mark can only start the first line
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            loc = Location(str(path), number)
            try:
                line = raw.decode(first_line_encoding if number == 1 else encoding)
            except UnicodeDecodeError as exc:
                yield RawRecord(loc, error=_encoding_error(path, number, exc, encoding))
                continue
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                yield RawRecord(loc, error=DataFormatError(f"malformed JSON: {exc.msg} at column {exc.colno}", loc))
                continue
            yield _as_object(data, loc)


def _read_plain_text(path: Path, encoding: str) -> Iterator[RawRecord]:
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


def _read_json(path: Path, encoding: str) -> Iterator[RawRecord]:
    """A JSON array of objects, one object, or objects one after another (JSONL saved as .json).

    Decoded element by element from a buffer refilled in 1 MiB chunks, so a file larger than
    memory streams. A syntax error inside an array stops the file: after it, record boundaries
    cannot be trusted, so skipping would lose records silently.
    """
    decoder = json.JSONDecoder()
    text_decoder = codecs.getincrementaldecoder(_text_encoding(encoding))()
    with open(path, "rb") as f:
        buf, pos, eof = "", 0, False
        line, counted = 1, 0  # line number at buffer offset `counted`

        def fill() -> None:
            nonlocal buf, pos, eof, line, counted
            chunk = f.read(_CHUNK)
            try:
                text = text_decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError:
                raise _first_undecodable_line(path, encoding) from None
            eof = not chunk
            line += buf.count("\n", counted, pos)
            buf, counted, pos = buf[pos:] + text, 0, 0

        def skip_ws() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof:
                    return buf[pos] if pos < len(buf) else ""
                fill()

        def line_at(offset: int) -> int:
            nonlocal line, counted
            line += buf.count("\n", counted, offset)
            counted = offset
            return line

        fill()
        first = skip_ws()
        in_array = first == "["
        if in_array:
            pos += 1
        index = 0
        while True:
            char = skip_ws()
            if in_array and char == "]":
                return
            if not char:
                if in_array:
                    raise DataFormatError("JSON array is not closed (missing ']')", Location(str(path), line_at(pos)))
                return
            if in_array and index > 0:
                if char != ",":
                    raise DataFormatError(
                        f"malformed JSON: expected ',' or ']' after record {index}, got {char!r}",
                        Location(str(path), line_at(pos)),
                    )
                pos += 1
                skip_ws()
            start, last_rel = pos, None
            while True:
                try:
                    value, end = decoder.raw_decode(buf, start)
                    break
                except json.JSONDecodeError as exc:
                    # Ran off the end of the buffer: read more and retry. The same error at the same
                    # place in the record after more data is a real syntax error.
                    rel = exc.pos - start
                    if eof or rel == last_rel:
                        raise DataFormatError(
                            f"malformed JSON in record {index + 1}: {exc.msg}",
                            Location(str(path), line_at(exc.pos)),
                            hint="fix the JSON, or save the data as JSONL where a bad line can be skipped",
                        ) from None
                    last_rel = rel
                    fill()  # pos == start, so the record now begins at offset 0
                    start = 0
            index += 1
            yield _as_object(value, Location(str(path), line_at(start)))
            pos = end


def _read_csv(path: Path, encoding: str) -> Iterator[RawRecord]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(1 << 30)  # the default 128 KiB per field is too small for long answers
    with open(path, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding=_text_encoding(encoding), newline="")
        reader = csv.reader(text, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            for row in reader:
                loc = Location(str(path), reader.line_num, line_kind="line")
                if not any(cell.strip() for cell in row):
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
            raise DataFormatError(f"malformed CSV: {exc}", Location(str(path), reader.line_num)) from None


def _read_parquet(path: Path, encoding: str) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"not a readable Parquet file: {exc}", Location(str(path))) from None
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for data in batch.to_pylist():
            row += 1
            yield RawRecord(Location(str(path), row, line_kind="row"), data=data)
