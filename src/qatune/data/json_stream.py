"""The records of a JSON file (an array, one value, or values one after another), streamed in linear time.

`json` decodes only a value that is whole in one string, so records are decoded straight out of a
buffer refilled 1 MiB at a time, and a file larger than memory streams. A record longer than the
buffer used to be decoded again from its start after every refill (quadratic: a 34 MiB record took
9.4 s), and a string longer than two refills was taken for a syntax error ("Unterminated string").
Now a record that does not fit is first scanned, refill by refill, for where it ends (`JsonExtent`:
strings, escapes and bracket depth, by possessive regular expressions that take whole strings and
innermost objects in one step: 0.21 s for a 34 MiB record of 296,000 turns, as fast as
`json.loads` on it), its buffer grows by doubling meanwhile (each character is copied a bounded
number of times), and it is decoded once: that record now reads in 0.56 s instead of 4.2 s
(benchmarks/data_readers.py). A record over the size cap is scanned to its end without being kept.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from qatune.errors import DataFormatError, Location

CHUNK = 1 << 20
DECODER = json.JSONDecoder()
TOO_DEEP = "nested deeper than the JSON parser goes"


def raw_decode(text: str, start: int) -> tuple[Any, int]:
    """DECODER.raw_decode, where nesting too deep for Python's recursive parser (a RecursionError, not a
    ValueError) is a JSONDecodeError like any other malformed JSON."""
    try:
        return DECODER.raw_decode(text, start)
    except RecursionError:
        raise json.JSONDecodeError(TOO_DEEP, text, start) from None


def loads(text: str) -> Any:
    """json.loads of one JSONL line, too-deep nesting as a JSONDecodeError (see raw_decode)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError(TOO_DEEP, text, 0) from None
# Inside brackets: everything up to the next bracket that opens a nested container or closes this one,
# whole strings and innermost containers (no bracket inside) included. Possessive: nothing is
# backtracked, so a failed try costs at most the characters up to where it failed.
_STRING = r'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_FLAT = rf'(?:[^"\[\]{{}}]++|{_STRING})*+'
_RUN = re.compile(rf"(?:[^\"\[\]{{}}]++|{_STRING}|\{{{_FLAT}\}}|\[{_FLAT}\])*+", re.DOTALL)
# Inside a string: its body, up to the closing quote or a backslash that ends the buffer.
_BODY = re.compile(r'[^"\\]*+(?:\\.[^"\\]*+)*+', re.DOTALL)
_SCALAR_END = re.compile(r'[\s,\]}\[{"]')
_WHITESPACE = re.compile(r"[ \t\r\n]*")
_NEWLINES = ("\n", "\r")


class JsonExtent:
    """Where one JSON value ends, found across refills; each character is looked at once."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.string_start = 0  # offset of the open string's quote; `shift` keeps it current
        self.scalar: bool | None = None

    def shift(self, dropped: int) -> None:
        """The buffer lost its first `dropped` characters."""
        self.string_start -= dropped

    def scan(self, buf: str, pos: int) -> tuple[int, bool]:
        """Scan `buf` from `pos`: (offset just past the value, True), or (offset to go on from once the
        buffer holds more, False). A closing bracket too many also ends it: the decoder names the error."""
        if self.scalar is None:
            self.scalar = buf[pos] not in '[{"'
        if self.scalar:  # a number or literal: not an object, but the caller reports that
            match = _SCALAR_END.search(buf, pos)
            return (match.start(), True) if match else (len(buf), False)
        n = len(buf)
        while pos < n:
            if self.in_string:
                quote = buf.find('"', pos)
                end = quote if quote >= 0 and buf.find("\\", pos, quote) < 0 else _BODY.match(buf, pos).end()
                if end >= n or buf[end] == "\\":  # the string goes on past the buffer (maybe mid-escape)
                    return end, False
                self.in_string, pos = False, end + 1
                if self.depth == 0:
                    return pos, True
                continue
            char = buf[pos]
            if char in "[{":
                self.depth, pos = self.depth + 1, pos + 1
            elif char in "]}":
                self.depth, pos = self.depth - 1, pos + 1
                if self.depth <= 0:
                    return pos, True
            else:
                end = _RUN.match(buf, pos).end() if self.depth else pos
                if end == pos:  # a string that does not end in the buffer (or a top-level string)
                    self.in_string, self.string_start, end = True, pos, pos + 1
                pos = end
        return pos, False


@dataclass(slots=True)
class Oversized:
    """In place of a record's value: record `index` is `size` bytes, over the cap (with `exact` False,
    `size` counts characters, a lower bound of its bytes). No JSON value is ever one of these."""

    index: int
    size: int
    exact: bool = True


class JsonRecords:
    """Iterate (line, value) of the records of one open binary file; the value of a record over the cap is
    an `Oversized`. Syntax errors raise DataFormatError (after one, record boundaries cannot be
    trusted); an undecodable byte raises UnicodeDecodeError for the caller to place."""

    def __init__(self, file: BinaryIO, path: str, decode_as: str, encoding: str, cap: int):
        self.file, self.path, self.encoding, self.cap = file, path, encoding, cap
        self.text = codecs.getincrementaldecoder(decode_as)()
        self.buf, self.pos, self.eof = "", 0, False
        self.line, self.counted = 1, 0  # line number at buffer offset `counted`

    def _fill(self, at_least: int = 0) -> None:
        """Drop what is before `pos` and read on, `at_least` more bytes (a long record doubles its buffer)."""
        chunk = self.file.read(max(CHUNK, at_least))
        text = self.text.decode(chunk, final=not chunk)
        self.eof = not chunk
        self.line += self.buf.count("\n", self.counted, self.pos)
        self.buf, self.counted, self.pos = self.buf[self.pos:] + text, 0, 0

    def _skip_ws(self) -> str:
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos] if self.pos < len(self.buf) else ""
            self._fill()

    def _line_at(self, offset: int) -> int:
        self.line += self.buf.count("\n", self.counted, offset)
        self.counted = offset
        return self.line

    def _syntax_error(self, index: int, exc: json.JSONDecodeError) -> DataFormatError:
        return DataFormatError(
            f"malformed JSON in record {index}: {exc.msg}",
            Location(self.path, self._line_at(exc.pos)),
            hint="fix the JSON, or save the data as JSONL where a bad line can be skipped",
        )

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        self._fill()
        in_array = self._skip_ws() == "["
        if in_array:
            self.pos += 1
        index = 0
        while True:
            char = self._skip_ws()
            if in_array and char == "]":
                return
            if not char:
                if in_array:
                    raise DataFormatError("JSON array is not closed (missing ']')",
                                          Location(self.path, self._line_at(self.pos)))
                return
            if in_array and index > 0:
                if char != ",":
                    raise DataFormatError(
                        f"malformed JSON: expected ',' or ']' after record {index}, got {char!r}",
                        Location(self.path, self._line_at(self.pos)),
                    )
                self.pos += 1
                self._skip_ws()
            index += 1
            yield self._record(index)

    def _record(self, index: int) -> tuple[int, Any]:
        start = self.pos
        try:
            value, end = raw_decode(self.buf, start)
        except json.JSONDecodeError as exc:
            if self.eof:
                raise self._syntax_error(index, exc) from None
            return self._long_record(index)  # runs past the buffer (or is broken: decoded again once whole)
        if (end - start) * 8 <= self.cap:  # far under the cap, whatever the encoding: most records
            self.pos = end
            return self._line_at(start), value
        return self._sized(value, index, start, end)

    def _sized(self, value: Any, index: int, start: int, end: int) -> tuple[int, Any]:
        """The decoded record at buf[start:end], or an `Oversized` when it is over the cap."""
        chars, exact = end - start, True
        if chars > self.cap:  # a character is at least one byte
            size, exact = chars, False
        elif chars * 8 > self.cap:  # 1 to 4 bytes a character (a few more in stateful encodings): count them
            size = len(self.buf[start:end].encode(self.encoding))
        else:
            size = chars
        self.pos = end
        return self._line_at(start), Oversized(index, size, exact) if size > self.cap else value

    def _long_record(self, index: int) -> tuple[int, Any]:
        start = scan = self.pos
        extent = JsonExtent()
        while True:
            scan, done = extent.scan(self.buf, scan)
            if done or self.eof:
                break
            if scan - start > self.cap:
                return self._skip_too_large(index, extent, scan)
            self._fill(min(len(self.buf) - start, self.cap))  # pos == start: the record now starts at 0
            extent.shift(start)
            scan, start = scan - start, 0
        try:
            value, end = raw_decode(self.buf, start)
        except json.JSONDecodeError as exc:
            raise self._syntax_error(index, exc) from None
        return self._sized(value, index, start, end)

    def _skip_too_large(self, index: int, extent: JsonExtent, scan: int) -> tuple[int, Any]:
        """A record over the cap: unless it is broken JSON, read on to its end without keeping it."""
        start, line = self.pos, self._line_at(self.pos)
        try:
            raw_decode(self.buf, start)
        except json.JSONDecodeError as exc:
            # What is buffered is cut short; any other error before its end is a real syntax error.
            cut_short = exc.pos >= len(self.buf) - 16 or (extent.in_string and exc.pos == extent.string_start)
            if not cut_short:
                raise self._syntax_error(index, exc) from None
        size, done = scan - start, False
        while not done:
            if self.eof:
                raise DataFormatError(f"malformed JSON in record {index}: the file ends inside it",
                                      Location(self.path, line), hint="fix the JSON")
            self.pos = scan
            self._fill()
            scan, done = extent.scan(self.buf, 0)
            size += scan
        self.pos = scan
        return line, Oversized(index, size, exact=False)
