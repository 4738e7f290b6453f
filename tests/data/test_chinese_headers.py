"""Chinese column headers (问题/答案/回答/提问/指令/输入/输出) are read as question/answer/instruction/input/output
without `columns`, in CSV, Parquet and JSON alike, while an English column or a `columns` mapping still wins."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from qatune.config import DataConfig, SourceConfig
from qatune.data.sources import load
from qatune.errors import MissingColumnError
from tests.conftest import write_jsonl

QUESTION, ANSWER = "头疼怎么办？", "多休息，多喝水。"
USER_ASSISTANT = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]


def _load(path: Path, **source: object) -> list[list[dict]]:
    data = DataConfig(sources=[SourceConfig(path=str(path), **source)], val_size=0)
    data.clean.near_dedup = False
    return [c.messages for c in load(data).domain]


def _write_csv(path: Path, header: list[str], row: list[str]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([header, row])
    return path


@pytest.mark.parametrize("header", [["问题", "答案"], ["提问", "回答"], ["问题", "回答"]])
def test_chinese_qa_headers_in_csv(tmp_path: Path, header: list[str]) -> None:
    assert _load(_write_csv(tmp_path / "d.csv", header, [QUESTION, ANSWER])) == [USER_ASSISTANT]


def test_chinese_alpaca_headers_in_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"指令": [QUESTION], "输入": [""], "输出": [ANSWER]}), path)
    assert _load(path) == [USER_ASSISTANT]


def test_chinese_instruction_with_input_in_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"指令": "翻译成英文", "输入": "你好", "输出": "Hello there."}])
    assert _load(path)[0][0]["content"] == "翻译成英文\n你好"


def test_english_column_and_mapping_win_over_an_alias(tmp_path: Path) -> None:
    both = _write_csv(tmp_path / "both.csv", ["question", "问题", "answer"], [QUESTION, "别的问题", ANSWER])
    assert _load(both) == [USER_ASSISTANT]
    mapped = _write_csv(tmp_path / "mapped.csv", ["问题", "问", "答案"], ["别的问题", QUESTION, ANSWER])
    assert _load(mapped, columns={"question": "问"}) == [USER_ASSISTANT]


def test_a_table_missing_the_answer_names_the_format(tmp_path: Path) -> None:
    with pytest.raises(MissingColumnError):
        _load(_write_csv(tmp_path / "d.csv", ["问题", "备注"], [QUESTION, "x"]))
