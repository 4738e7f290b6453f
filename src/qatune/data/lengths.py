"""`data.max_length` left unset is chosen from the data: the 99th percentile of the conversations' full token
lengths, rounded up to a multiple of 64, so about 1% of samples are cut instead of whatever share a fixed 1024
(or the 256 of an old example) happens to cut. A value the user sets is used as given. `data.prepare` prints
the choice and the share it cuts, keeps them in data_report.json (`max_length_choice`), and sets the chosen
value on the config, so the stages after (training, evaluation) use it too."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qatune.config import DataConfig
from qatune.data.records import Conversation

if TYPE_CHECKING:
    from qatune.data.templates import ChatTemplate

AUTO_PERCENTILE = 99  # an unset max_length keeps this share of samples whole
AUTO_MULTIPLE = 64
AUTO_MIN, AUTO_MAX = 128, 4096  # the longest a CPU trains in reasonable memory; a longer one is the user's call


def max_length_unset(data: DataConfig) -> bool:
    """Whether data.max_length was left to the data (neither in the config file nor on the command line)."""
    return "max_length" not in data.model_fields_set


def use_chosen_max_length(data: DataConfig, value: int) -> None:
    """Give the later stages the chosen length while it stays the data's choice (unset) for the next prepare."""
    data.max_length = value
    data.model_fields_set.discard("max_length")


def choose_max_length(convs: list[Conversation], tokenizer: Any, template: "ChatTemplate | None",
                      data: DataConfig) -> dict[str, Any] | None:
    """data.max_length for these conversations: the AUTO_PERCENTILE of their full token lengths (every turn,
    rendered with the template), rounded up to AUTO_MULTIPLE, within [AUTO_MIN, AUTO_MAX] and the tokenizer's
    own limit; with the share of samples longer than it (cut or dropped). None where there is nothing to
    measure (plain texts are cut into blocks of max_length, not fitted: continued pre-training keeps it)."""
    import numpy as np

    from qatune.data.templates import tokenize

    chats = [conv for conv in convs if not conv.is_text]
    if not chats or template is None:
        return None
    lengths = [len(samples[0].input_ids) for _, samples in
               tokenize(chats, tokenizer, template, max_length=1 << 30, train_on_prompt=data.train_on_prompt)
               if samples]
    if not lengths:
        return None
    measured = float(np.percentile(lengths, AUTO_PERCENTILE))
    ceiling = min(AUTO_MAX, getattr(tokenizer, "model_max_length", AUTO_MAX) or AUTO_MAX)
    value = int(min(max(-(-measured // AUTO_MULTIPLE) * AUTO_MULTIPLE, AUTO_MIN), max(ceiling, AUTO_MIN)))
    return {"source": "data", "value": value, "percentile": AUTO_PERCENTILE, "measured": int(measured),
            "samples_measured": len(lengths), "longer_share": round(sum(n > value for n in lengths) / len(lengths), 4)}
