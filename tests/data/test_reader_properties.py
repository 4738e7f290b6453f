"""Issue 37 on the data readers, by hypothesis: random bytes, a valid file cut at any byte, a BOM, a wrong encoding,
a huge field, deep nesting. Each file either reads, every record as data or as a `DataError` naming its file and
line, or raises a `DataError` naming the file: never another exception. And nothing is lost: a JSONL file of N
lines gives N records, read + refused."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qatune.config.data import SourceConfig
from qatune.data.documents import read_documents
from qatune.data.readers import read_records
from qatune.data.registry import resolve_registry
from qatune.errors import DataError

SUFFIXES = [".jsonl", ".json", ".csv", ".tsv", ".txt", ".md", ".parquet"]
ROWS = [{"question": f"q{i} 发烧?", "answer": f"a{i}"} for i in range(4)]
CAP = 4096  # a small data.max_record_bytes: a "huge field" costs kilobytes here, not megabytes
FAST = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def valid(suffix: str) -> bytes:
    """A well-formed file of ROWS in `suffix`'s format."""
    if suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS).encode()
    if suffix == ".json":
        return json.dumps(ROWS, ensure_ascii=False).encode()
    if suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        return ("question" + sep + "answer\n" + "".join(f"{r['question']}{sep}{r['answer']}\n" for r in ROWS)).encode()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(ROWS), out)
        return out.getvalue()
    return "# Fever\n\nRest and fluids.\n".encode()


def read_all(tmp_path, suffix: str, data: bytes, encoding: str = "utf-8") -> list:
    """The records of `data` as a file, or the DataError it raised; anything else fails the test."""
    path = tmp_path / f"data{suffix}"
    path.write_bytes(data)
    try:
        records = list(read_records(path, encoding, max_record_bytes=CAP))
    except DataError as exc:
        assert exc.location and exc.location.file == str(path), f"{type(exc).__name__} names no file: {exc}"
        return [exc]
    for record in records:
        assert (record.data is None) != (record.error is None)
        assert record.location.file == str(path)
        if record.error is not None:
            assert isinstance(record.error, DataError) and record.error.location.file == str(path), record.error
    return records


@pytest.mark.parametrize("suffix", SUFFIXES)
@FAST
@given(data=st.binary(max_size=400))
def test_random_bytes_read_or_fail_with_a_data_error(tmp_path_factory, suffix, data):
    read_all(tmp_path_factory.mktemp("r"), suffix, data)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_file_cut_at_every_byte_reads_or_fails_with_a_data_error(tmp_path, suffix):
    whole = valid(suffix)
    assert all(r.data for r in read_all(tmp_path, suffix, whole))
    for cut in range(len(whole)):
        read_all(tmp_path, suffix, whole[:cut])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".txt", ".md"])
@pytest.mark.parametrize("encoding", ["utf-8", "gb18030", "latin-1"])
@pytest.mark.parametrize("written", ["utf-8-sig", "utf-16", "gb18030"])
def test_boms_and_wrong_encodings_read_or_fail_with_a_data_error(tmp_path, suffix, encoding, written):
    read_all(tmp_path, suffix, valid(suffix).decode().encode(written), encoding)


DEEP = "[" * 2000 + "1" + "]" * 2000  # under the cap, past Python's recursion limit (1000): json recurses
HUGE = '"' + "x" * (CAP * 4) + '"'


@pytest.mark.parametrize("value", [HUGE, DEEP], ids=["huge-field", "deep-nesting"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_huge_field_and_deep_nesting_are_one_record_not_a_crash(tmp_path, suffix, value):
    record = '{"question": "q", "answer": ' + value + "}"
    data = {".jsonl": record + "\n", ".json": "[" + record + "]", ".csv": "question,answer\nq," + value + "\n"}[suffix]
    assert len(read_all(tmp_path, suffix, data.encode())) == 1


@FAST
@given(lines=st.lists(st.one_of(st.sampled_from([json.dumps(r) for r in ROWS]), st.binary(max_size=40).map(
    lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ").decode("latin-1"))), min_size=1, max_size=20))
def test_jsonl_loses_no_record(tmp_path_factory, lines):
    """N lines in, N records out (each read or refused with its line), blank lines aside."""
    records = read_all(tmp_path_factory.mktemp("n"), ".jsonl", ("\n".join(lines) + "\n").encode("utf-8"))
    expected = [i for i, line in enumerate(lines, start=1) if line.strip()]
    if records and isinstance(records[0], DataError):
        assert not expected or "no records" in str(records[0]) or records[0].location.line, records[0]
        return
    assert [r.location.line for r in records] == expected


def refused_naming(path, read) -> None:
    """`read()` returns, or raises a DataError naming `path`; never another exception."""
    try:
        read()
    except DataError as exc:
        assert exc.location and exc.location.file == str(path), exc


REGISTRY = json.dumps({"qa": {"file_name": "qa.jsonl", "columns": {"prompt": "question", "response": "answer"}}}).encode()


@FAST
@given(data=st.one_of(st.binary(max_size=300), st.integers(0, len(REGISTRY)).map(lambda n: REGISTRY[:n]),
                      st.just(b"{" + b'"a": {' * 3000 + b"}" * 3001)))
def test_a_damaged_dataset_info_json_is_a_data_error_naming_it(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("reg") / "dataset_info.json"
    path.write_bytes(data)
    refused_naming(path, lambda: resolve_registry(SourceConfig(path=str(path), dataset="qa")))


@pytest.mark.parametrize("suffix", [".md", ".txt"])
@FAST
@given(data=st.one_of(st.binary(max_size=400), st.text(max_size=400).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_documents_read_or_fail_with_a_data_error_naming_the_file(tmp_path_factory, suffix, data):
    path = tmp_path_factory.mktemp("doc") / f"notes{suffix}"
    path.write_bytes(data)
    refused_naming(path, lambda: read_documents(path, max_words=50))
