"""Reference-based answer metrics, each computed one documented way so a number can be reproduced.

- BLEU-4: sacrebleu sentence BLEU with exponential (NIST) smoothing, the smoothing nltk calls
  `method3` and LLaMA-Factory uses; Chinese is tokenized by character (sacrebleu `zh`), English
  with sacrebleu's `13a`. Averaged over answers, x100, as LLaMA-Factory reports it.
- ROUGE-1/2/L F1: rouge-chinese (LLaMA-Factory's library) on jieba words for Chinese and on
  lower-cased words for English. Averaged over answers, x100.
- Exact match and token F1: SQuAD's normalisation (lower case, no punctuation, no English
  articles); Chinese is compared character by character, runs of Latin letters or digits as words.

An answer's language is its reference's: Chinese when CJK characters are at least a fifth of it.
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from collections import Counter
from functools import lru_cache
from typing import Any

TEXT_METRICS = ("bleu4", "rouge1", "rouge2", "rougeL", "exact_match", "token_f1")
METHODS = {
    "bleu4": "sacrebleu sentence BLEU-4, smooth=exp (nltk method3), tokenize zh (Chinese) / 13a (English), "
             "mean over answers x100",
    "rouge": "rouge-chinese F1 (distinct n-grams, summary-level LCS) on jieba words (Chinese) / lower-cased "
             "words (English), mean over answers x100",
    "exact_match": "SQuAD normalisation; Chinese by character; mean x100",
    "token_f1": "SQuAD token F1; Chinese by character; mean x100",
    "perplexity": "exp of the token-weighted mean loss on the reference answers (assistant tokens and "
                  "end-of-turn, as trained)",
    "accuracy": "multiple choice by the log-likelihood of each choice's text after the question (cloze); "
                "`accuracy` per character (lm-evaluation-harness acc_norm), `accuracy_raw` in total (acc)",
    "latency": "per answer, generated in batches: from the start of its batch to its last token",
}

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
_WORD = re.compile(r"\w+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PIECES = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]|[^\W_]+")


def is_chinese(text: str) -> bool:
    """Chinese (or other CJK) when CJK characters are at least a fifth of the non-space characters."""
    chars = sum(1 for c in text if not c.isspace())
    return chars > 0 and len(_CJK.findall(text)) * 5 >= chars


@lru_cache(maxsize=1)
def _jieba() -> Any:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading banner is not the user's business
    return jieba


@lru_cache(maxsize=2)
def _bleu(chinese: bool) -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="zh" if chinese else "13a", smooth_method="exp", effective_order=True)


def bleu_signatures() -> dict[str, str]:
    signatures = {}
    for lang in ("zh", "en"):
        bleu = _bleu(lang == "zh")
        bleu.sentence_score("a", ["a"])  # sacrebleu signs a metric only once it has scored something
        signatures[lang] = str(bleu.get_signature())
    return signatures


def rouge_words(text: str, chinese: bool) -> list[str]:
    if chinese:
        return [w for w in _jieba().cut(text) if w.strip()]
    return _WORD.findall(text.lower())


def _rouge(prediction: str, reference: str, chinese: bool) -> dict[str, float]:
    from rouge_chinese import Rouge

    hypothesis, ref = rouge_words(prediction, chinese), rouge_words(reference, chinese)
    if not hypothesis or not ref:
        return {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    scores = Rouge().get_scores(" ".join(hypothesis), " ".join(ref))[0]
    return {"rouge1": scores["rouge-1"]["f"] * 100, "rouge2": scores["rouge-2"]["f"] * 100,
            "rougeL": scores["rouge-l"]["f"] * 100}


def _normalize_squad(text: str) -> str:
    text = "".join(" " if unicodedata.category(c).startswith("P") or c in string.punctuation else c
                   for c in text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_tokens(text: str) -> list[str]:
    """Tokens for exact match and F1: each CJK character alone, other letter/digit runs as words."""
    return _PIECES.findall(_normalize_squad(text))


def text_units(text: str) -> list[str]:
    """Each CJK character alone, other letter/digit runs as lower-cased words; nothing dropped (distinct-n)."""
    return _PIECES.findall(text.lower())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 100 * 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return 100.0 if answer_tokens(prediction) == answer_tokens(reference) else 0.0


def score_answer(prediction: str, reference: str) -> dict[str, float]:
    """All text metrics of one answer against its reference (each 0-100)."""
    chinese = is_chinese(reference)
    if not prediction.strip():
        return dict.fromkeys(TEXT_METRICS, 0.0)
    bleu = _bleu(chinese).sentence_score(prediction, [reference]).score
    return {"bleu4": bleu, **_rouge(prediction, reference, chinese),
            "exact_match": exact_match(prediction, reference), "token_f1": token_f1(prediction, reference)}


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in 0-100."""
    import numpy as np

    return float(np.percentile(values, q)) if values else 0.0
