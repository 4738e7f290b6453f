"""`qatune data answer QUESTIONS`: a teacher answers a question list, written as a qa dataset to tune a
smaller model on (sequence-level distillation, Kim & Rush 2016).

QUESTIONS is a `.txt` file (one question a line) or a `.jsonl` file of objects with a `question` field.
The teacher is `model` or an OpenAI-compatible endpoint (`--endpoint URL --endpoint-model NAME`); a run
that was killed, or stopped by an endpoint that kept failing, resumes: the questions answered already
are skipped. Every record says who answered, how and where its question came from (`provenance`).

A recipe (see `qatune.recipe`): `plan` checks the input and the output and reads nothing else; `setup`
reads the questions and loads (or connects) the teacher; `run` answers and writes the dataset, its report
and drops.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatune.config import QatuneConfig
from qatune.data import clean
from qatune.data.records import DUPLICATE, GENERATED_DROP_REASONS, DropLog
from qatune.errors import DataError, Location
from qatune.runtime import Runtime
from qatune.synth.generator import Generator, Journal, Teacher
from qatune.synth.output import SynthResult, long_enough, write_output

QUESTION_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class AnswerPlan:
    config: QatuneConfig
    runtime: Runtime
    questions: Path
    output: Path
    replaces: bool


@dataclass(frozen=True)
class Question:
    text: str
    line: int


@dataclass(frozen=True)
class AnswerComponents:
    started: float
    questions: list[Question]
    log: DropLog  # repeated questions, counted while reading
    teacher: Teacher


def plan(config: QatuneConfig, runtime: Runtime, questions: str | Path) -> AnswerPlan:
    """Check the question file, the output and the teacher's whereabouts; reads only."""
    from qatune.models import locate_model
    from qatune.synth.output import decide_output

    path = Path(questions)
    if not path.is_file():
        raise DataError("the question file does not exist", Location(str(path)),
                        hint="give a .txt file (one question a line) or a .jsonl file with a `question` field")
    if path.suffix not in QUESTION_SUFFIXES:
        raise DataError(f"a question list must be .txt or .jsonl, not {path.suffix or 'a file without suffix'}",
                        Location(str(path)), hint="one question a line (.txt), or {\"question\": ...} lines (.jsonl)")
    output, replaces = decide_output(config.answer.output, config.answer.overwrite, "answer.output", [path])
    if not config.endpoint.url:
        locate_model(config.model)
    return AnswerPlan(config, runtime, path, output, replaces)


def read_questions(path: Path, form: str, log: DropLog) -> list[Question]:
    """The questions of `path` with their line numbers; exact repeats dropped (counted in `log`)."""
    found: list[Question] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            text = line.strip() if path.suffix == ".txt" else _jsonl_question(line, path, number)
            text = clean.normalize_text(text, form)
            if text in seen:
                log.add(DUPLICATE, str(path), Location(str(path), number), f"repeats line {seen[text]}")
                continue
            seen[text] = number
            found.append(Question(text, number))
    if not found:
        raise DataError("the question file holds no question", Location(str(path)))
    return found


def _jsonl_question(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc.msg}", Location(str(path), number)) from None
    question = record.get("question") if isinstance(record, dict) else None
    if not isinstance(question, str) or not question.strip():
        raise DataError("no `question` text in this record", Location(str(path), number, "question"),
                        hint='each line needs {"question": "..."}')
    return question


def setup(plan: AnswerPlan, generator: Generator | None = None) -> AnswerComponents:
    """The questions read, then the teacher loaded or connected (`generator` stands in for it)."""
    from qatune.synth.generator import teacher

    started = time.perf_counter()
    config, cfg = plan.config, plan.config.answer
    log = DropLog(reasons=GENERATED_DROP_REASONS)
    questions = read_questions(plan.questions, config.data.clean.unicode_form, log)[:cfg.max_questions]
    writer = teacher(config, plan.runtime, cfg.decoding, cfg.batch_size, generator, system=cfg.system)
    return AnswerComponents(started, questions, log, writer)


def run(plan: AnswerPlan, components: AnswerComponents) -> SynthResult:
    """Answer every question (skipping those a stopped run answered), keep the non-empty answers, write them."""
    from qatune.synth.generator import generate_in_slices

    config, cfg, log = plan.config, plan.config.answer, components.log
    journal = Journal(plan.output)
    questions = components.questions
    answers, resumed = generate_in_slices(components.teacher, [q.text for q in questions], "answers",
                                          plan.runtime.console, journal)
    records: list[dict[str, Any]] = []
    for question, answer in zip(questions, answers):
        answer = clean.normalize_text(answer.strip(), config.data.clean.unicode_form)
        where = Location(str(plan.questions), question.line)
        if not long_enough(question.text, answer, config, log, str(plan.questions), where):
            continue
        records.append({"question": question.text, "answer": answer, "provenance": {
            "teacher": components.teacher.name, "prompt": {"system": cfg.system, "user": "the question"},
            "source": {"file": str(plan.questions), "line": question.line}, "method": "answer"}})
    report = {"questions": str(plan.questions), "questions_read": len(questions), "answers_kept": len(records),
              "resumed_answers": resumed, **components.teacher.report(), "system": cfg.system,
              "max_new_tokens": cfg.decoding.max_new_tokens, "temperature": cfg.decoding.temperature}
    summary = f"{len(questions)} questions, {len(records)} answers kept ({resumed} from an earlier run)."
    return write_output(plan.output, records, report, log, components.started, summary)


def answer(config: QatuneConfig, questions: str | Path, runtime: Runtime | None = None,
           generator: Generator | None = None) -> SynthResult:
    """The teacher's answer to every question of `questions`, written as a qa dataset with provenance."""
    recipe_plan = plan(config, runtime or Runtime.detect(), questions)
    return run(recipe_plan, setup(recipe_plan, generator))
