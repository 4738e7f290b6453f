"""Keeping from-docs pairs grounded in the chunk they cite, whatever the model.

A small model often writes a question and no answer (the embedded 135M model, on a travel-policy
document: "How can I find out if my hotel has been approved with the official invoice?" and nothing
after it), and sometimes an answer from its own head. So:
- a question without an answer gets the chunk's sentences that best answer it (most content terms
  shared with the question; the runner-up too when it scores at least half as well), marked
  `answer_source: extract`;
- a question that shares no content term with any sentence of the chunk, and a model answer whose
  content terms are mostly absent from the chunk, are dropped as `unsupported`.

Content terms: lower-cased words of three letters or more outside a short stop list, a plural `s` cut
(English); character bigrams (Chinese, no spaces to split words at). Plain overlap, no model: the
check is cheap, explainable in the drop log, and the same for every teacher.
"""

from __future__ import annotations

import re

from qatune.data import clean

# Share of a model answer's content terms the chunk must hold for the answer to count as supported.
SUPPORT_SHARE = 0.5

_STOP = frozenset("""
the and for are was were been being has have had with that this these those from into onto upon about above
below what when where which while who whom whose why how can could should would will shall may might must does
did doing done not any all each every some such than then them they their there here its it's our your you
his her him she out over under again very more most other only own same also just too much many per
between within without after before during through because whether tell text document section say says said
""".split())
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
_CJK = re.compile(r"[\u3400-\u9fff]+")
_SENTENCE_END = re.compile(r"(?<=[.!?;。！？；])\s+|(?<=[。！？；])|\n+")


def content_terms(text: str) -> set[str]:
    """The words (and Chinese character bigrams) that carry meaning in `text`."""
    lowered = text.lower()
    terms = {w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
             for w in _WORD.findall(lowered) if len(w) >= 3 and w not in _STOP}
    for run in _CJK.findall(lowered):
        terms.update(run[i:i + 2] for i in range(len(run) - 1)) if len(run) > 1 else terms.add(run)
    return terms


def sentences(text: str) -> list[str]:
    """The sentences of a chunk, in order (list items and headings count as sentences)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip() and clean.text_length(s.strip()) >= 3]


def extract_answer(question: str, chunk_text: str) -> str | None:
    """The chunk's sentences that best answer `question`, in document order; None when none shares a term."""
    wanted = content_terms(question)
    scored = [(len(wanted & content_terms(s)), i, s) for i, s in enumerate(sentences(chunk_text))]
    scored = [item for item in scored if item[0] > 0]
    if not scored:
        return None
    scored.sort(key=lambda item: (-item[0], item[1]))
    best = [scored[0]] + [item for item in scored[1:2] if 2 * item[0] >= scored[0][0]]
    return " ".join(s for _, _, s in sorted(best, key=lambda item: item[1]))


def supported(answer: str, chunk_text: str) -> bool:
    """Whether most of the answer's content terms are in the chunk (an answer of no content term is not)."""
    terms = content_terms(answer)
    if not terms:
        return False
    return len(terms & content_terms(chunk_text)) >= SUPPORT_SHARE * len(terms)
