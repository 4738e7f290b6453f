"""Degenerate answers: what a metric average hides.

Per answer, the flags below; per model and set, their shares (x100) and distinct-1/2.

- `loop`: caught in a repetition loop: one piece (2 to 60 characters) repeated back to back at
  least 3 times, the run covering at least a third of the answer ("范围阴性！范围阴性！范围阴性！").
- `echo`: the question repeated instead of answered: the answer starts with the question, or the
  question (at least 4 characters) makes up at least half of the answer.
- `truncated`: generation was cut at `max_new_tokens` before the model ended its turn.
- `empty`: nothing but white space.
- `wrong_language`: a Chinese question answered without Chinese, or a question without Chinese
  answered in Chinese (`metrics.is_chinese`).

distinct-n (Li et al. 2016): distinct n-grams over all n-grams of a model's answers on a set,
Chinese by character, English by word (`metrics.text_units`), x100. Low values mean the same
words over and over.
"""

from __future__ import annotations

import re
from typing import Any

from qatune.eval.metrics import is_chinese, text_units

FLAGS = ("loop", "echo", "truncated", "empty", "wrong_language")
SHARES = tuple(f"{flag}_share" for flag in FLAGS)
DISTINCT = ("distinct_1", "distinct_2")
METHOD = ("loop: a 2-60 character piece repeated back to back 3+ times over a third of the answer or more; "
          "echo: the answer starts with the question or is half question; truncated: all of max_new_tokens used; "
          "wrong_language: a Chinese question answered without Chinese or vice versa; shares x100. "
          "distinct-1/2: distinct n-grams / all n-grams of the set's answers (Chinese by character, English by "
          "word), x100")

_REPEATED = re.compile(r"(.{2,60}?)\1{2,}", re.DOTALL)
_SPACE = re.compile(r"\s+")
LOOP_COVERAGE = 1 / 3  # a repeated list item or two ("1. ... 2. ...") stays well under a third of an answer
ECHO_SHARE = 0.5


def _squeeze(text: str) -> str:
    return _SPACE.sub(" ", text).strip().lower()


def is_loop(answer: str) -> bool:
    """One piece repeated back to back 3+ times, the run covering a third of the answer or more."""
    text = _squeeze(answer)
    return any(m.end() - m.start() >= LOOP_COVERAGE * len(text) for m in _REPEATED.finditer(text))


def is_echo(question: str, answer: str) -> bool:
    """The question repeated instead of answered."""
    q, a = _squeeze(question).rstrip("?？ "), _squeeze(answer)
    if len(q) < 4 or not a:
        return False
    return a.startswith(q) or (q in a and len(q) >= ECHO_SHARE * len(a))


def is_wrong_language(question: str, answer: str) -> bool:
    if not answer.strip() or not question.strip():
        return False
    return is_chinese(question) != is_chinese(answer)


def answer_flags(question: str, answer: str, stopped: bool) -> list[str]:
    """The flags of FLAGS that fit one answer, in FLAGS order; `stopped`: the model ended its turn itself."""
    if not answer.strip():
        return ["empty"] if stopped else ["truncated", "empty"]
    found = {"loop": is_loop(answer), "echo": is_echo(question, answer), "truncated": not stopped,
             "empty": False, "wrong_language": is_wrong_language(question, answer)}
    return [flag for flag in FLAGS if found[flag]]


def distinct_n(answers: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the answers, x100 (0 when there is no n-gram)."""
    grams = [tuple(tokens[i:i + n]) for tokens in map(text_units, answers) for i in range(len(tokens) - n + 1)]
    return 100 * len(set(grams)) / len(grams) if grams else 0.0


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Shares of flagged answers (x100) and distinct-1/2 of the answers in `rows` (each with `prediction`, `flags`)."""
    if not rows:
        return {}
    out = {f"{flag}_share": 100 * sum(flag in r["flags"] for r in rows) / len(rows) for flag in FLAGS}
    answers = [r["prediction"] for r in rows]
    out.update({"distinct_1": distinct_n(answers, 1), "distinct_2": distinct_n(answers, 2)})
    return out
