"""The prompts the model is given (built in per language, or the user's file) and the lenient parsers
that read its outputs back."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from qatune.errors import DataError, Location

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


def parse_pairs(output: str) -> list[tuple[str, str]]:
    """Question/answer pairs in a model's output: `Q:`/`A:` (Question/Answer, 问/答, numbered, bold) lines,
    or a JSON list of {question, answer} objects. Text outside the markers is ignored."""
    return [(q, a) for q, a in parse_questions(output) if a]


def parse_questions(output: str) -> list[tuple[str, str | None]]:
    """Every question in a model's output with its answer, or None where the model wrote none: marked
    pairs as `parse_pairs` reads them, a marked question left unanswered, or, in an output without any
    marker, the bare lines that end with a question mark."""
    found = _json_pairs(output)
    if found:
        return found
    pairs: list[tuple[str, str | None]] = []
    question: list[str] = []
    answer: list[str] | None = None
    marked = False

    def close() -> None:
        if question:
            pairs.append((" ".join(question).strip(), " ".join(answer).strip() if answer else None))

    for raw in output.split("\n"):
        line = _LIST_MARK.sub("", raw.replace("**", "").strip()).strip()
        if q := _QUESTION.match(line):
            marked = True
            close()
            question, answer = [q.group(1)], None
        elif (a := _ANSWER.match(line)) and question:
            answer = [a.group(1)]
        elif line and answer is not None:
            answer.append(line)
        elif line and question and answer is None:
            question.append(line)
    close()
    if not marked:
        pairs = [(line, None) for line in _bare_questions(output)]
    return [(q, a or None) for q, a in pairs if q]


def _bare_questions(output: str) -> list[str]:
    lines = (_LIST_MARK.sub("", raw.replace("**", "").strip()).strip() for raw in output.split("\n"))
    return [line for line in lines if line.endswith(("?", "？")) and len(line) > 8]


def _json_pairs(output: str) -> list[tuple[str, str | None]]:
    start, end = output.find("["), output.rfind("]")
    if start < 0 or end <= start:
        return []
    try:
        items = json.loads(output[start:end + 1])
    except json.JSONDecodeError:
        return []
    return [(str(i["question"]).strip(), str(i["answer"]).strip() if i.get("answer") else None) for i in items
            if isinstance(i, dict) and i.get("question")]


def parse_paraphrases(output: str) -> list[str]:
    """One paraphrase per non-empty line, without list marks, labels or quotes."""
    found = []
    for raw in output.split("\n"):
        line = _LABEL.sub("", _LIST_MARK.sub("", raw.replace("**", "").strip())).strip().strip("\"'“”「」")
        if line:
            found.append(line)
    return found
