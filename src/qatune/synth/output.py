"""What from_docs and augment share: the output decision, the index of existing questions, the length
filter, and the written dataset with its report and drops (`.report.json`, `.dropped.jsonl`).

The three files are one output: any of them already there is replaced only with the section's
`overwrite` (`--force`), and never when it is one of the stage's own inputs. Each is written to a
temporary name and renamed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatune import files as atomic
from qatune.config import QatuneConfig
from qatune.data import clean
from qatune.data.records import EMPTY, TOO_SHORT, Conversation, DropLog
from qatune.errors import DataError, Location
from qatune.synth.generator import journal_file


@dataclass
class SynthResult:
    output: Path
    records: list[dict[str, Any]]
    report: dict[str, Any]
    log: DropLog
    summary: str  # one line of counts for the terminal


def output_files(output: Path) -> tuple[Path, Path, Path]:
    """The dataset and its sidecars: drops (`.dropped.jsonl`) and report (`.report.json`)."""
    return output, output.with_suffix(".dropped.jsonl"), output.with_suffix(".report.json")


def decide_output(path: str, overwrite: bool, key: str, inputs: list[Path] = ()) -> tuple[Path, bool]:
    """(the output file, whether it replaces existing files): the dataset and its sidecars are replaced
    only with the section's `overwrite` (`key`, `--force`), and never when one of them is an input."""
    output = Path(path)
    if output.suffix != ".jsonl":
        raise DataError(f"{key}: the output must be a .jsonl file", Location(str(output)))
    written = output_files(output)
    read = {p.resolve() for p in inputs}
    clash = [p for p in written if p.resolve() in read]
    if clash:
        raise DataError(f"{key}: writing {', '.join(str(p) for p in clash)} would replace an input of this stage",
                        Location(str(output)), hint="choose another --out")
    folders = [p for p in written if p.is_dir()]
    if folders:
        raise DataError(f"{key}: {folders[0]} is a folder", Location(str(output)), hint="choose another --out")
    existing = [p for p in written if p.exists()]
    if existing and not overwrite:
        raise DataError(f"{key}: the output already exists ({', '.join(p.name for p in existing)} in {output.parent})",
                        Location(str(output)), hint=f"choose another --out, or --force ({key.split('.')[0]}"
                                                    ".overwrite=true) to replace them")
    return output, bool(existing)


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
    """The dataset, its drops and its report (with counts, seconds and the files written); then the journal
    of the generation is removed: the output holds all it kept."""
    _, drops, report_file = output_files(output)
    atomic.write_jsonl(output, records)
    atomic.write_text(drops, log.as_jsonl())
    report = {**report, "records": len(records), "dropped": log.by_reason(), "seconds": round(time.perf_counter()
              - started, 2), "files": [output.name, drops.name, report_file.name]}
    atomic.write_json(report_file, report)
    journal_file(output).unlink(missing_ok=True)
    return SynthResult(output, records, report, log, summary)
