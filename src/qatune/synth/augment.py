"""`qatune data augment`: paraphrases of each single-turn question of data.sources, capped per question,
deduplicated against every original question and each other; each record keeps the original's answer
and says where it comes from (`provenance`).

A recipe (see `qatune.recipe`):
- `plan` checks the output (replaced only with augment.overwrite), the prompt, the sources and the
  model; it reads, never writes or loads.
- `setup` reads and cleans the sources as `qatune data prepare` would, indexes their questions, loads
  the model.
- `run` samples paraphrases, filters, deduplicates, caps and writes the dataset, its report and drops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatune.config import QatuneConfig
from qatune.data import clean
from qatune.data.records import (
    CAP_REACHED,
    GENERATED_DROP_REASONS,
    UNPARSEABLE,
    Conversation,
    DropLog,
)
from qatune.data.sources import LoadedData
from qatune.errors import DataError
from qatune.runtime import Runtime
from qatune.synth.generator import Generator, Journal, Teacher
from qatune.synth.output import SynthResult, long_enough, write_output
from qatune.synth.prompts import (
    AUGMENT_FIELDS,
    AUGMENT_PROMPTS,
    LANGUAGE_NAMES,
    load_prompt,
    parse_paraphrases,
)


@dataclass(frozen=True)
class AugmentPlan:
    config: QatuneConfig
    runtime: Runtime
    output: Path
    replaces: bool  # the output exists and augment.overwrite (--force) lets it be replaced
    prompts: dict[str, str]  # per language


@dataclass(frozen=True)
class AugmentComponents:
    started: float
    loaded: LoadedData  # data.sources, read and cleaned
    single_turn: list[Conversation]  # the questions that can be paraphrased (one user turn, one answer)
    index: clean.QuestionIndex  # every original question, then each paraphrase kept
    teacher: Teacher


def plan(config: QatuneConfig, runtime: Runtime) -> AugmentPlan:
    """Check everything augment needs; reads only."""
    from qatune.data.sources import source_files
    from qatune.models import locate_model
    from qatune.synth.output import decide_output

    cfg = config.augment
    if not config.data.sources:
        raise DataError("nothing to augment: data.sources is empty", hint="give the dataset with --data FILE")
    inputs = [f for _, found in source_files(config.data.sources) for f in found]
    output, replaces = decide_output(cfg.output, cfg.overwrite, "augment.output", inputs)
    prompts = load_prompt(cfg.prompt, AUGMENT_PROMPTS, AUGMENT_FIELDS, "question")
    if not config.endpoint.url:
        locate_model(config.model)
    return AugmentPlan(config, runtime, output, replaces, prompts)


def setup(plan: AugmentPlan, generator: Generator | None = None) -> AugmentComponents:
    """The sources read and cleaned, their questions indexed, then the teacher (`generator` stands in for it)."""
    from qatune.data.sources import load_domain
    from qatune.synth.generator import teacher
    from qatune.synth.output import question_index

    started = time.perf_counter()
    config, cfg = plan.config, plan.config.augment
    loaded = load_domain(config.data)
    single = [c for c in loaded.domain if not c.is_text and [m["role"] for m in c.messages if m["role"] != "system"]
              == ["user", "assistant"]]
    index = question_index(config, loaded.domain, "the question at ")
    writer = teacher(config, plan.runtime, cfg.decoding, cfg.batch_size, generator)
    return AugmentComponents(started, loaded, single, index, writer)


def run(plan: AugmentPlan, components: AugmentComponents) -> SynthResult:
    """Sample paraphrases of every original question; keep the new ones up to the cap; write them."""
    from qatune.synth.generator import generate_in_slices

    config, cfg = plan.config, plan.config.augment
    loaded = components.loaded
    originals = components.single_turn[:cfg.max_questions]
    texts = []
    for conv in originals:
        language = "zh" if clean.cjk_share(conv.question) > 0.3 else "en"
        text = plan.prompts[language].format(question=conv.question, answer=conv.answer, count=cfg.per_question,
                                             language=LANGUAGE_NAMES[language])
        texts += [text] * cfg.samples
    journal = Journal(plan.output)
    outputs, resumed = generate_in_slices(components.teacher, texts, "outputs", plan.runtime.console, journal)
    log = DropLog(reasons=GENERATED_DROP_REASONS)
    records: list[dict[str, Any]] = []
    candidates = 0
    for number, conv in enumerate(originals):
        kept: list[dict[str, Any]] = []
        for sample in outputs[number * cfg.samples:(number + 1) * cfg.samples]:
            lines = parse_paraphrases(sample)
            if not lines:
                log.add(UNPARSEABLE, conv.source, conv.location, f"no paraphrase in the output: {sample[:200]!r}")
            candidates += len(lines)
            kept += _new_paraphrases(conv, lines, len(kept), config, components.index, log, components.teacher.name)
        records += kept
    report = {
        "sources": [s.path for s in config.data.sources], "questions_read": len(loaded.domain),
        "questions_paraphrased": len(originals),
        "skipped_not_single_turn": len(loaded.domain) - len(components.single_turn),
        "read_drops": loaded.log.by_reason(), "candidates": candidates, "paraphrases_kept": len(records),
        "per_question": cfg.per_question, "samples": cfg.samples, "temperature": cfg.decoding.temperature,
        "resumed_outputs": resumed, **components.teacher.report(), "prompt": cfg.prompt or "built-in",
    }
    summary = f"{len(originals)} questions, {candidates} candidate paraphrases, {len(records)} kept."
    return write_output(plan.output, records, report, log, components.started, summary)


def augment(config: QatuneConfig, runtime: Runtime | None = None, generator: Generator | None = None) -> SynthResult:
    """Paraphrases of each single-turn question of data.sources, written as a qa dataset with provenance."""
    recipe_plan = plan(config, runtime or Runtime.detect())
    return run(recipe_plan, setup(recipe_plan, generator))


def _new_paraphrases(conv: Conversation, lines: list[str], kept_before: int, config: QatuneConfig,
                     index: clean.QuestionIndex, log: DropLog, teacher: str) -> list[dict[str, Any]]:
    """The records of one output's paraphrases of `conv` that are long enough, new (added to `index`) and
    within augment.per_question (`kept_before` of them kept already)."""
    cap = config.augment.per_question
    system = next((m["content"] for m in conv.messages if m["role"] == "system"), None)
    records: list[dict[str, Any]] = []
    for line in lines:
        question = clean.normalize_text(line, config.data.clean.unicode_form)
        kept = kept_before + len(records)
        if not long_enough(question, conv.answer, config, log, conv.source, conv.location):
            continue
        repeat = index.duplicate_of(question)
        if repeat:
            log.add(repeat[0], conv.source, conv.location, f"{question!r} repeats {repeat[1]}")
            continue
        if kept == cap:
            log.add(CAP_REACHED, conv.source, conv.location, f"{question!r}: augment.per_question={cap} already kept")
            continue
        index.add(question, f"paraphrase {kept + 1} of {conv.location}")
        record = {"question": question, "answer": conv.answer}
        if system:
            record["system"] = system
        record["provenance"] = {"original_question": conv.question, "source": conv.source,
                                "location": str(conv.location), "method": "paraphrase", "teacher": teacher,
                                "prompt": config.augment.prompt or "built-in"}
        records.append(record)
    return records
