"""`train.stage: kto`: Kahneman-Tversky Optimization (TRL's KTOTrainer) on answers labelled desirable or
undesirable, against the base with the adapter switched off (LoRA) or precomputed log-probabilities. It reads
the record format `kto` (a conversation ending with the answer, and a boolean `label`; LLaMA-Factory's
`kto_tag`) and preference pairs, each pair one desirable and one undesirable answer (TRL's unpairing).
`preference.desirable_weight` / `undesirable_weight` weigh the two."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qatune.data.formats import RecordFormat, field_column, from_turns, tags_of
from qatune.data.records import Conversation
from qatune.errors import DataError, DataFormatError, Location
from qatune.train.stages.preference import PreferenceStage

if TYPE_CHECKING:
    from qatune.config import DataConfig, QatuneConfig, SourceConfig
    from qatune.data.records import DropLog
    from qatune.data.templates import ChatTemplate

NAME = "kto"
_LABELS = {True: True, False: False, "true": True, "false": False, "1": True, "0": False}  # 1 == True, 0 == False


def _labelled_answer(record: dict[str, Any], source: "SourceConfig", name: str, loc: Location) -> Conversation:
    field = "conversations" if field_column(source, "conversations") in record else "messages"
    turns = record.get(field_column(source, field))
    conv = from_turns(record, source, name, loc, sharegpt=tags_of(turns, source) is source.tags)
    column = field_column(source, "label")
    value = record.get(column)
    label = _LABELS.get(value.strip().lower() if isinstance(value, str) else value) \
        if isinstance(value, (bool, int, str)) else None
    if label is None:
        raise DataFormatError(f"expected a boolean label (true: the last answer is desirable), got {value!r:.40}",
                              loc.with_field(column))
    conv.label = label
    return conv


RECORD_FORMAT = RecordFormat(
    NAME, ("messages", "label"), ("conversations", "tools"), _labelled_answer,
    recognise=lambda present, record, source: "label" in present and bool(present & {"messages", "conversations"}),
    either_turn_field=True, dataset_info_column="kto_tag")


def _unpaired_rows(prompt: list, chosen: list, rejected: list | None, label: bool | None,
                   common: dict[str, Any]) -> list[dict[str, Any]]:
    """An answer with its label; a pair is one desirable and one undesirable answer."""
    if rejected is None:
        return [{"prompt": prompt, "completion": chosen, "label": label, **common}]
    return [{"prompt": prompt, "completion": chosen, "label": True, **common},
            {"prompt": prompt, "completion": rejected, "label": False, **common, "messages": prompt + rejected}]


class KtoStage(PreferenceStage):
    def trl_arguments(self, config: "QatuneConfig", precompute_reference: bool) -> dict[str, Any]:
        pref = config.preference
        # KTO estimates its KL term from each batch's neighbours in a fixed order (TRL refuses any other)
        return {"beta": self.beta(config), "desirable_weight": pref.desirable_weight,
                "undesirable_weight": pref.undesirable_weight, "precompute_ref_log_probs": precompute_reference,
                "train_sampling_strategy": "sequential"}

    def check_records(self, convs: list[Conversation]) -> None:
        for conv in convs:
            if conv.rejected is None and conv.label is None:
                raise DataError(f"train.stage={NAME} needs chosen and rejected answers or a label, and this record "
                                "has none", conv.location, hint="give {question|prompt|messages, chosen, rejected} "
                                "or {messages, label} records; `qatune data feedback` makes them from a scored "
                                "review sheet")

    def make_rows(self, convs: list[Conversation], tokenizer: Any, template: "ChatTemplate", data: "DataConfig",
                  log: "DropLog") -> list[dict[str, Any]]:
        from qatune.data.samples import preference_rows

        return preference_rows(convs, tokenizer, template, data, log, make_row=_unpaired_rows)


PLUGIN = KtoStage(NAME, columns=("prompt", "completion", "label", "length"), default_beta=0.1, reference_model=True,
                  trl_classes=("trl", "KTOConfig", "KTOTrainer"))
