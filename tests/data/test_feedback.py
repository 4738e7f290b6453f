"""`qatune data feedback`: two reviewers' sheets -> the expected DPO pairs, KTO rows and SFT corrections, every
row left out counted with its reason, provenance on every record, and the reviewers' agreement."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from qatune.cli import main
from qatune.config import load_config
from qatune.data.feedback import feedback
from qatune.errors import DataError
from qatune.eval.report import SHEET_COLUMNS

Q = {1: "What is the capital of France?", 2: "Who wrote Hamlet?", 3: "什么是高血压？", 4: "感冒了应该多喝水吗？"}


def write_sheet(path: Path, rows: list[dict[str, str]], reviewer: str | None = None) -> Path:
    columns = list(SHEET_COLUMNS) + (["reviewer"] if reviewer else [])
    with path.open("w", encoding="utf-8-sig", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({"set": "domain", "reference": "-", "comment": "", "correction": "", "score": "",
                             **({"reviewer": reviewer} if reviewer else {}), **row})
    return path


def answer(i: int, model: str, text: str, score: str = "", **more: str) -> dict[str, str]:
    return {"id": str(i), "model": model, "question": Q[i], "answer": text, "score": score, **more}


@pytest.fixture
def sheets(tmp_path: Path) -> list[Path]:
    first = write_sheet(tmp_path / "alice.csv", [
        answer(1, "base", "Lyon.", "1"),                                   # row 2
        answer(1, "tuned", "Paris is the capital of France.", "5"),        # row 3
        answer(2, "base", "Shakespeare.", "3"),                            # row 4
        answer(2, "tuned", "William Shakespeare wrote it.", "3"),          # row 5: a tie with row 4
        answer(3, "base", "高血压就是头疼。", "3", correction="高血压是指动脉血压持续高于正常范围。"),  # row 6
        answer(3, "tuned", "高血压是血压高。"),                             # row 7: unscored
        answer(4, "base", "不用。", "2"),                                   # row 8
        answer(4, "tuned", "是的，多喝水有助于恢复。"),                       # row 9: unscored
    ])
    second = write_sheet(tmp_path / "bob.csv", [
        answer(1, "base", "Lyon.", "2"),
        answer(1, "tuned", "Paris is the capital of France.", "4"),
        answer(2, "base", "Shakespeare.", "3"),
        answer(2, "tuned", "William Shakespeare wrote it.", "3"),
    ], reviewer="bob")
    return [first, second]


def test_feedback_gives_pairs_kto_rows_corrections_and_counts_every_unused_row(tmp_path, sheets) -> None:
    config = load_config(None, [f"feedback.output_dir={tmp_path / 'out'}"])
    result = feedback(config, sheets)
    alice = str(sheets[0])

    assert [(p["question"], p["chosen"], p["rejected"]) for p in result.dpo] == [
        (Q[1], "Paris is the capital of France.", "Lyon.")]
    provenance = result.dpo[0]["provenance"]
    assert provenance["margin"] == 3.0
    assert provenance["chosen"]["reviews"] == [{"sheet": alice, "row": 3, "reviewer": alice, "score": 5},
                                               {"sheet": str(sheets[1]), "row": 3, "reviewer": "bob", "score": 4}]
    assert result.report["dpo_dropped"] == {"tie": 1, "single_answer": 2}

    kto = {(r["messages"][1]["content"], r["label"]) for r in result.kto}
    assert kto == {("Paris is the capital of France.", True), ("Lyon.", False), ("不用。", False)}
    assert result.report["kto_labels"] == {"desirable": 1, "undesirable": 2, "between_thresholds": 3}
    assert all(r["provenance"]["reviews"] for r in result.kto)

    assert [(r["question"], r["answer"]) for r in result.sft] == [(Q[3], "高血压是指动脉血压持续高于正常范围。")]
    assert result.sft[0]["provenance"] == {"sheet": alice, "row": 6, "reviewer": alice, "score": 3, "set": "domain",
                                           "corrects_model": "base", "corrects_answer": "高血压就是头疼。"}

    unused = {(Path(u["sheet"]).name, u["row"], u["reason"]) for u in result.unused}
    assert unused == {("alice.csv", 7, "unscored"), ("alice.csv", 9, "unscored"), ("alice.csv", 4, "not_used"),
                      ("alice.csv", 5, "not_used"), ("bob.csv", 4, "not_used"), ("bob.csv", 5, "not_used")}
    assert result.report["unused_rows"] == {"unscored": 2, "not_used": 4}
    assert result.report["rows"] == 12  # every row is in an output or in unused.jsonl

    agreement = result.report["agreement"]
    assert agreement["pairs_compared"] == 4 and agreement["answers_scored_by_several"] == 4
    assert (agreement["exact"], agreement["within_one"], agreement["mean_abs_difference"]) == (0.5, 1.0, 0.5)

    written = [json.loads(line) for line in (tmp_path / "out" / "dpo.jsonl").read_text(encoding="utf-8").splitlines()]
    assert written == result.dpo
    with pytest.raises(DataError, match="holds dpo.jsonl"):
        feedback(config, sheets)  # an earlier run's files are never replaced silently


def test_feedback_margin_decides_pairs_and_the_cli_writes_the_same(tmp_path, sheets, capsys) -> None:
    strict = feedback(load_config(None, [f"feedback.output_dir={tmp_path / 'a'}", "feedback.margin=3.5"]), sheets)
    assert strict.dpo == [] and strict.report["dpo_dropped"] == {"tie": 1, "single_answer": 2, "below_margin": 1}

    assert main(["data", "feedback", *map(str, sheets), "--out", str(tmp_path / "cli")]) == 0
    assert "1 DPO pairs" in capsys.readouterr().out
    assert (tmp_path / "cli" / "kto.jsonl").read_text(encoding="utf-8").count("\n") == 3


def test_a_bad_score_names_its_sheet_row_and_column(tmp_path) -> None:
    sheet = write_sheet(tmp_path / "s.csv", [answer(1, "base", "Paris.", "4"), answer(2, "base", "Hamlet.", "6")])
    with pytest.raises(DataError, match=r"s.csv, line 3, field 'score': score '6' is not a whole number from 1 to 5"):
        feedback(load_config(None, [f"feedback.output_dir={tmp_path / 'out'}"]), [sheet])
