"""Normalisation keeps Chinese intact; every drop reason is counted; leakage is caught."""

from __future__ import annotations

from pathlib import Path

from qatune.config import DataConfig, SourceConfig
from qatune.data.clean import normalize_text, text_length
from qatune.data.sources import load
from tests.conftest import write_jsonl


def test_normalize_keeps_chinese_punctuation_and_code_indentation() -> None:
    assert normalize_text("  头疼怎么办？\u200b\r\n多休息，多喝水。  ") == "头疼怎么办？\n多休息，多喝水。"
    assert normalize_text("ﬁne\u00a0text", "NFKC") == "fine text"
    assert normalize_text("def f():\n    return 1\n\n\n\nend\x07") == "def f():\n    return 1\n\nend"
    assert normalize_text("e\u0301") == "\u00e9"  # NFC composes


def test_length_counts_chinese_characters_not_spaces() -> None:
    assert text_length("头疼怎么办") == 5
    assert text_length("sore throat, again") == 3
    assert text_length("吃了 aspirin 两片") == 5


def _load(tmp_path: Path, records: list, eval_records: list | None = None, **data: object):
    cfg = DataConfig(sources=[str(write_jsonl(tmp_path / "train.jsonl", records))], val_size=0, **data)
    if eval_records is not None:
        cfg.eval_sources = [SourceConfig(path=str(write_jsonl(tmp_path / "eval.jsonl", eval_records)))]
    return load(cfg)


LONG_ZH = "高血压患者平时应该注意低盐饮食，规律作息，适量运动，并按医嘱定期复查血压。"
LONG_EN = "Annual leave is fifteen working days a year, and up to five unused days may be carried over until March."


def test_each_drop_reason_is_counted_with_location(tmp_path: Path) -> None:
    records = [
        {"question": "高血压要注意什么？", "answer": LONG_ZH},                       # 1 kept
        {"question": "   ", "answer": "something"},                              # 2 empty
        {"question": "年假有几天？", "answer": "15"},                              # 3 too short (1 word)
        {"question": "高血压要注意什么？", "answer": LONG_ZH},                       # 4 exact duplicate of 1
        {"question": "高血压要注意什么?", "answer": LONG_ZH[:-1] + "！"},          # 5 near duplicate of 1
        {"question": "How many days of annual leave do I get?", "answer": LONG_EN},  # 6 kept
        {"question": "How many days of annual leave do I get ?", "answer": LONG_EN}, # 7 near duplicate of 6
        {"question": "Can I work from home?", "answer": "Yes, two days a week with your manager's approval."},  # 8
    ]
    loaded = _load(tmp_path, records)
    kept_lines = [c.location.line for c in loaded.domain]
    assert kept_lines == [1, 6, 8]
    by_line = {int(d.location.rsplit(" ", 1)[-1]): d for d in loaded.log.drops}
    assert {line: d.reason for line, d in by_line.items()} == {
        2: "empty", 3: "too_short", 4: "duplicate", 5: "near_duplicate", 7: "near_duplicate"}
    assert "line 1" in by_line[4].detail and "line 1" in by_line[5].detail and "line 6" in by_line[7].detail
    assert "answer has 1 words, minimum 2" in by_line[3].detail
    assert loaded.log.by_reason() == {"empty": 1, "too_short": 1, "duplicate": 1, "near_duplicate": 2}


def test_thresholds_are_configurable(tmp_path: Path) -> None:
    records = [{"question": "年假有几天？", "answer": "十五天"}, {"question": "病假呢？", "answer": "十天"}]
    assert len(_load(tmp_path, records).domain) == 2
    cfg_records = _load(tmp_path, records, clean={"min_answer_length": 3})
    assert len(cfg_records.domain) == 1 and cfg_records.log.by_reason() == {"too_short": 1}


def test_eval_leakage_is_removed_from_train_and_reported(tmp_path: Path) -> None:
    from qatune.config import QatuneConfig
    from qatune.data import clean
    from qatune.data.records import DropLog

    train = [
        {"question": "How many days of annual leave do I get each year?", "answer": LONG_EN},
        {"question": "孩子发烧到39度需要马上去医院吗？", "answer": LONG_ZH},
        {"question": "Can I work from home on Fridays?", "answer": "Yes, with your manager's approval in the HR portal."},
    ]
    evaluation = [
        {"question": "How many days of annual leave do I get each year ?", "answer": "Fifteen working days."},
        {"question": "孩子发烧到39度需要马上去医院吗", "answer": "要看精神状态和持续时间。"},
    ]
    loaded = _load(tmp_path, train, evaluation)
    log = DropLog()
    kept = clean.drop_eval_leakage(loaded.domain, loaded.evaluation, QatuneConfig().data.clean, log)
    assert [c.location.line for c in kept] == [3]
    assert [d.reason for d in log.drops] == ["eval_leakage", "eval_leakage"]
    assert "eval.jsonl, line 1" in log.drops[0].detail and "eval.jsonl, line 2" in log.drops[1].detail
