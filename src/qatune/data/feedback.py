"""`qatune data feedback SHEET...`: the experts' scores on review sheets become the next model's training data.

A review sheet (`qatune eval` writes review_sheet.csv) has one row per answer: set, id, model, question,
reference, answer, a 1-5 `score`, a `comment` and a `correction`. Several sheets (or a `reviewer` column)
give several reviewers; a row's reviewer is its `reviewer` cell, else the sheet's path. Rows about the same
answer (same set, question, model and answer text) are one answer, scored by the mean of its reviewers.

- dpo.jsonl: per question, its best-scored answer (`chosen`) against its worst-scored one (`rejected`) when
  their means differ by at least feedback.margin; ties and closer pairs are counted and left out.
- kto.jsonl: every scored answer, desirable at or above feedback.desirable_at, undesirable at or below
  feedback.undesirable_at; answers between are counted and left out.
- sft.jsonl: every filled `correction`, as the answer to its question.
Every record carries `provenance`: sheet, row, reviewer and score of each review it comes from. Every row
that went into no output is in unused.jsonl with its reason, and counted in feedback_report.json, with the
reviewers' agreement on the answers several of them scored.
"""

from __future__ import annotations

import csv
import itertools
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qatune import files as atomic
from qatune.config import QatuneConfig
from qatune.data.clean import fold
from qatune.errors import DataError, Location

REQUIRED_COLUMNS = ("question", "answer", "score")
OUTPUTS = ("dpo.jsonl", "kto.jsonl", "sft.jsonl", "unused.jsonl", "feedback_report.json")
# Why a question gave no pair, and why a row went into no output.
TIE, BELOW_MARGIN, SINGLE_ANSWER, IDENTICAL_ANSWERS = "tie", "below_margin", "single_answer", "identical_answers"
UNSCORED, EMPTY_ANSWER, REPEATED_REVIEW, NOT_USED = "unscored", "empty_answer", "repeated_review", "not_used"


@dataclass
class Review:
    sheet: str
    row: int  # the CSV line (the header is line 1)
    reviewer: str
    score: int | None
    correction: str
    comment: str

    def provenance(self) -> dict[str, Any]:
        return {"sheet": self.sheet, "row": self.row, "reviewer": self.reviewer, "score": self.score}


@dataclass
class Answer:
    set: str
    question: str
    model: str
    text: str
    reviews: list[Review] = field(default_factory=list)

    @property
    def scores(self) -> list[int]:
        return [r.score for r in self.reviews if r.score is not None]

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.scores) if self.scores else None

    def provenance(self) -> dict[str, Any]:
        return {"set": self.set, "model": self.model, "mean_score": self.mean,
                "reviews": [r.provenance() for r in self.reviews if r.score is not None]}


@dataclass
class FeedbackResult:
    output_dir: Path
    dpo: list[dict[str, Any]]
    kto: list[dict[str, Any]]
    sft: list[dict[str, Any]]
    unused: list[dict[str, Any]]
    report: dict[str, Any]


def read_sheets(sheets: list[str | Path]) -> tuple[list[Answer], list[dict[str, Any]]]:
    """Every answer of the sheets with its reviews, and the rows read past (with their reason)."""
    answers: dict[tuple[str, str, str, str], Answer] = {}
    unused: list[dict[str, Any]] = []
    for sheet in map(Path, sheets):
        if not sheet.is_file():
            raise DataError("no such review sheet", Location(str(sheet)))
        with sheet.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"the review sheet has no column {', '.join(missing)}; it has {reader.fieldnames}",
                                Location(str(sheet)), hint="use the review_sheet.csv that `qatune eval` wrote")
            for line, row in enumerate(reader, start=2):
                review = Review(str(sheet), line, (row.get("reviewer") or "").strip() or str(sheet),
                                _score(row.get("score"), Location(str(sheet), line, "score")),
                                (row.get("correction") or "").strip(), (row.get("comment") or "").strip())
                question, text = (row.get("question") or "").strip(), (row.get("answer") or "").strip()
                where = {"sheet": str(sheet), "row": line}
                if review.score is None and not review.correction:
                    unused.append({**where, "reason": UNSCORED, "detail": "no score and no correction"})
                    continue
                if not question or (not text and not review.correction):
                    unused.append({**where, "reason": EMPTY_ANSWER, "detail": "the question or the answer is empty"})
                    continue
                key = (row.get("set") or "", fold(question), row.get("model") or "", fold(text))
                answer = answers.setdefault(key, Answer(key[0], question, key[2], text))
                if any(r.reviewer == review.reviewer for r in answer.reviews):
                    unused.append({**where, "reason": REPEATED_REVIEW,
                                   "detail": f"{review.reviewer} reviewed this answer already"})
                    continue
                answer.reviews.append(review)
    return list(answers.values()), unused


def build(answers: list[Answer], config: QatuneConfig) -> tuple[list, list, list, dict[str, Any], set[tuple]]:
    """DPO pairs, KTO examples and SFT records from the reviewed answers, the counts of what was left out, and
    the (sheet, row) of every review that went into an output."""
    cfg = config.feedback
    used: set[tuple[str, int]] = set()
    by_question: dict[tuple[str, str], list[Answer]] = defaultdict(list)
    for answer in answers:
        if answer.mean is not None and answer.text:
            by_question[(answer.set, fold(answer.question))].append(answer)
    dpo, dropped = [], Counter()
    for scored in by_question.values():
        best, worst = max(scored, key=lambda a: a.mean), min(scored, key=lambda a: a.mean)
        reason = (SINGLE_ANSWER if len(scored) < 2 else TIE if best.mean == worst.mean
                  else BELOW_MARGIN if best.mean - worst.mean < cfg.margin
                  else IDENTICAL_ANSWERS if fold(best.text) == fold(worst.text) else None)
        if reason:
            dropped[reason] += 1
            continue
        dpo.append({"question": best.question, "chosen": best.text, "rejected": worst.text,
                    "provenance": {"margin": best.mean - worst.mean, "chosen": best.provenance(),
                                   "rejected": worst.provenance()}})
        used.update(_rows(best) | _rows(worst))
    kto, labels = [], Counter()
    for answer in (a for group in by_question.values() for a in group):
        label = True if answer.mean >= cfg.desirable_at else False if answer.mean <= cfg.undesirable_at else None
        labels["desirable" if label else "undesirable" if label is False else "between_thresholds"] += 1
        if label is not None:
            kto.append({"messages": [{"role": "user", "content": answer.question},
                                     {"role": "assistant", "content": answer.text}],
                        "label": label, "provenance": answer.provenance()})
            used.update(_rows(answer))
    sft, seen = [], set()
    for answer in answers:
        for review in answer.reviews:
            if not review.correction:
                continue
            used.add((review.sheet, review.row))
            key = (fold(answer.question), fold(review.correction))
            if key in seen:
                labels["repeated_corrections"] += 1
                continue
            seen.add(key)
            sft.append({"question": answer.question, "answer": review.correction,
                        "provenance": {**review.provenance(), "set": answer.set, "corrects_model": answer.model,
                                       "corrects_answer": answer.text}})
    counts = {"questions": len(by_question), "dpo_pairs": len(dpo), "dpo_dropped": dict(dropped),
              "kto_examples": len(kto), "kto_labels": dict(labels), "sft_records": len(sft)}
    return dpo, kto, sft, counts, used


def agreement(answers: list[Answer]) -> dict[str, Any]:
    """How far reviewers agree on the answers two or more of them scored: pairwise exact and within-one-point
    agreement, the mean absolute difference, and the spread of each reviewer's mean score."""
    pairs = [(x, y) for a in answers for x, y in itertools.combinations(a.scores, 2)]
    by_reviewer: dict[str, list[int]] = defaultdict(list)
    for answer in answers:
        for review in answer.reviews:
            if review.score is not None:
                by_reviewer[review.reviewer].append(review.score)
    return {
        "reviewers": {name: {"scored": len(s), "mean": statistics.mean(s)} for name, s in sorted(by_reviewer.items())},
        "answers_scored_by_several": sum(1 for a in answers if len(a.scores) > 1),
        "pairs_compared": len(pairs),
        "exact": sum(x == y for x, y in pairs) / len(pairs) if pairs else None,
        "within_one": sum(abs(x - y) <= 1 for x, y in pairs) / len(pairs) if pairs else None,
        "mean_abs_difference": statistics.mean(abs(x - y) for x, y in pairs) if pairs else None,
    }


def feedback(config: QatuneConfig, sheets: list[str | Path]) -> FeedbackResult:
    """Read the sheets, build the three datasets, and write them with the unused rows and the report."""
    if not sheets:
        raise DataError("no review sheet given", hint="qatune data feedback REVIEW_SHEET.csv [MORE.csv ...]")
    out = Path(config.feedback.output_dir)
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not config.feedback.overwrite:
        raise DataError(f"{out} holds {', '.join(existing)} already", Location(str(out)),
                        hint="set feedback.overwrite=true to replace them, or choose another feedback.output_dir")
    answers, unused = read_sheets(sheets)
    dpo, kto, sft, counts, used = build(answers, config)
    for answer in answers:
        for review in answer.reviews:
            if (review.sheet, review.row) not in used:
                unused.append({"sheet": review.sheet, "row": review.row, "reason": NOT_USED,
                               "detail": _why_unused(answer, config)})
    unused.sort(key=lambda u: (u["sheet"], u["row"]))
    rows = sum(len(a.reviews) for a in answers) + sum(1 for u in unused if u["reason"] != NOT_USED)
    report = {"sheets": [str(s) for s in sheets], "rows": rows, "answers": len(answers), **counts,
              "agreement": agreement(answers), "unused_rows": dict(Counter(u["reason"] for u in unused)),
              "settings": config.feedback.model_dump(mode="json"), "files": list(OUTPUTS)}
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("dpo.jsonl", dpo), ("kto.jsonl", kto), ("sft.jsonl", sft), ("unused.jsonl", unused)):
        atomic.write_jsonl(out / name, records)
    atomic.write_json(out / "feedback_report.json", report)
    return FeedbackResult(out, dpo, kto, sft, unused, report)


def _score(text: str | None, loc: Location) -> int | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value not in (1, 2, 3, 4, 5):
        raise DataError(f"score {text!r} is not a whole number from 1 to 5", loc,
                        hint="score 1 (wrong or harmful) to 5 (correct and complete), or leave it empty")
    return int(value)


def _rows(answer: Answer) -> set[tuple[str, int]]:
    return {(r.sheet, r.row) for r in answer.reviews if r.score is not None}


def _why_unused(answer: Answer, config: QatuneConfig) -> str:
    cfg = config.feedback
    if answer.mean is None:
        return "no score (its correction, if any, is used)"
    return (f"mean score {answer.mean:.2f} is between undesirable_at={cfg.undesirable_at} and desirable_at="
            f"{cfg.desirable_at}, and the answer is in no pair (not its question's best or worst by margin "
            f"{cfg.margin})")
