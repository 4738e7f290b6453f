"""Domain documents (.md, .txt, .pdf) cut into chunks that know where they come from.

Markdown is split by its ATX headings (`#` .. `######`, outside code fences) into sections named by
their heading path ("Guide > Dosage"), then by blank lines into paragraphs. Paragraphs of one section
are joined up to a size limit counted in words, where each CJK character counts as one (Chinese has
no spaces); a longer paragraph is cut at sentence ends, and a longer sentence at the limit. A .txt
file is one section without a heading; a PDF (read with pypdf where it is installed) has a section
per page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from qatune.data.clean import cjk_share, text_length, words
from qatune.errors import DataError, Location

DOCUMENT_SUFFIXES = (".md", ".markdown", ".txt", ".pdf")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
# A sentence ends after 。！？；, or after .!?; followed by a space.
_WIDE_PUNCTUATION = re.compile("[\u3000-\u303f\uff00-\uffef]")
_SENTENCE_END = re.compile(r"(?<=[。！？；])|(?<=[.!?;])\s+")


@dataclass(frozen=True)
class Chunk:
    """A piece of a document small enough for one prompt, with its citation."""

    file: str  # relative to the documents folder
    section: str  # heading path, "page 3" in a PDF, "" for a .txt file
    text: str
    lines: tuple[int, int] | None  # first and last line in the file (None in a PDF)

    @property
    def language(self) -> str:
        return "zh" if cjk_share(self.text) > 0.3 else "en"

    @property
    def location(self) -> str:
        where = f" § {self.section}" if self.section else ""
        lines = f" (lines {self.lines[0]}-{self.lines[1]})" if self.lines else ""
        return f"{self.file}{where}{lines}"


@dataclass
class Documents:
    chunks: list[Chunk] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # file -> why it was not read


@dataclass
class _Paragraph:
    text: str
    first: int | None
    last: int | None


def document_files(path: str | Path) -> tuple[list[Path], Path]:
    """The documents at `path` (the file itself, or every document under the folder, sorted) and the
    folder their names are relative to; raises when there is none."""
    root = Path(path).expanduser()
    if root.is_file():
        files, base = [root], root.parent
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        base = root
    else:
        raise DataError("no such file or folder", Location(str(root)))
    if not files:
        raise DataError(f"holds no {', '.join(DOCUMENT_SUFFIXES)} documents", Location(str(root)))
    return files, base


def read_documents(path: str | Path, max_words: int, encoding: str = "utf-8") -> Documents:
    """Every document under `path` (or the file itself), chunked; unreadable files are listed in `skipped`."""
    files, base = document_files(path)
    docs = Documents()
    for file in files:
        name = file.relative_to(base).as_posix()
        docs.files.append(name)
        if file.suffix.lower() == ".pdf":
            sections = _pdf_sections(file, docs.skipped, name)
        else:
            try:
                text = file.read_text(encoding="utf-8-sig" if encoding.lower() in ("utf-8", "utf8") else encoding)
            except UnicodeDecodeError:
                raise DataError(f"not valid {encoding} text", Location(str(file)),
                                hint="convert it to UTF-8 (iconv -f GB18030 -t UTF-8), or set data.encoding") from None
            sections = _markdown_sections(text) if file.suffix.lower() != ".txt" else [("", _paragraphs(text, 1))]
        for section, paragraphs in sections:
            docs.chunks += [Chunk(name, section, text, lines) for text, lines in _join(paragraphs, max_words)]
    return docs


def _paragraphs(text: str, first_line: int) -> list[_Paragraph]:
    """Blank-line separated paragraphs with their line numbers (counted from `first_line`)."""
    out: list[_Paragraph] = []
    current: list[str] = []
    start = first_line
    for number, line in enumerate(text.split("\n"), start=first_line):
        if line.strip():
            if not current:
                start = number
            current.append(line.strip())
        elif current:
            out.append(_Paragraph(_glue(current), start, number - 1))
            current = []
    if current:
        out.append(_Paragraph(_glue(current), start, start + len(current) - 1))
    return out


def _glue(lines: list[str]) -> str:
    """Lines of one paragraph: joined with a space in English, with nothing between CJK characters or
    full-width punctuation."""
    text = lines[0]
    for line in lines[1:]:
        text += ("" if _wide(text[-1:]) and _wide(line[:1]) else " ") + line
    return text


def _wide(char: str) -> bool:
    return bool(char) and (cjk_share(char) == 1 or bool(_WIDE_PUNCTUATION.match(char)))


def _markdown_sections(text: str) -> list[tuple[str, list[_Paragraph]]]:
    """(heading path, paragraphs) for each section that has text; the text before the first heading has path ""."""
    sections: list[tuple[str, list[_Paragraph]]] = []
    headings: list[tuple[int, str]] = []
    body: list[str] = []
    body_start = 1
    in_fence = False

    def close() -> None:
        paragraphs = _paragraphs("\n".join(body), body_start)
        if paragraphs:
            sections.append((" > ".join(title for _, title in headings), paragraphs))

    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        if _FENCE.match(line):
            in_fence = not in_fence
        heading = None if in_fence else _HEADING.match(line)
        if heading is None:
            body.append(line)
            continue
        close()
        level = len(heading.group(1))
        headings = [h for h in headings if h[0] < level] + [(level, heading.group(2).strip())]
        body, body_start = [], number + 1
    close()
    return sections


def _pdf_sections(file: Path, skipped: dict[str, str], name: str) -> list[tuple[str, list[_Paragraph]]]:
    try:
        from pypdf import PdfReader
    except ImportError:
        skipped[name] = "reading PDF needs pypdf: pip install 'qatune[pdf]'"
        return []
    try:
        pages = [page.extract_text() or "" for page in PdfReader(str(file)).pages]
    except Exception as exc:  # pypdf raises many kinds on a damaged file; the others still count
        skipped[name] = f"pypdf cannot read it: {exc}"
        return []
    sections = []
    for number, text in enumerate(pages, start=1):
        paragraphs = [_Paragraph(p.text, None, None) for p in _paragraphs(text, 1)]
        if paragraphs:
            sections.append((f"page {number}", paragraphs))
    return sections


def _join(paragraphs: list[_Paragraph], max_words: int) -> list[tuple[str, tuple[int, int] | None]]:
    """Paragraphs of a section joined into chunks of at most max_words (longer ones cut first)."""
    pieces = [piece for p in paragraphs for piece in _cut(p, max_words)]
    chunks: list[tuple[str, tuple[int, int] | None]] = []
    texts: list[str] = []
    first = last = None
    words = 0
    for piece in pieces:
        size = text_length(piece.text)
        if texts and words + size > max_words:
            chunks.append(("\n\n".join(texts), (first, last) if first is not None else None))
            texts, words = [], 0
        if not texts:
            first = piece.first
        texts.append(piece.text)
        last = piece.last
        words += size
    if texts:
        chunks.append(("\n\n".join(texts), (first, last) if first is not None else None))
    return chunks


def _cut(paragraph: _Paragraph, max_words: int) -> list[_Paragraph]:
    """A paragraph longer than max_words as pieces: whole sentences where they fit, else cut at the limit."""
    if text_length(paragraph.text) <= max_words:
        return [paragraph]
    units: list[str] = []
    for sentence in (s for s in _SENTENCE_END.split(paragraph.text) if s and s.strip()):
        if text_length(sentence) <= max_words:
            units.append(sentence.strip())
            continue
        tokens = words(sentence)
        units += [_rejoin(tokens[i:i + max_words]) for i in range(0, len(tokens), max_words)]
    pieces: list[_Paragraph] = []
    current = ""
    for unit in units:
        if current and text_length(current) + text_length(unit) > max_words:
            pieces.append(_Paragraph(current, paragraph.first, paragraph.last))
            current = ""
        current = _rejoin([current, unit]) if current else unit
    if current:
        pieces.append(_Paragraph(current, paragraph.first, paragraph.last))
    return pieces


def _rejoin(parts: list[str]) -> str:
    return _glue([p for p in parts if p])
