"""Training stages as plug-ins of the one loop in `train.run`.

A stage says what differs: the chat template its samples are rendered with, whether it answers
questions (previews, evaluation after training), and the Trainer class that computes its loss. The
data builder is chosen by the same `train.stage` in the data stage (`sft`: conversations with the
answers labelled; `pt`: documents packed into blocks). Preference and distillation stages add an
entry here with their own trainer; the loop, outputs, resume and reports stay shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qatune.config import DataConfig
    from qatune.data.templates import ChatTemplate


@dataclass(frozen=True)
class TrainingStage:
    name: str
    answers_questions: bool  # previews of held-out answers and evaluation after training apply

    def template(self, tokenizer: Any, data_cfg: "DataConfig") -> "ChatTemplate":
        from qatune.data.templates import stage_template

        return stage_template(tokenizer, data_cfg.template, self.name)

    def trainer_class(self) -> type:
        from qatune.train.trainer import QatuneTrainer

        return QatuneTrainer


STAGES = {
    "sft": TrainingStage("sft", answers_questions=True),
    "pt": TrainingStage("pt", answers_questions=False),
}
