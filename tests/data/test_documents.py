"""Documents to chunks: heading paths, paragraphs, line numbers, size limits that hold for Chinese, PDF pages."""

from __future__ import annotations

import pytest

from qatune.data.clean import text_length
from qatune.data.documents import read_documents
from qatune.errors import DataError

GUIDE = """# Guide

Intro paragraph about the guide.

## Dosage

Take one tablet a day.
Do not exceed two.

```
# not a heading inside a fence
```

### Children

Half a tablet.

## Empty

# Appendix
Last words.
"""


def test_markdown_sections_paragraphs_and_lines(tmp_path) -> None:
    (tmp_path / "guide.md").write_text(GUIDE, encoding="utf-8")
    (tmp_path / "notes.txt").write_text("First note.\n\nSecond note.\n", encoding="utf-8")
    (tmp_path / ".hidden.md").write_text("# x\nhidden", encoding="utf-8")
    docs = read_documents(tmp_path, max_words=100)
    assert docs.files == ["guide.md", "notes.txt"]
    got = [(c.file, c.section, c.lines) for c in docs.chunks]
    assert got == [
        ("guide.md", "Guide", (3, 3)),
        ("guide.md", "Guide > Dosage", (7, 12)),  # paragraphs of one section are joined, the fence kept as text
        ("guide.md", "Guide > Dosage > Children", (16, 16)),
        ("guide.md", "Appendix", (21, 21)),  # "Empty" has no text: no chunk
        ("notes.txt", "", (1, 3)),
    ]
    dosage = docs.chunks[1]
    assert dosage.text.startswith("Take one tablet a day. Do not exceed two.") and "# not a heading" in dosage.text
    assert dosage.location == "guide.md § Guide > Dosage (lines 7-12)"


def test_chinese_chunks_stay_within_the_limit_and_cut_at_sentence_ends(tmp_path) -> None:
    sentence = "高血压患者每天应当按时服药并记录血压。"  # 19 characters
    (tmp_path / "指南.md").write_text("# 用药\n\n" + sentence * 6 + "\n", encoding="utf-8")
    docs = read_documents(tmp_path, max_words=40)
    assert [c.section for c in docs.chunks] == ["用药"] * 3
    assert all(text_length(c.text) <= 40 for c in docs.chunks)
    assert all(c.text.endswith("。") and c.language == "zh" for c in docs.chunks)
    assert "".join(c.text for c in docs.chunks) == sentence * 6  # nothing lost, no spaces put between characters


def test_pdf_pages_become_sections(tmp_path) -> None:
    pytest.importorskip("pypdf")
    (tmp_path / "leaflet.pdf").write_bytes(_pdf("Take one tablet a day with water."))
    docs = read_documents(tmp_path, max_words=100)
    assert [(c.section, c.text, c.lines) for c in docs.chunks] == [("page 1", "Take one tablet a day with water.", None)]


def test_missing_or_empty_folder_is_named(tmp_path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_documents(tmp_path / "nope", 100)
    with pytest.raises(DataError, match="holds no"):
        read_documents(tmp_path, 100)


def _pdf(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica, written by hand (no PDF writer needed)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
