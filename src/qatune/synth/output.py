"""What from_docs and augment share: the output decision, the index of existing questions, the length
filter, and the written dataset with its report and drops (`.report.json`, `.dropped.jsonl`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatune.config import QatuneConfig
from qatune.data import clean
from qatune.data.records import EMPTY, TOO_SHORT, Conversation, DropLog
from qatune.errors import DataError, Location


@dataclass
class SynthResult:
    output: Path
    records: list[dict[str, Any]]
    report: dict[str, Any]
    log: DropLog
    summary: str  # one line of counts for the terminal


def decide_output(path: str, overwrite: bool) -> tuple[Path, bool]:
    """(the output file, whether it replaces an existing one): an existing file is replaced only with
    the section's `overwrite` (`--force`)."""
    output = Path(path)
    if output.exists() and not overwrite:
        raise DataError("the output file already exists", Location(str(output)),
                        hint="choose another --out, or --force to replace it")
    if output.suffix != ".jsonl":
        raise DataError("the output must be a .jsonl file", Location(str(output)))
    return output, output.exists()


def question_index(config: QatuneConfig, convs: list[Conversation], label: str) -> clean.QuestionIndex:
    """An index of `convs`' questions, each labelled `label` + its location in the duplicate drops."""
    index = clean.QuestionIndex(config.data.clean)
    for conv in convs:
        index.add(conv.question, f"{label}{conv.location}")
    return index


def long_enough(question: str, answer: str, config: QatuneConfig, log: DropLog, source: str,
                location: Location | str) -> bool:
    """The data stage's length filter, applied before writing (it would drop the pair later anyway)."""
    cfg = config.data.clean
    for side, text, minimum in (("question", question, cfg.min_question_length),
                                ("answer", answer, cfg.min_answer_length)):
        length = clean.text_length(text)
        if length < max(minimum, 1):
            log.add(TOO_SHORT if length else EMPTY, source, location, f"{side} has {length} words, minimum {minimum}")
            return False
    return True


def write_output(output: Path, records: list[dict[str, Any]], report: dict[str, Any], log: DropLog,
                 started: float, summary: str) -> SynthResult:
    """The dataset, its drops and its report (with counts, seconds and the files written)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    drops = output.with_suffix(".dropped.jsonl")
    drops.write_text(log.as_jsonl(), encoding="utf-8")
    report = {**report, "records": len(records), "dropped": log.by_reason(), "seconds": round(time.perf_counter()
              - started, 2), "files": [output.name, drops.name, output.with_suffix(".report.json").name]}
    output.with_suffix(".report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    return SynthResult(output, records, report, log, summary)
