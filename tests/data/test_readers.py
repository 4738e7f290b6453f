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


# -- records of any size (issue 19): linear time, a size cap, nothing held past it ----------------

BIG_ANSWER = "多休息，多喝水。\"引号\" \\ 反斜杠\n" * 140_000  # 3.2 Mi characters, escapes throughout: > 3 refills


def test_a_record_with_a_3_mib_answer_reads_whole(tmp_path: Path) -> None:
    """Was "malformed JSON ... Unterminated string": a string longer than two 1 MiB refills."""
    records = [{"question": "总结说明书", "answer": BIG_ANSWER}, QA[1]]
    write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "b.json").write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps(records), encoding="utf-8")  # \uXXXX escapes: 19 MB of text
    (tmp_path / "d.json").write_text(json.dumps(records[0], ensure_ascii=False), encoding="utf-8")  # one object
    for name in ("a.jsonl", "b.json", "c.json"):
        assert _data(tmp_path / name) == records, name
    assert _data(tmp_path / "d.json") == records[:1]
    assert [r.location.line for r in read_records(tmp_path / "b.json")] == [2, 6]
    assert [r.location.line for r in read_records(tmp_path / "a.jsonl")] == [1, 2]


def test_json_split_anywhere_by_refills_reads_as_json_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refills of 1 to 7 characters cut strings, escapes, surrogate pairs and numbers at every place."""
    import random

    from qatune.data import json_stream

    rng = random.Random(19)
    alphabet = ['a', '"', '\\', '\n', '头', '😀', '[', ']', '{', '}', ',', ' ', '\u2028', '7']

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))

    def value(depth: int = 0) -> object:
        pick = rng.random()
        if depth > 3 or pick < 0.3:
            return text()
        if pick < 0.4:
            return rng.choice([1, -2.5e10, True, None, 0])
        if pick < 0.7:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {text(): value(depth + 1) for _ in range(rng.randint(0, 3))}

    path = tmp_path / "f.json"
    for case in range(150):
        records = [{"q": text(), "a": value()} for _ in range(rng.randint(1, 5))]
        path.write_text(json.dumps(records, ensure_ascii=case % 2 == 0, indent=case % 3 or None), encoding="utf-8")
        monkeypatch.setattr(json_stream, "CHUNK", 1 << 20)
        lines = [r.location.line for r in read_records(path)]
        monkeypatch.setattr(json_stream, "CHUNK", 1 + case % 7)
        assert _data(path) == records, case
        assert [r.location.line for r in read_records(path)] == lines, case


def _count_work(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count every decoder call, the characters it decoded, those the end-scanner looked at and those
    the buffer was rebuilt with."""
    from qatune.data import json_stream

    work = {"decodes": 0, "decoded": 0, "scanned": 0, "buffered": 0}
    decoder = json_stream.DECODER

    class Counting:
        def raw_decode(self, s: str, idx: int = 0) -> tuple[object, int]:
            work["decodes"] += 1
            try:
                value, end = decoder.raw_decode(s, idx)
            except json.JSONDecodeError as exc:
                work["decoded"] += exc.pos - idx
                raise
            work["decoded"] += end - idx
            return value, end

    scan, fill = json_stream.JsonExtent.scan, json_stream.JsonRecords._fill

    def counted_scan(self: json_stream.JsonExtent, buf: str, pos: int) -> tuple[int, bool]:
        end, done = scan(self, buf, pos)
        work["scanned"] += end - pos
        return end, done

    def counted_fill(self: json_stream.JsonRecords, at_least: int = 0) -> None:
        fill(self, at_least)
        work["buffered"] += len(self.buf)

    monkeypatch.setattr(json_stream, "DECODER", Counting())
    monkeypatch.setattr(json_stream.JsonExtent, "scan", counted_scan)
    monkeypatch.setattr(json_stream.JsonRecords, "_fill", counted_fill)
    return work


def _manual(path: Path, mib: int) -> int:
    """A JSON array of one record of `mib` MiB in short turns; its size in characters."""
    turn = [{"from": "human", "value": "头疼怎么办？"}, {"from": "gpt", "value": "多休息，多喝水。" * 3}]
    text = json.dumps([{"conversations": turn * (mib * 4360)}])  # 240 bytes a pair of turns
    path.write_text(text, encoding="utf-8")
    return len(text)


def test_a_34_mib_record_is_decoded_once_not_per_refill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: decoded from its start after each of ~34 refills (~600 MB decoded, 9.4 s in the issue)."""
    size = _manual(tmp_path / "big.json", 34)
    assert size > 34 << 20
    work = _count_work(monkeypatch)
    [record] = read_records(tmp_path / "big.json", max_record_bytes=64 << 20)
    assert len(record.data["conversations"]) == 2 * 34 * 4360
    assert work["decodes"] == 2  # one try on the first 1 MiB, one decode of the whole record
    assert work["decoded"] <= size + (1 << 20)
    assert work["scanned"] <= size  # each character looked at once while finding the record's end
    assert work["buffered"] <= 3 * size  # the buffer doubles: not 34 copies of a growing record


def test_work_grows_linearly_with_the_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {}
    for mib in (8, 32):
        size = _manual(tmp_path / f"r{mib}.json", mib)
        work = _count_work(monkeypatch)
        assert len(list(read_records(tmp_path / f"r{mib}.json", max_record_bytes=64 << 20))) == 1
        counts[mib] = (size, work)
        monkeypatch.undo()
    (small, at8), (large, at32) = counts[8], counts[32]
    for key in ("decoded", "scanned", "buffered"):
        # 4x the record, about 4x the work (quadratic work would be 16x)
        assert at32[key] / at8[key] <= 1.1 * large / small, (key, at8, at32)
    assert at8["decodes"] == at32["decodes"] == 2


def test_the_cap_default_is_the_config_default() -> None:
    from qatune.config import DataConfig
    from qatune.data.readers import MAX_RECORD_BYTES

    assert DataConfig().max_record_bytes == MAX_RECORD_BYTES == 16 << 20


def _assert_too_large(record, path: Path, what: str, line: int) -> None:
    from qatune.data.readers import RecordTooLargeError

    assert isinstance(record.error, RecordTooLargeError), record
    assert record.data is None and record.location.line == line
    message = str(record.error)
    assert f"{path}, {record.location.line_kind} {line}: {what} is " in message
    assert "over data.max_record_bytes (65,536 bytes)" in message and "on_error=skip" in message


def test_a_record_over_the_cap_is_named_and_reading_goes_on(tmp_path: Path) -> None:
    cap, long = 1 << 16, {"question": "长", "answer": "长" * 40_000}  # 120,000 bytes as UTF-8, 40,000 characters
    records = [QA[0], long, QA[1]]
    write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "b.json").write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "d.csv").write_text('question,answer\n头疼怎么办？,"多休息，\n多喝水。"\n长,"' + "长\n" * 30_000 + '"\n'
                                    'What is a fever?,A raised body temperature.\n', encoding="utf-8")
    (tmp_path / "e.tsv").write_text("question\tanswer\n头疼怎么办？\t多休息，多喝水。\n长\t" + "长" * 40_000 +
                                    "\nWhat is a fever?\tA raised body temperature.\n", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "f.parquet")
    expected = {"a.jsonl": ("record 2", 2), "b.json": ("record 2", 6), "c.json": ("record 2", 1),
                "d.csv": ("row 2", 30_004), "e.tsv": ("row 2", 3), "f.parquet": ("row 2", 2)}
    for name, (what, line) in expected.items():
        read = list(read_records(tmp_path / name, max_record_bytes=cap))
        _assert_too_large(read[1], tmp_path / name, what, line)
        if name != "d.csv":
            assert [r.data for r in read[::2]] == [QA[0], QA[1]], name
        else:
            assert [r.data for r in read[::2]] == [{"question": "头疼怎么办？", "answer": "多休息，\n多喝水。"}, QA[1]]
            assert read[2].location.line == 30_005
        assert read_records(tmp_path / name, max_record_bytes=1 << 18).__next__().error is None
    # counted in bytes: 40,000 characters are 120,000 bytes in UTF-8 but 80,000 in gb18030 (under 2 x cap)
    (tmp_path / "g.jsonl").write_bytes(json.dumps(long, ensure_ascii=False).encode("gb18030") + b"\n")
    assert [r.data for r in read_records(tmp_path / "g.jsonl", "gb18030", max_record_bytes=90_000)] == [long]
    assert read_records(tmp_path / "g.jsonl", "gb18030", max_record_bytes=cap).__next__().error is not None


def test_a_huge_record_over_the_cap_is_read_past_not_held(tmp_path: Path) -> None:
    """Records of 20 and 40 MB under a 1 MiB cap: reading past them holds a bounded few MB (csv keeps its
    field as 4 bytes a character), the same for both sizes, in JSON, JSONL and CSV alike."""
    for name in ("a.jsonl", "b.json", "c.csv"):
        peaks = []
        for millions in (6, 13):
            path = tmp_path / f"{millions}{name}"
            huge = {"question": "q", "answer": "答" * millions * 1_000_000, "turns": [{"a": "b"}] * 10}
            if name == "a.jsonl":
                write_jsonl(path, [huge, QA[1]])
            elif name == "b.json":
                path.write_text(json.dumps([huge, QA[1]], ensure_ascii=False), encoding="utf-8")
            else:
                path.write_text('question,answer\nq,"' + ("答" * 1_000_000 + '""\n') * millions + '"\n'
                                "What is a fever?,A raised body temperature.\n", encoding="utf-8")
            assert path.stat().st_size > millions * 3_000_000
            tracemalloc.start()
            read = list(read_records(path, max_record_bytes=1 << 20))
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            assert read[0].error is not None and "over data.max_record_bytes" in str(read[0].error), name
            assert read[1].data == QA[1], name
            path.unlink()
        assert peaks[1] < 1.1 * peaks[0] + 1e6 and peaks[1] < 16e6, f"{name}: peaks {peaks} past 20 and 40 MB records"


def test_broken_json_in_a_long_record_is_a_syntax_error_not_a_size(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    turns = ",\n".join(json.dumps({"from": "gpt", "value": "x" * 1000}) for _ in range(5000))
    path.write_text('[{"question": "q",\n "turns": [' + turns + "]}," + '\n{"question": "a" "answer": "b"}]')
    with pytest.raises(DataFormatError, match=r"b.json, line 5002: malformed JSON in record 2: Expecting ','"):
        list(read_records(path))
    # a brace missing, in a 5 MB record over a 1 MiB cap: the syntax error is named, not the size
    path.write_text('[{"question": "q",\n "turns": [' + turns.replace("}", "", 1) + "]}]")
    with pytest.raises(DataFormatError, match=r"b.json, line 3: malformed JSON in record 1: Expecting property name"):
        list(read_records(path, max_record_bytes=1 << 20))
    path.write_text('[{"question": "q", "answer": "' + "x" * 3_000_000)  # a string the file ends in
    with pytest.raises(DataFormatError, match=r"line 1: malformed JSON in record 1: Unterminated string"):
        list(read_records(path))


def test_over_the_cap_raises_or_is_a_counted_drop_with_on_error_skip(tmp_path: Path) -> None:
    from qatune.config import DataConfig, SourceConfig
    from qatune.data.records import MALFORMED
    from qatune.data.sources import check, load

    path = write_jsonl(tmp_path / "d.jsonl", [QA[1], {"question": "q", "answer": "x" * (16 << 20)}, QA[0]])
    with pytest.raises(DataError, match=r"d.jsonl, line 2: record 2 is 16,777,2\d\d bytes \(16.0 MiB\), over "
                                        r"data.max_record_bytes \(16,777,216 bytes \(16.0 MiB\)\)") as info:
        load(DataConfig(sources=[str(path)], val_size=0))
    assert "raise data.max_record_bytes" in str(info.value) and "data.on_error=skip" in str(info.value)
    result = check([SourceConfig(path=str(path))], DataConfig())
    assert (result.records, result.kept, result.errors) == (3, 2, 1)
    [drop] = result.log.drops
    assert drop.reason == MALFORMED and drop.location == f"{path}, line 2" and "data.max_record_bytes" in drop.detail
