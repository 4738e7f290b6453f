"""`qatune data from-docs DIR`: Q&A pairs from domain documents, each citing its file, section and lines,
deduplicated against the existing data, written as a qa-format dataset `qatune data prepare` reads.

A recipe (see `qatune.recipe`):
- `plan` checks the output (replaced only with from_docs.overwrite), the prompt, the documents, the data
  to deduplicate against and the model; it reads, never writes or loads.
- `setup` reads and chunks the documents, indexes the existing questions, loads the model.
- `run` generates (resuming an interrupted run), parses, grounds, filters, deduplicates and writes the
  dataset, its report and its drops.

The teacher is `model` or an OpenAI-compatible endpoint (`endpoint.url`, `--endpoint`). A question the
model left without an answer gets the cited chunk's best-answering sentences (`answer_source: extract`,
see `synth.grounding`); answers the chunk does not support are dropped as `unsupported`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatune.config import QatuneConfig, SourceConfig
from qatune.data import clean
from qatune.data.documents import Chunk, Documents
from qatune.data.records import GENERATED_DROP_REASONS, UNPARSEABLE, UNSUPPORTED, DropLog
from qatune.runtime import Runtime
from qatune.synth.generator import Generator, Journal, Teacher
from qatune.synth.grounding import extract_answer, supported
from qatune.synth.output import SynthResult, long_enough, write_output
from qatune.synth.prompts import (
    CITATIONS,
    DOCS_FIELDS,
    DOCS_PROMPTS,
    LANGUAGE_NAMES,
    load_prompt,
    parse_questions,
)


@dataclass(frozen=True)
class FromDocsPlan:
    config: QatuneConfig
    runtime: Runtime
    docs: Path
    output: Path
    replaces: bool  # the output exists and from_docs.overwrite (--force) lets it be replaced
    prompts: dict[str, str]  # per language
    against: list[SourceConfig]  # the existing data new questions must not repeat


@dataclass(frozen=True)
class FromDocsComponents:
    started: float
    documents: Documents
    index: clean.QuestionIndex  # the existing questions, then each one kept
    existing: int  # questions in the existing data
    teacher: Teacher


def plan(config: QatuneConfig, runtime: Runtime, docs: str | Path) -> FromDocsPlan:
    """Check everything from-docs needs; reads only."""
    from qatune.data.documents import document_files
    from qatune.data.sources import source_files
    from qatune.models import locate_model
    from qatune.synth.output import decide_output

    cfg = config.from_docs
    against = cfg.against or config.data.sources
    inputs = document_files(docs)[0] + [f for _, found in source_files(against) for f in found]
    output, replaces = decide_output(cfg.output, cfg.overwrite, "from_docs.output", inputs)
    prompts = load_prompt(cfg.prompt, DOCS_PROMPTS, DOCS_FIELDS, "text")
    if not config.endpoint.url:
        locate_model(config.model)
    return FromDocsPlan(config, runtime, Path(docs), output, replaces, prompts, against)


def setup(plan: FromDocsPlan, generator: Generator | None = None) -> FromDocsComponents:
    """Documents chunked, the existing questions indexed, then the teacher (`generator` stands in for it)."""
    from qatune.data.documents import read_documents
    from qatune.data.sources import load_domain
    from qatune.synth.generator import teacher
    from qatune.synth.output import question_index

    started = time.perf_counter()
    config, cfg = plan.config, plan.config.from_docs
    documents = read_documents(plan.docs, cfg.max_chunk_words, config.data.encoding)
    existing = load_domain(config.data, plan.against).domain if plan.against else []
    index = question_index(config, existing, "existing ")
    writer = teacher(config, plan.runtime, cfg.decoding, cfg.batch_size, generator)
    return FromDocsComponents(started, documents, index, len(existing), writer)


def run(plan: FromDocsPlan, components: FromDocsComponents) -> SynthResult:
    """Generate pairs for every chunk; keep the new, grounded ones, with their citation; write them."""
    from qatune.synth.generator import generate_in_slices

    config, cfg, console = plan.config, plan.config.from_docs, plan.runtime.console
    documents, chunks = components.documents, components.documents.chunks
    for file, why in documents.skipped.items():  # also in the report's skipped_documents
        console.print(f"[yellow]skipped {file}: {why}[/yellow]")
    texts = [plan.prompts[c.language].format(text=c.text, section=c.section or c.file, file=c.file,
                                             pairs=cfg.pairs_per_chunk, language=LANGUAGE_NAMES[c.language])
             for c in chunks]
    journal = Journal(plan.output)
    outputs, resumed = generate_in_slices(components.teacher, texts, "chunks", console, journal)
    log = DropLog(reasons=GENERATED_DROP_REASONS)
    records: list[dict[str, Any]] = []
    generated = 0
    for chunk, out in zip(chunks, outputs):
        pairs = parse_questions(out)
        if not pairs:
            log.add(UNPARSEABLE, chunk.file, chunk.location, f"no question in the output: {out[:200]!r}")
        generated += len(pairs)
        records += _new_pairs(chunk, pairs, config, components.index, log, components.teacher.name)
    report = {
        "documents": documents.files, "skipped_documents": documents.skipped, "chunks": len(chunks),
        "chunks_by_language": {lang: sum(c.language == lang for c in chunks) for lang in LANGUAGE_NAMES},
        "pairs_generated": generated, "pairs_kept": len(records),
        "answers_extracted": sum(r["provenance"]["answer_source"] == "extract" for r in records),
        "existing_questions": components.existing, "resumed_chunks": resumed, **components.teacher.report(),
        "prompt": cfg.prompt or "built-in", "cite": cfg.cite,
    }
    summary = (f"{len(documents.files)} documents, {len(chunks)} chunks, {generated} pairs generated, "
               f"{len(records)} kept.")
    return write_output(plan.output, records, report, log, components.started, summary)


def from_docs(config: QatuneConfig, docs: str | Path, runtime: Runtime | None = None,
              generator: Generator | None = None) -> SynthResult:
    """Q&A pairs from the documents at `docs`, each with its `source`, deduplicated against existing data."""
    recipe_plan = plan(config, runtime or Runtime.detect(), docs)
    return run(recipe_plan, setup(recipe_plan, generator))


def _new_pairs(chunk: Chunk, pairs: list[tuple[str, str | None]], config: QatuneConfig,
               index: clean.QuestionIndex, log: DropLog, teacher: str) -> list[dict[str, Any]]:
    """The records of one chunk's pairs that are grounded in it, long enough and ask something new (added to
    `index`); a question without an answer takes the chunk's best-answering sentences."""
    records = []
    form = config.data.clean.unicode_form
    for number, (question, answer) in enumerate(pairs, start=1):
        question = clean.normalize_text(question, form)
        label = f"{chunk.location} pair {number}"
        if answer is None:
            answer, answer_source = extract_answer(question, chunk.text), "extract"
            if answer is None:
                log.add(UNSUPPORTED, chunk.file, label, f"no sentence of the chunk answers {question!r}")
                continue
        else:
            answer, answer_source = clean.normalize_text(answer, form), "model"
        if not long_enough(question, answer, config, log, chunk.file, label):
            continue
        repeat = index.duplicate_of(question)
        if repeat:
            log.add(repeat[0], chunk.file, label, f"question repeats {repeat[1]}")
            continue
        if answer_source == "model" and not supported(answer, chunk.text):
            log.add(UNSUPPORTED, chunk.file, label, f"the chunk does not support the answer {answer[:200]!r}")
            continue
        index.add(question, label)
        where = f"{chunk.file} § {chunk.section}" if chunk.section else chunk.file
        source = {"file": chunk.file, "section": chunk.section, "lines": list(chunk.lines) if chunk.lines else None}
        cited = answer + CITATIONS[chunk.language].format(where=where) if config.from_docs.cite else answer
        provenance = {"teacher": teacher, "prompt": config.from_docs.prompt or "built-in", "answer_source": answer_source}
        records.append({"question": question, "answer": cited, "source": source, "provenance": provenance})
    return records
