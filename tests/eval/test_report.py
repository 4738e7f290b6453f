"""The expert review sheet round trip and the forgetting check's warning."""

from __future__ import annotations

import csv

import pytest

from qatune.eval.compare import forgetting_check
from qatune.eval.render import forgetting_lines
from qatune.eval.report import REVIEW_SHEET, summarize_review_sheet, write_review_sheet
from qatune.eval.sets import ChoiceItem, EvalError, EvalSet


def _predictions():
    row = {"set": "zh", "question": "什么是高血压？", "reference": "动脉血压持续升高。"}
    return {"base": [{**row, "id": "a:1", "prediction": "不知道"}, {**row, "id": "a:2", "prediction": "血压高"}],
            "tuned": [{**row, "id": "a:1", "prediction": "动脉血压升高"}, {**row, "id": "a:2", "prediction": "是病"}]}


def _fill(path, scores):
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    for row, score in zip(rows, scores):
        row["score"] = score
    with path.open("w", encoding="utf-8-sig", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_review_sheet_opens_in_excel_and_summarizes(tmp_path):
    sheet = tmp_path / REVIEW_SHEET
    write_review_sheet(_predictions(), sheet)
    assert sheet.read_bytes().startswith(b"\xef\xbb\xbf")  # BOM: Excel shows the Chinese
    with sheet.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["base", "base", "tuned", "tuned"]
    assert rows[2]["answer"] == "动脉血压升高" and all(r["score"] == "" for r in rows)

    _fill(sheet, ["1", "3", "5", ""])
    summary = {g["model"]: g for g in summarize_review_sheet(sheet)["groups"]}
    assert summary["base"]["mean"] == 2 and summary["base"]["scored"] == 2
    assert summary["tuned"]["mean"] == 5 and summary["tuned"]["unscored"] == 1
    assert summary["base"]["distribution"] == {"1": 1, "2": 0, "3": 1, "4": 0, "5": 0}


def test_summarize_command_prints_the_table(tmp_path, capsys):
    from qatune.cli import main

    sheet = tmp_path / REVIEW_SHEET
    write_review_sheet(_predictions(), sheet)
    _fill(sheet, ["2", "4", "5", "5"])
    assert main(["eval", "summarize", str(sheet)]) == 0
    printed = capsys.readouterr().out
    assert "base" in printed and "3.00" in printed and "5.00" in printed


def test_invalid_score_names_its_row(tmp_path):
    sheet = tmp_path / REVIEW_SHEET
    write_review_sheet(_predictions(), sheet)
    _fill(sheet, ["4", "7"])
    with pytest.raises(EvalError, match=r"review_sheet.csv, line 3, field 'score': score '7' is not a whole number"):
        summarize_review_sheet(sheet)
    _fill(sheet, ["", "", "", ""])
    with pytest.raises(EvalError, match="no row has a score yet"):
        summarize_review_sheet(sheet)


def _general(correct_base, correct_tuned):
    general = EvalSet("mmlu", "general", choice=[ChoiceItem(str(i), "q", ["a", "b"], 0)
                                                for i in range(len(correct_base))])

    def rows(correct):
        return [{"set": "mmlu", "id": str(i), "correct": c} for i, c in enumerate(correct)]

    predictions = {"base": rows(correct_base), "tuned": rows(correct_tuned)}
    accuracy = {label: 100 * sum(c) / len(c) for label, c in (("base", correct_base), ("tuned", correct_tuned))}
    scores = {"mmlu": {label: {"accuracy": value} for label, value in accuracy.items()}}
    return [general], predictions, scores


def test_forgetting_warns_only_on_a_significant_drop():
    # The case: 32.0 -> 29.5 on 200 questions, 14 right->wrong and 9 wrong->right: noise.
    base = [True] * 64 + [False] * 136
    tuned = [False] * 14 + [True] * 50 + [True] * 9 + [False] * 127
    sets, predictions, scores = _general(base, tuned)
    result = forgetting_check(sets, predictions, scores, threshold=2.0)
    found = result["sets"]["mmlu"]
    assert (found["base"], found["tuned"], found["right_to_wrong"], found["wrong_to_right"]) == (32.0, 29.5, 14, 9)
    assert result["warnings"] == [] and not found["significant_drop"]
    assert found["interval"]["low"] < 0 < found["interval"]["high"]
    line = next(text for text, _ in forgetting_lines(result))
    assert "-2.5 points" in line and "no significant change" in line and "14 right->wrong" in line

    # A 20-point fall on the same 200 questions is a warning.
    tuned = [False] * 45 + [True] * 19 + [True] * 5 + [False] * 131
    sets, predictions, scores = _general(base, tuned)
    result = forgetting_check(sets, predictions, scores, threshold=2.0)
    assert len(result["warnings"]) == 1 and "fell 20.0 points" in result["warnings"][0]
    assert "McNemar p" in result["warnings"][0]
    assert forgetting_check(sets, predictions, scores, threshold=25.0)["warnings"] == []  # within the threshold
    assert forgetting_check([], predictions, scores, threshold=2.0)["checked"] is False
