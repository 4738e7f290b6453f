"""Normalisation, filters, exact and near-duplicate removal, train/eval leakage. Every drop is logged.

Near-duplicates use MinHash LSH (datasketch) over character n-grams, which works the same for
Chinese (no word boundaries) and English. The first occurrence is kept; later ones are dropped
with the location of the record they repeat.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
import zlib
from collections.abc import Iterable

from qatune.config import CleanConfig
from qatune.data.records import (
    DUPLICATE,
    EMPTY,
    EVAL_LEAKAGE,
    IDENTICAL_PAIR,
    NEAR_DUPLICATE,
    TOO_SHORT,
    Conversation,
    DropLog,
)

# Zero-width spaces and byte-order marks carry no text; \u200d (joiner) is kept for emoji.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u2060\ufeff"), None)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BLANK_LINES = re.compile(r"\n{3,}")
_CJK = "\u2e80-\u2fff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_UNIT = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str, form: str = "NFC") -> str:
    """Unicode form, newlines, invisible and control characters, trailing spaces, blank-line runs.

    Spaces inside a line are kept: they are indentation in code answers.
    """
    if form != "none":
        text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ").translate(_INVISIBLE)
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def cjk_share(text: str) -> float:
    """Share of CJK characters among the non-space characters: above ~0.3 the text is Chinese (or Japanese...)."""
    chars = _SPACES.sub("", text)
    return len(re.findall(f"[{_CJK}]", chars)) / len(chars) if chars else 0.0


def fold(text: str) -> str:
    """The comparison form of a text: NFKC ("？" is "?"), lower case, one space between words."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def words(text: str) -> list[str]:
    """The words of a text, each CJK character counting as one ("头疼怎么办" is 5, "sore throat" is 2)."""
    return _UNIT.findall(text)


def text_length(text: str) -> int:
    """Length in words, each CJK character counting as one word."""
    return len(words(text))


def normalize(conv: Conversation, form: str) -> None:
    for message in conv.messages + (conv.rejected or []):
        message["content"] = normalize_text(message["content"], form)


def rejection(conv: Conversation, cfg: CleanConfig) -> tuple[str, str] | None:
    """Why a (normalised) record must go, as (reason, detail), or None to keep it."""
    for i, message in enumerate(conv.messages):
        if message["role"] != "system" and not message["content"]:
            return EMPTY, f"turn {i + 1} ({message['role']}) is empty"
    if conv.is_text:
        length = text_length(conv.messages[0]["content"])
        if length < cfg.min_answer_length:
            return TOO_SHORT, f"text has {length} words, minimum {cfg.min_answer_length}"
        return None
    for side, minimum in (("question", cfg.min_question_length), ("answer", cfg.min_answer_length)):
        length = text_length(getattr(conv, side))
        if length < minimum:
            return TOO_SHORT, f"{side} has {length} words, minimum {minimum}"
    if conv.rejected is not None:
        rejected = "\n".join(m["content"] for m in conv.rejected)
        if not rejected:
            return EMPTY, "the rejected answer is empty"
        if text_length(rejected) < cfg.min_answer_length:
            return TOO_SHORT, f"rejected answer has {text_length(rejected)} words, minimum {cfg.min_answer_length}"
        chosen = conv.messages[len(conv.messages) - len(conv.rejected):]
        if fold(rejected) == fold("\n".join(m["content"] for m in chosen)):
            return IDENTICAL_PAIR, "chosen and rejected answers are the same text"
    return None


def exact_key(conv: Conversation) -> str:
    # A pair is the same record only with the same rejected answer (and a KTO row with the same label).
    payload = conv.messages if conv.rejected is None and conv.label is None else [conv.messages, conv.rejected,
                                                                                 conv.label]
    return hashlib.sha1(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def drop_exact_duplicates(convs: Iterable[Conversation], log: DropLog, seen: dict[str, str] | None = None) -> list[Conversation]:
    """Keep the first of each identical conversation. `seen` can carry keys over from earlier lists."""
    seen = {} if seen is None else seen
    kept = []
    for conv in convs:
        key = exact_key(conv)
        if key in seen:
            log.add(DUPLICATE, conv.source, conv.location, f"same as {seen[key]}")
            continue
        seen[key] = str(conv.location)
        kept.append(conv)
    return kept


class NearDuplicateIndex:
    """MinHash LSH over character n-grams of NFKC-folded, lower-cased, space-collapsed text."""

    def __init__(self, cfg: CleanConfig):
        from datasketch import MinHash, MinHashLSH

        self._cfg = cfg
        self._lsh = MinHashLSH(threshold=cfg.near_dup_threshold, num_perm=cfg.num_perm)
        # Permutations are drawn once and shared: drawing them per MinHash costs more than hashing.
        self._prototype = MinHash(num_perm=cfg.num_perm, seed=1)
        self._labels: list[str] = []

    def signature(self, text: str):
        from datasketch import MinHash

        text = fold(text)  # here only, not in the stored text: "？" and "?" are the same for duplicate detection
        n = self._cfg.ngram
        shingles = {text[i:i + n].encode() for i in range(max(1, len(text) - n + 1))}
        # crc32 instead of datasketch's default sha1: ~2x faster, and as deterministic.
        sig = MinHash(num_perm=self._cfg.num_perm, hashfunc=zlib.crc32,
                      permutations=self._prototype.permutations, scheme=self._prototype.scheme)
        sig.update_batch(list(shingles))
        return sig

    def add(self, signature, label: str) -> None:
        self._lsh.insert(len(self._labels), signature, check_duplication=False)
        self._labels.append(label)

    def match(self, signature) -> str | None:
        """The label of an indexed text similar to this one, if any."""
        hits = self._lsh.query(signature)
        return self._labels[min(hits)] if hits else None


def _dedup_text(conv: Conversation) -> str:
    return "\n".join(m["content"] for m in conv.messages + (conv.rejected or []) if m["role"] != "system")


def drop_near_duplicates(convs: list[Conversation], cfg: CleanConfig, log: DropLog) -> list[Conversation]:
    index = NearDuplicateIndex(cfg)
    kept = []
    for conv in convs:
        sig = index.signature(_dedup_text(conv))
        original = index.match(sig)
        if original is not None:
            log.add(NEAR_DUPLICATE, conv.source, conv.location, f"near-duplicate of {original}")
            continue
        index.add(sig, str(conv.location))
        kept.append(conv)
    return kept


class QuestionIndex:
    """Questions seen so far (existing data, then each one kept), to look new questions up in: exact after
    folding and trailing punctuation, and near-duplicate by MinHash when `near_dedup` is on. Generated
    pairs and paraphrases are deduplicated through it."""

    _END = "?？.。!！ "

    def __init__(self, cfg: CleanConfig):
        self._exact: dict[str, str] = {}
        self._near = NearDuplicateIndex(cfg) if cfg.near_dedup else None

    def duplicate_of(self, question: str) -> tuple[str, str] | None:
        """(DUPLICATE or NEAR_DUPLICATE, label of the question it repeats), or None if it is new."""
        label = self._exact.get(fold(question).rstrip(self._END))
        if label is not None:
            return DUPLICATE, label
        label = self._near.match(self._near.signature(question)) if self._near else None
        return (NEAR_DUPLICATE, label) if label is not None else None

    def add(self, question: str, label: str) -> None:
        self._exact.setdefault(fold(question).rstrip(self._END), label)
        if self._near:
            self._near.add(self._near.signature(question), label)


def drop_eval_leakage(
    train: list[Conversation], evaluation: list[Conversation], cfg: CleanConfig, log: DropLog
) -> list[Conversation]:
    """Remove train records whose question near-duplicates an eval question (eval stays intact)."""
    if not evaluation:
        return train
    index = NearDuplicateIndex(cfg)
    for conv in evaluation:
        index.add(index.signature(conv.question), str(conv.location))
    kept = []
    for conv in train:
        match = index.match(index.signature(conv.question))
        if match is not None:
            log.add(EVAL_LEAKAGE, conv.source, conv.location, f"question near-duplicates eval record {match}")
            continue
        kept.append(conv)
    return kept
