"""Data grown by a model: Q&A pairs from documents (`qatune data from-docs`) and question paraphrases
(`qatune data augment`).

Both render a prompt the user can replace, generate with `infer.generation.generate` (or an injected
generator), parse the output leniently, deduplicate through `clean.QuestionIndex` against the data that
already exists, and write a qa-format JSONL dataset that `qatune data prepare` reads as it is, with a
report and every dropped pair (`.report.json`, `.dropped.jsonl`) beside it. Each record says where it
comes from: `source` (file, section, lines) for a pair from a document, `provenance` for a paraphrase.
"""

from __future__ import annotations

import json
import re
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune.config import QatuneConfig, SourceConfig
from qatune.data import clean
from qatune.data.records import CAP_REACHED, EMPTY, GENERATED_DROP_REASONS, TOO_SHORT, UNPARSEABLE, DropLog
from qatune.errors import DataError, Location

if TYPE_CHECKING:
    from rich.console import Console

# User prompts in, the model's outputs out, in the same order.
Generator = Callable[[list[str]], list[str]]

LANGUAGE_NAMES = {"zh": "中文", "en": "English"}
DOCS_PROMPTS = {
    "en": (
        'Read the text below from the document "{file}", section "{section}". Write {pairs} questions that a '
        "reader of this document could ask, each answered only from the text. Write in English.\n"
        "Use exactly this form for each pair:\nQ: <question>\nA: <answer>\n\nText:\n{text}"
    ),
    "zh": (
        "阅读下面摘自文档《{file}》“{section}”一节的文字，写出{pairs}个读者可能会问的问题，并只根据这段文字回答。用中文书写。\n"
        "每一对严格按以下格式：\n问：<问题>\n答：<答案>\n\n文字：\n{text}"
    ),
}
AUGMENT_PROMPTS = {
    "en": ("Rewrite the question below in {count} different ways with the same meaning, one per line, "
           "without answering it.\n\nQuestion: {question}"),
    "zh": "用{count}种不同的说法改写下面的问题，意思不变，每行一个，不要回答。\n\n问题：{question}",
}
DOCS_FIELDS = ("text", "section", "file", "pairs", "language")
AUGMENT_FIELDS = ("question", "answer", "count", "language")
CITATIONS = {"en": " (Source: {where})", "zh": "（来源：{where}）"}

_QUESTION = re.compile(r"^(?:q|question|问题?)\s*\d*\s*[:：]\s*(.*)$", re.IGNORECASE)
_ANSWER = re.compile(r"^(?:a|answer|答案?|回答)\s*\d*\s*[:：]\s*(.*)$", re.IGNORECASE)
_LIST_MARK = re.compile(r"^\s*(?:\d+\s*[.)、）]|[-*•·]|[①②③④⑤⑥⑦⑧⑨⑩])\s*")
_LABEL = re.compile(r"^(?:paraphrase|rewrite|question|改写|问题|说法)\s*\d*\s*[:：]\s*", re.IGNORECASE)


@dataclass
class SynthResult:
    output: Path
    records: list[dict[str, Any]]
    report: dict[str, Any]
    log: DropLog


# ---------------------------------------------------------------------------------------------
# Prompts, generation, parsing


def load_prompt(path: str | None, defaults: dict[str, str], fields: tuple[str, ...], required: str) -> dict[str, str]:
    """The prompt template per language: the user's file for both languages, else the built-in ones."""
    if path is None:
        return defaults
    file = Path(path)
    if not file.is_file():
        raise DataError("prompt file not found", Location(str(file)))
    template = file.read_text(encoding="utf-8")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise DataError(f"not a valid prompt template: {exc}", Location(str(file)),
                        hint="write {{ and }} for literal braces") from None
    unknown = sorted(names - set(fields))
    if unknown:
        raise DataError(f"unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}", Location(str(file)),
                        hint=f"use {', '.join('{' + f + '}' for f in fields)}; write {{{{ and }}}} for literal braces")
    if required not in names:
        raise DataError(f"the prompt never shows the model {{{required}}}", Location(str(file)),
                        hint=f"put {{{required}}} where the model should read it")
    return {language: template for language in LANGUAGE_NAMES}


def model_generator(config: QatuneConfig, max_new_tokens: int, temperature: float, top_p: float,
                    repetition_penalty: float, batch_size: int) -> Generator:
    """Generate with `config.model` and its chat template (each prompt is one user turn)."""
    import torch

    from qatune.data.templates import resolve_template
    from qatune.infer.generation import Decoding, generate
    from qatune.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    template = resolve_template(tokenizer, config.data.template)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(config.model).to(device)
    decoding = Decoding(max_new_tokens, temperature, top_p, repetition_penalty)

    def run(prompts: list[str]) -> list[str]:
        answers = generate(model, tokenizer, template.source, [[{"role": "user", "content": p}] for p in prompts],
                           decoding, template.end_of_turn_id, batch_size)
        return [a.text for a in answers]

    return run


def _generate_all(generator: Generator, prompts: list[str], step: int, what: str,
                  console: "Console | None") -> list[str]:
    """Generate in slices so that a long job shows its progress."""
    outputs: list[str] = []
    for start in range(0, len(prompts), step):
        outputs += generator(prompts[start:start + step])
        if console:
            console.print(f"generated {len(outputs)}/{len(prompts)} {what}")
    return outputs


def parse_pairs(output: str) -> list[tuple[str, str]]:
    """Question/answer pairs in a model's output: `Q:`/`A:` (Question/Answer, 问/答, numbered, bold) lines,
    or a JSON list of {question, answer} objects. Text outside the markers is ignored."""
    found = _json_pairs(output)
    if found:
        return found
    pairs: list[tuple[str, str]] = []
    question: list[str] = []
    answer: list[str] | None = None
    for raw in output.split("\n"):
        line = _LIST_MARK.sub("", raw.replace("**", "").strip()).strip()
        if q := _QUESTION.match(line):
            if question and answer:
                pairs.append((" ".join(question).strip(), " ".join(answer).strip()))
            question, answer = [q.group(1)], None
        elif (a := _ANSWER.match(line)) and question:
            answer = [a.group(1)]
        elif line and answer is not None:
            answer.append(line)
        elif line and question and answer is None:
            question.append(line)
    if question and answer:
        pairs.append((" ".join(question).strip(), " ".join(answer).strip()))
    return [(q, a) for q, a in pairs if q and a]


def _json_pairs(output: str) -> list[tuple[str, str]]:
    start, end = output.find("["), output.rfind("]")
    if start < 0 or end <= start:
        return []
    try:
        items = json.loads(output[start:end + 1])
    except json.JSONDecodeError:
        return []
    return [(str(i["question"]).strip(), str(i["answer"]).strip()) for i in items
            if isinstance(i, dict) and i.get("question") and i.get("answer")]


def parse_paraphrases(output: str) -> list[str]:
    """One paraphrase per non-empty line, without list marks, labels or quotes."""
    found = []
    for raw in output.split("\n"):
        line = _LABEL.sub("", _LIST_MARK.sub("", raw.replace("**", "").strip())).strip().strip("\"'“”「」")
        if line:
            found.append(line)
    return found


# ---------------------------------------------------------------------------------------------
# The two stages


def from_docs(config: QatuneConfig, docs: str | Path, generator: Generator | None = None,
              console: "Console | None" = None) -> SynthResult:
    """Q&A pairs from the documents at `docs`, each with its `source`, deduplicated against existing data."""
    from qatune.data.documents import read_documents

    cfg = config.from_docs
    started = time.perf_counter()
    output = _check_output(cfg.output, cfg.overwrite)
    prompts = load_prompt(cfg.prompt, DOCS_PROMPTS, DOCS_FIELDS, "text")
    documents = read_documents(docs, cfg.max_chunk_words, config.data.encoding)
    log = DropLog(reasons=GENERATED_DROP_REASONS)
    if console:
        for file, why in documents.skipped.items():  # also in the report's skipped_documents
            console.print(f"[yellow]skipped {file}: {why}[/yellow]")
    chunks = documents.chunks
    index, existing = _existing_questions(config, cfg.against or config.data.sources)
    generator = generator or model_generator(config, cfg.max_new_tokens, cfg.temperature, 1.0,
                                             cfg.repetition_penalty, cfg.batch_size)
    texts = [prompts[c.language].format(text=c.text, section=c.section or c.file, file=c.file,
                                        pairs=cfg.pairs_per_chunk, language=LANGUAGE_NAMES[c.language])
             for c in chunks]
    outputs = _generate_all(generator, texts, cfg.batch_size * 4, "chunks", console)
    records: list[dict[str, Any]] = []
    generated = 0
    for chunk, out in zip(chunks, outputs):
        pairs = parse_pairs(out)
        if not pairs:
            log.add(UNPARSEABLE, chunk.file, chunk.location, f"no Q:/A: pair in the output: {out[:200]!r}")
        for number, (question, answer) in enumerate(pairs, start=1):
            generated += 1
            question = clean.normalize_text(question, config.data.clean.unicode_form)
            answer = clean.normalize_text(answer, config.data.clean.unicode_form)
            label = f"{chunk.location} pair {number}"
            if not _long_enough(question, answer, config, log, chunk.file, label):
                continue
            repeat = index.duplicate_of(question)
            if repeat:
                log.add(repeat[0], chunk.file, label, f"question repeats {repeat[1]}")
                continue
            index.add(question, label)
            where = f"{chunk.file} § {chunk.section}" if chunk.section else chunk.file
            source = {"file": chunk.file, "section": chunk.section,
                      "lines": list(chunk.lines) if chunk.lines else None}
            cited = answer + CITATIONS[chunk.language].format(where=where) if cfg.cite else answer
            records.append({"question": question, "answer": cited, "source": source})
    report = {
        "documents": documents.files, "skipped_documents": documents.skipped, "chunks": len(chunks),
        "chunks_by_language": {lang: sum(c.language == lang for c in chunks) for lang in LANGUAGE_NAMES},
        "pairs_generated": generated, "pairs_kept": len(records), "existing_questions": existing,
        "model": config.model.name_or_path, "prompt": cfg.prompt or "built-in", "cite": cfg.cite,
    }
    return _write(output, records, report, log, started)


def augment(config: QatuneConfig, generator: Generator | None = None,
            console: "Console | None" = None) -> SynthResult:
    """Paraphrases of each single-turn question of data.sources, capped per question, deduplicated against
    every original question and each other; each record keeps the original's answer and its provenance."""
    cfg = config.augment
    started = time.perf_counter()
    output = _check_output(cfg.output, cfg.overwrite)
    prompts = load_prompt(cfg.prompt, AUGMENT_PROMPTS, AUGMENT_FIELDS, "question")
    if not config.data.sources:
        raise DataError("nothing to augment: data.sources is empty", hint="give the dataset with --data FILE")
    from qatune.data.prepare import load

    loaded = load(config.data.model_copy(update={"general_sources": [], "eval_sources": [], "mix_ratio": None}))
    log = DropLog(reasons=GENERATED_DROP_REASONS)
    single = [c for c in loaded.domain if not c.is_text and [m["role"] for m in c.messages if m["role"] != "system"]
              == ["user", "assistant"]]
    originals = single[:cfg.max_questions]
    index = clean.QuestionIndex(config.data.clean)
    for conv in loaded.domain:
        index.add(conv.question, f"the question at {conv.location}")
    generator = generator or model_generator(config, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                             cfg.repetition_penalty, cfg.batch_size)
    texts = []
    for conv in originals:
        language = "zh" if clean.cjk_share(conv.question) > 0.3 else "en"
        text = prompts[language].format(question=conv.question, answer=conv.answer, count=cfg.per_question,
                                        language=LANGUAGE_NAMES[language])
        texts += [text] * cfg.samples
    outputs = _generate_all(generator, texts, cfg.batch_size * 4, "outputs", console)
    records: list[dict[str, Any]] = []
    candidates = 0
    for number, conv in enumerate(originals):
        kept = 0
        system = next((m["content"] for m in conv.messages if m["role"] == "system"), None)
        for sample in outputs[number * cfg.samples:(number + 1) * cfg.samples]:
            lines = parse_paraphrases(sample)
            if not lines:
                log.add(UNPARSEABLE, conv.source, conv.location, f"no paraphrase in the output: {sample[:200]!r}")
            for line in lines:
                candidates += 1
                question = clean.normalize_text(line, config.data.clean.unicode_form)
                label = f"paraphrase {kept + 1} of {conv.location}"
                if not _long_enough(question, conv.answer, config, log, conv.source, conv.location):
                    continue
                repeat = index.duplicate_of(question)
                if repeat:
                    log.add(repeat[0], conv.source, conv.location, f"{question!r} repeats {repeat[1]}")
                    continue
                if kept == cfg.per_question:
                    log.add(CAP_REACHED, conv.source, conv.location,
                            f"{question!r}: augment.per_question={cfg.per_question} already kept")
                    continue
                index.add(question, label)
                kept += 1
                record = {"question": question, "answer": conv.answer}
                if system:
                    record["system"] = system
                record["provenance"] = {"original_question": conv.question, "source": conv.source,
                                        "location": str(conv.location), "method": "paraphrase",
                                        "model": config.model.name_or_path}
                records.append(record)
    report = {
        "sources": [s.path for s in config.data.sources], "questions_read": len(loaded.domain),
        "questions_paraphrased": len(originals), "skipped_not_single_turn": len(loaded.domain) - len(single),
        "read_drops": loaded.log.by_reason(), "candidates": candidates, "paraphrases_kept": len(records),
        "per_question": cfg.per_question, "samples": cfg.samples, "temperature": cfg.temperature,
        "model": config.model.name_or_path, "prompt": cfg.prompt or "built-in",
    }
    return _write(output, records, report, log, started)


# ---------------------------------------------------------------------------------------------
# Shared parts


def _check_output(path: str, overwrite: bool) -> Path:
    output = Path(path)
    if output.exists() and not overwrite:
        raise DataError("the output file already exists", Location(str(output)),
                        hint="choose another --out, or --force to replace it")
    if output.suffix != ".jsonl":
        raise DataError("the output must be a .jsonl file", Location(str(output)))
    return output


def _existing_questions(config: QatuneConfig, sources: list[SourceConfig]) -> tuple[clean.QuestionIndex, int]:
    """An index of the questions in the existing data (read and cleaned as `prepare` reads it)."""
    from qatune.data.prepare import load

    index = clean.QuestionIndex(config.data.clean)
    if not sources:
        return index, 0
    loaded = load(config.data.model_copy(update={"sources": sources, "general_sources": [], "eval_sources": [],
                                                 "mix_ratio": None}))
    for conv in loaded.domain:
        index.add(conv.question, f"existing {conv.location}")
    return index, len(loaded.domain)


def _long_enough(question: str, answer: str, config: QatuneConfig, log: DropLog, source: str,
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


def _write(output: Path, records: list[dict[str, Any]], report: dict[str, Any], log: DropLog,
           started: float) -> SynthResult:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    drops = output.with_suffix(".dropped.jsonl")
    drops.write_text("".join(json.dumps({"reason": d.reason, "source": d.source, "location": d.location,
                                         "detail": d.detail}, ensure_ascii=False) + "\n" for d in log.drops),
                     encoding="utf-8")
    report = {**report, "records": len(records), "dropped": log.by_reason(), "seconds": round(time.perf_counter()
              - started, 2), "files": [output.name, drops.name, output.with_suffix(".report.json").name]}
    output.with_suffix(".report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    return SynthResult(output, records, report, log)
