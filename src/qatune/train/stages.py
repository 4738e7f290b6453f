"""Training stages as plug-ins of the one loop in `train.run`.

A stage says what differs: the chat template its samples are rendered with, whether it answers
questions (previews, evaluation after training), the dataset columns its Trainer reads, how its
Trainer is built (`build_trainer`: arguments, batching, loss), what it adds to the report and the
loss plot, and what it refuses before any weight is read (`check`). The data builder is chosen by
the same `train.stage` in the data stage (`sft`: conversations with the answers labelled; `pt`:
documents packed into blocks; preference stages: prompt, chosen and rejected answers). Preference
and distillation stages subclass TrainingStage in their own modules, and `train.run.TRAINING_STAGES`
names every stage; the loop, outputs, resume and reports stay shared.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qatune.config import DataConfig, QatuneConfig
    from qatune.data.templates import ChatTemplate
    from qatune.runtime import Runtime
    from qatune.train.fast_paths import FastPaths


@dataclass(frozen=True)
class TrainerInputs:
    """What the loop has loaded when a stage builds its Trainer."""

    config: "QatuneConfig"
    runtime: "Runtime"
    precision: str  # bf16, fp16 or fp32
    dtype: Any  # the torch dtype of `precision`
    model: Any  # with the method applied
    tokenizer: Any
    template: "ChatTemplate"
    train_set: Any  # datasets.Dataset, only the stage's `columns`
    eval_set: Any  # the same, or None
    callbacks: list[Any]
    processes: int  # processes training together


@dataclass(frozen=True)
class TrainingStage:
    name: str
    answers_questions: bool  # previews of held-out answers and evaluation after training apply
    columns: tuple[str, ...] = ("input_ids", "labels", "length")  # the prepared columns its Trainer reads

    def check(self, config: "QatuneConfig", runtime: "Runtime") -> None:
        """Refuse, before any weight is read, what this stage cannot do here (the plan calls it)."""

    def template(self, tokenizer: Any, data_cfg: "DataConfig") -> "ChatTemplate":
        from qatune.data.templates import stage_template

        return stage_template(tokenizer, data_cfg.template, self.name)

    def adapt_model(self, model: Any, config: "QatuneConfig", train_set: Any, runtime: "Runtime") -> Any:
        """The loaded model before the method picks what trains (distill cuts its student from it here, measuring
        the layers on `train_set`, the prepared training rows)."""
        return model

    def library_patches(self, runtime: "Runtime") -> AbstractContextManager[None]:
        """What this stage changes in a library while it loads and trains (`process_state` undoes it)."""
        return nullcontext()

    def trainer_class(self) -> type:
        from qatune.train.trainer import QatuneTrainer

        return QatuneTrainer

    def build_trainer(self, inputs: TrainerInputs) -> tuple[Any, "FastPaths"]:
        """The Trainer and the fast paths it trains with: labelled token rows, qatune's collator and loss."""
        from qatune.train.arguments import training_arguments
        from qatune.train.fast_paths import decide_fast_paths

        config, model, tokenizer = inputs.config, inputs.model, inputs.tokenizer
        args = training_arguments(config, inputs.precision, inputs.runtime, len(inputs.train_set),
                                  inputs.eval_set is not None, getattr(model, "_no_split_modules", None) or [])
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else inputs.template.end_of_turn_id
        fast = decide_fast_paths(config, model, inputs.runtime.device, inputs.dtype, inputs.processes, pad_id)
        trainer = self.trainer_class()(
            model=model, args=args, train_dataset=inputs.train_set, eval_dataset=inputs.eval_set,
            processing_class=tokenizer, data_collator=fast.collator, compute_loss_func=fast.loss,
            callbacks=inputs.callbacks,
        )
        return trainer, fast

    def report(self, log_history: list[dict[str, Any]]) -> dict[str, Any]:
        """What this stage adds to train_report.json, from the Trainer's log."""
        return {}

    def plot_series(self, log_history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
        """Extra curves for the loss plot (drawn on a second axis), by label."""
        return {}

