"""Readers stream every supported file type and name file, line and field for each bad input."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qatune.data.readers import data_files, read_records
from qatune.errors import DataError, DataFormatError, EmptyFileError, EncodingError
from tests.conftest import write_jsonl

QA = [{"question": "头疼怎么办？", "answer": "多休息，多喝水。"}, {"question": "What is a fever?", "answer": "A raised body temperature."}]


def _data(path: Path) -> list[dict]:
    return [r.data for r in read_records(path)]


def test_jsonl_json_array_concatenated_json_csv_tsv_parquet(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", QA)
    (tmp_path / "b.json").write_text(json.dumps(QA, ensure_ascii=False, indent=2), encoding="utf-8")
    (tmp_path / "c.json").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in QA), encoding="utf-8")
    (tmp_path / "d.csv").write_text('question,answer\n头疼怎么办？,"多休息，多喝水。"\nWhat is a fever?,A raised body temperature.\n',
                                    encoding="utf-8")
    (tmp_path / "e.tsv").write_text("question\tanswer\n头疼怎么办？\t多休息，多喝水。\nWhat is a fever?\tA raised body temperature.\n",
                                    encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(QA), tmp_path / "f.parquet")
    for name in ("a.jsonl", "b.json", "c.json", "d.csv", "e.tsv", "f.parquet"):
        assert _data(tmp_path / name) == QA, name
    assert [p.name for p in data_files(tmp_path)] == ["a.jsonl", "b.json", "c.json", "d.csv", "e.tsv", "f.parquet"]


def test_locations_are_lines_and_rows(tmp_path: Path) -> None:
    (tmp_path / "b.json").write_text(json.dumps(QA, ensure_ascii=False, indent=2), encoding="utf-8")
    assert [r.location.line for r in read_records(tmp_path / "b.json")] == [2, 6]
    (tmp_path / "a.jsonl").write_text("\n" + json.dumps(QA[0]) + "\n\n" + json.dumps(QA[1]) + "\n")
    assert [r.location.line for r in read_records(tmp_path / "a.jsonl")] == [2, 4]
    pq.write_table(pa.Table.from_pylist(QA), tmp_path / "f.parquet")
    assert [str(r.location) for r in read_records(tmp_path / "f.parquet")][1].endswith("f.parquet, row 2")


def test_utf8_bom_is_not_part_of_the_first_key(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(QA[0]).encode())
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbfquestion,answer\nq,a\n")
    assert _data(tmp_path / "a.jsonl") == [QA[0]]
    assert _data(tmp_path / "d.csv") == [{"question": "q", "answer": "a"}]


def test_malformed_jsonl_line_is_reported_and_reading_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(QA[0]) + '\n{"question": "x", "answer": \n[1, 2]\n' + json.dumps(QA[1]) + "\n")
    records = list(read_records(path))
    assert [r.data for r in records if r.data] == QA
    errors = [r.error for r in records if r.error]
    assert isinstance(errors[0], DataFormatError) and errors[0].location.line == 2
    assert "malformed JSON" in str(errors[0]) and f"{path}, line 2" in str(errors[0])
    assert "expected a JSON object, got list" in str(errors[1]) and errors[1].location.line == 3


def test_malformed_json_array_stops_with_line(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text('[\n {"question": "a", "answer": "b"},\n {"question": "c" "answer": "d"}\n]\n')
    with pytest.raises(DataFormatError, match=r"line 3: malformed JSON in record 2"):
        list(read_records(path))
    path.write_text('[\n {"question": "a", "answer": "b"}\n')
    with pytest.raises(DataFormatError, match="not closed"):
        list(read_records(path))


def test_empty_file_and_missing_path(tmp_path: Path) -> None:
    for name in ("a.jsonl", "b.json", "c.csv"):
        (tmp_path / name).write_text("\n")
        with pytest.raises(EmptyFileError, match=f"{name}: file holds no records"):
            list(read_records(tmp_path / name))
    with pytest.raises(DataError, match="no such file"):
        data_files(tmp_path / "nope.jsonl")
    (tmp_path / "x.xml").write_text("<hi/>")
    with pytest.raises(DataError, match="unsupported file type '.xml'"):
        data_files(tmp_path / "x.xml")


def test_a_plain_text_file_is_one_text_record(tmp_path: Path) -> None:
    (tmp_path / "manual.md").write_text("# Dosage\n\nOne tablet a day.\n", encoding="utf-8")
    (tmp_path / "qa.jsonl").write_text(json.dumps(QA[0]) + "\n")
    assert [r.data for r in read_records(tmp_path / "manual.md")] == [{"text": "# Dosage\n\nOne tablet a day.\n"}]
    # In a folder, .md/.txt files are data only for a source of format text (a README is not a record).
    assert [p.name for p in data_files(tmp_path)] == ["qa.jsonl"]
    assert [p.name for p in data_files(tmp_path, plain_text=True)] == ["manual.md", "qa.jsonl"]


def test_non_utf8_file_names_line_and_encoding_fix(tmp_path: Path) -> None:
    path = tmp_path / "gb.jsonl"
    path.write_bytes(json.dumps(QA[1]).encode() + b"\n" + json.dumps(QA[0], ensure_ascii=False).encode("gb18030") + b"\n")
    records = list(read_records(path))
    assert records[0].data == QA[1]
    assert isinstance(records[1].error, EncodingError) and records[1].location.line == 2
    assert "gb18030" in str(records[1].error)
    assert [r.data for r in read_records(path, encoding="gb18030")] == [QA[1], QA[0]]
    csv_path = tmp_path / "gb.csv"
    csv_path.write_bytes("question,answer\n头疼怎么办？,多休息。\n".encode("gb18030"))
    with pytest.raises(EncodingError, match=r"gb.csv, line 2: not valid utf-8"):
        list(read_records(csv_path))
    json_path = tmp_path / "gb.json"
    json_path.write_bytes(("[\n" + json.dumps(QA[1]) + ",\n" + json.dumps(QA[0], ensure_ascii=False) + "\n]").encode("gb18030"))
    with pytest.raises(EncodingError, match=r"gb.json, line 3: not valid utf-8"):
        list(read_records(json_path))


def test_csv_row_with_wrong_field_count(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nq1,a1\nq2,a2,extra\n")
    records = list(read_records(path))
    assert records[1].error is not None and "row has 3 fields, the header has 2" in str(records[1].error)
    assert records[1].location.line == 3


def test_big_json_array_streams_in_bounded_memory(tmp_path: Path) -> None:
    """A ~40 MB JSON array: reading its first records must not load the whole file."""
    path = tmp_path / "big.json"
    record = json.dumps({"instruction": "问" * 200, "output": "答" * 800}, ensure_ascii=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[" + ",\n".join([record] * 12_000) + "]")
    assert path.stat().st_size > 35_000_000
    tracemalloc.start()
    reader = read_records(path)
    first = [next(reader) for _ in range(100)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert first[-1].location.line == 100
    assert peak < 8_000_000, f"peak {peak / 1e6:.1f} MB: the reader is not streaming"
    assert sum(1 for _ in reader) == 12_000 - 100
