"""The one record type every format becomes, and the ledger of dropped records."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from qatune.errors import Location


@dataclass(slots=True)
class Conversation:
    """One training example: a list of {role, content} turns, where it came from, optional tools."""

    messages: list[dict[str, str]]
    source: str
    location: Location
    tools: list | None = None
    # Preference data: the rejected answer turn(s) of a pair (`messages` ends with the chosen one), or
    # KTO's verdict on the last answer of `messages` (True: desirable).
    rejected: list[dict[str, str]] | None = None
    label: bool | None = None

    @property
    def is_text(self) -> bool:
        return self.messages[0]["role"] == "text"

    def text_of(self, *roles: str) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] in roles)

    @property
    def question(self) -> str:
        """The user side, used for leakage checks and evaluation (the document itself for text)."""
        return self.text_of("user", "text")

    @property
    def answer(self) -> str:
        return self.text_of("assistant")


# Why a record was dropped. Every drop is counted under one of these and written to dropped.jsonl.
MALFORMED = "malformed"
EMPTY = "empty"
TOO_SHORT = "too_short"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near_duplicate"
EVAL_LEAKAGE = "eval_leakage"
TOO_LONG = "too_long"
CONTROL_TOKEN = "control_token"
IDENTICAL_PAIR = "identical_pair"  # a preference pair whose chosen and rejected answers are the same text
DROP_REASONS = (MALFORMED, EMPTY, TOO_SHORT, DUPLICATE, NEAR_DUPLICATE, EVAL_LEAKAGE, CONTROL_TOKEN, TOO_LONG,
                IDENTICAL_PAIR)
# Why a generated pair or paraphrase was not kept (`qatune data from-docs`, `qatune data augment`).
UNPARSEABLE = "unparseable"  # the model's output holds no question/answer (or paraphrase) it could be read as
CAP_REACHED = "cap_reached"  # more paraphrases than augment.per_question
UNSUPPORTED = "unsupported"  # a from-docs answer the cited chunk does not support (or no sentence of it answers)
GENERATED_DROP_REASONS = (EMPTY, UNPARSEABLE, TOO_SHORT, DUPLICATE, NEAR_DUPLICATE, CAP_REACHED, UNSUPPORTED)


@dataclass(slots=True)
class Drop:
    reason: str
    source: str
    location: str
    detail: str = ""


@dataclass
class DropLog:
    """Every dropped record with its reason, source and location: nothing disappears silently."""

    drops: list[Drop] = field(default_factory=list)
    reasons: tuple[str, ...] = DROP_REASONS  # the known reasons, in report order

    def add(self, reason: str, source: str, location: Location | str, detail: str = "") -> None:
        assert reason in self.reasons, reason
        self.drops.append(Drop(reason, source, str(location), detail))

    def by_reason(self) -> dict[str, int]:
        counts = Counter(d.reason for d in self.drops)
        return {r: counts[r] for r in self.reasons if counts[r]}

    def by_source(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter] = {}
        for d in self.drops:
            out.setdefault(d.source, Counter())[d.reason] += 1
        return {s: dict(c) for s, c in out.items()}

    def as_jsonl(self) -> str:
        """One JSON object a line per drop: the `dropped.jsonl` beside every dataset qatune writes."""
        return "".join(json.dumps({"reason": d.reason, "source": d.source, "location": d.location,
                                   "detail": d.detail}, ensure_ascii=False) + "\n" for d in self.drops)

    def __len__(self) -> int:
        return len(self.drops)
