"""What an evaluation leaves behind: the report (`EvalReport`), predictions, and a review sheet for experts.

- `predictions.<label>.jsonl`: one line per item: question, reference, prediction, its scores.
- `review_sheet.csv`: one row per answer with an empty 1-5 `score` column, UTF-8 with a BOM so
  that Excel shows Chinese; `qatune eval summarize` (`summarize_review_sheet`) aggregates the
  filled sheet.
- `eval_report.json` (everything, `EvalReport`), and the same for people in `eval_report.md` and
  `eval_report.html` (`qatune.eval.render`).
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qatune import files as atomic
from qatune.errors import Location
from qatune.eval.sets import EvalError
from qatune.reports import omitted_when_none

REPORT_JSON = "eval_report.json"
REPORT_MD = "eval_report.md"
REPORT_HTML = "eval_report.html"
REVIEW_SHEET = "review_sheet.csv"
# `correction`: the answer as the expert would have it; `qatune data feedback` trains on it (SFT).
SHEET_COLUMNS = ("set", "id", "model", "question", "reference", "answer", "score", "comment", "correction")
# Filled by eval.judge when it scores (empty otherwise): beside the experts' `score`, for their agreement.
JUDGE_COLUMNS = ("judge_correctness", "judge_relevance", "judge_reasoning")


@dataclass
class EvalReport:
    """eval_report.json. The sections after `scores` are there only where they apply: the judge's with
    eval.judge, the others in a comparison of a base and a tuned model (the gate with eval.gate)."""

    qatune_version: str
    created: str
    models: list[dict[str, Any]]  # label, model, adapter
    device: str
    dtype: str
    decoding: dict[str, Any]
    confidence: dict[str, Any]  # level, bootstrap_resamples, seed
    methods: dict[str, Any]  # how each number is computed, in words; the sacrebleu signatures
    sets: list[dict[str, Any]]  # name, role, item counts, what was skipped
    scores: dict[str, dict[str, dict[str, Any]]]  # set -> model label -> metric -> value
    judge: dict[str, Any] | None = omitted_when_none()
    deltas: dict[str, dict[str, float | None]] | None = omitted_when_none()  # set -> metric -> tuned - base
    intervals: dict[str, dict[str, dict[str, Any]]] | None = omitted_when_none()  # set -> metric -> paired interval
    forgetting: dict[str, Any] | None = omitted_when_none()
    side_by_side: list[dict[str, Any]] | None = omitted_when_none()
    gate: dict[str, Any] | None = omitted_when_none()
    diagnosis: dict[str, Any] | None = omitted_when_none()  # findings and notes (`diagnosis.diagnose`)
    files: list[str] = field(default_factory=list)


def predictions_file(label: str) -> str:
    return f"predictions.{label}.jsonl"


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The rows of a predictions.<label>.jsonl an earlier evaluation wrote."""
    if not path.is_file():
        raise EvalError("no such predictions file", Location(str(path)),
                        hint="give the output folder of an earlier `qatune eval --compare` (eval.gate.previous)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            try:
                rows.append(json.loads(text))
            except json.JSONDecodeError as exc:
                raise EvalError(f"not a JSON line ({exc.msg})", Location(str(path), line)) from None
    return rows


def written_files(labels: list[str]) -> list[str]:
    """The names an evaluation of models with these labels writes (an evaluation plan says which it replaces)."""
    return [predictions_file(label) for label in labels] + [REVIEW_SHEET, REPORT_JSON, REPORT_MD, REPORT_HTML]


def write_review_sheet(predictions: dict[str, list[dict[str, Any]]], path: Path) -> None:
    with atomic.atomic_path(path) as temporary, temporary.open("w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SHEET_COLUMNS + JUDGE_COLUMNS)
        for label, rows in predictions.items():
            for r in rows:
                if "prediction" in r:
                    judge = r.get("judge") or {}
                    writer.writerow([r["set"], r["id"], label, r["question"], r["reference"], r["prediction"], "", "",
                                     "", judge.get("correctness", ""), judge.get("relevance", ""),
                                     judge.get("reasoning", "")])


def summarize_review_sheet(sheet: str | Path) -> dict[str, Any]:
    """Aggregate the experts' 1-5 scores of a filled review sheet by set and model; an invalid score names its row."""
    path = Path(sheet)
    if not path.is_file():
        raise EvalError("no such review sheet", Location(str(path)))
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("model", "score") if c not in (reader.fieldnames or [])]
        if missing:
            raise EvalError(f"the sheet has no column {', '.join(missing)}; it has {reader.fieldnames}",
                            Location(str(path)), hint=f"use the {REVIEW_SHEET} that qatune eval wrote")
        groups: dict[tuple[str, str], list[int]] = {}
        unscored: dict[tuple[str, str], int] = {}
        with_judge: dict[tuple[str, str], list[tuple[int, int]]] = {}  # (expert, judge correctness)
        for line, row in enumerate(reader, start=2):
            key = (row.get("set") or "", row["model"] or "")
            text = (row["score"] or "").strip()
            if not text:
                unscored[key] = unscored.get(key, 0) + 1
                continue
            try:
                value = float(text)
            except ValueError:
                value = 0.0
            if value not in (1, 2, 3, 4, 5):
                raise EvalError(f"score {text!r} is not a whole number from 1 to 5", Location(str(path), line, "score"),
                                hint="score 1 (wrong or harmful) to 5 (correct and complete), or leave it empty")
            groups.setdefault(key, []).append(int(value))
            judged = (row.get("judge_correctness") or "").strip()
            if judged.isdigit():
                with_judge.setdefault(key, []).append((int(value), int(judged)))
    if not groups:
        raise EvalError("no row has a score yet", Location(str(path)), hint="fill the score column (1-5)")
    result = []
    for key in sorted(set(groups) | set(unscored)):
        values = groups.get(key, [])
        result.append({"set": key[0], "model": key[1], "scored": len(values), "unscored": unscored.get(key, 0),
                       "mean": statistics.mean(values) if values else None,
                       "median": statistics.median(values) if values else None,
                       "distribution": {str(s): values.count(s) for s in range(1, 6)},
                       **({"judge_agreement": judge_agreement(with_judge[key])} if key in with_judge else {})})
    return {"sheet": str(path), "groups": result}


def judge_agreement(pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """Expert against judge (correctness) on the same answers: the share equal, within one point, and Spearman's rho."""
    import numpy as np

    expert, judge = (np.asarray(column, dtype=float) for column in zip(*pairs))
    gap = np.abs(expert - judge)
    rho = None
    if len(pairs) > 2 and expert.std() > 0 and judge.std() > 0:
        def ranks(values: Any) -> Any:  # average ranks, as Spearman's rho needs with ties
            order = values.argsort(kind="stable")
            ranked = np.empty(len(values))
            ranked[order] = np.arange(len(values), dtype=float)
            for v in np.unique(values):
                ranked[values == v] = ranked[values == v].mean()
            return ranked

        rho = float(np.corrcoef(ranks(expert), ranks(judge))[0, 1])
    return {"pairs": len(pairs), "exact": 100 * float((gap == 0).mean()), "within_one": 100 * float((gap <= 1).mean()),
            "spearman": rho}
