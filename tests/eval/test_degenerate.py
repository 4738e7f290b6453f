"""Degenerate answers: loops, echoed questions, cut and wrong-language answers, distinct-n."""

from __future__ import annotations

import pytest

from qatune.eval import degenerate

NORMAL_ZH = "高血压患者应低盐饮食，每天食盐少于6克，规律服药，定期监测血压。"


def test_loop_is_flagged_and_a_normal_answer_is_not():
    assert degenerate.is_loop("范围阴性！范围阴性！范围阴性！范围阴性！范围阴性！范围阴性！")
    assert degenerate.is_loop("Take the pill. Take the pill. Take the pill. Take the pill.")
    assert not degenerate.is_loop(NORMAL_ZH)
    assert not degenerate.is_loop("建议：1. 清淡饮食。2. 规律作息。3. 必要时到消化内科就诊。")
    assert not degenerate.is_loop("Rest, drink water, and see a doctor if the fever lasts more than three days.")


def test_repeated_question_is_flagged():
    question = "幽门螺杆菌阴性是什么意思？"
    assert degenerate.is_echo(question, "幽门螺杆菌阴性是什么意思？幽门螺杆菌阴性是什么意思")
    assert degenerate.is_echo("What does a negative H. pylori test mean?", "what does a negative h. pylori test mean")
    assert not degenerate.is_echo(question, "表示目前没有感染幽门螺杆菌，不具有传染性。")


def test_answer_flags():
    assert degenerate.answer_flags("头痛怎么办？", NORMAL_ZH, True) == []
    assert degenerate.answer_flags("头痛怎么办？", "范围阴性！" * 40, False) == ["loop", "truncated"]
    assert degenerate.answer_flags("头痛怎么办？", "Take a rest and drink water.", True) == ["wrong_language"]
    assert degenerate.answer_flags("What is a fever?", "发烧是体温升高。", True) == ["wrong_language"]
    assert degenerate.answer_flags("q?", "  ", True) == ["empty"]
    assert degenerate.answer_flags("q?", "", False) == ["truncated", "empty"]


def test_distinct_n_chinese_by_character_english_by_word():
    assert degenerate.distinct_n(["范围阴性！范围阴性！"], 1) == pytest.approx(50.0)  # 4 of 8 characters
    assert degenerate.distinct_n(["the cat sat on the mat"], 1) == pytest.approx(500 / 6)
    assert degenerate.distinct_n(["the cat sat on the mat"], 2) == 100.0
    assert degenerate.distinct_n([""], 2) == 0.0


def test_summary_shares():
    rows = [{"prediction": NORMAL_ZH, "flags": []}, {"prediction": "范围阴性！" * 5, "flags": ["loop"]}]
    found = degenerate.summary(rows)
    assert found["loop_share"] == 50.0 and found["echo_share"] == 0.0
    assert set(found) == set(degenerate.SHARES) | set(degenerate.DISTINCT)
