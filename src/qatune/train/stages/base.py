"""What every training stage plug-in declares, and sft's behaviour as the default.

A stage says what differs inside the one loop of `train.run`: the config section it reads
(`section`), which records it trains on and the rows it makes of them (`check_records`,
`make_rows`: the data stage calls them, it never asks which stage it serves), the chat template its
samples are rendered with, whether it answers questions (previews, evaluation after training), the
dataset columns its Trainer reads, the config rules it adds (`validate`, run by `load_config`) and
what it refuses on this machine (`check`, run by the plan before any weight is read), how its
Trainer is built, and what it adds to the report and the loss plot. Each stage is one module of
this package, named in `qatune.plugins.PLUGINS["stage"]`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from qatune.errors import DataError

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

    from qatune.config import DataConfig, QatuneConfig
    from qatune.data.records import Conversation, DropLog
    from qatune.data.templates import ChatTemplate
    from qatune.errors import Problem
    from qatune.runtime import Runtime
    from qatune.train.fast_paths import FastPaths


@dataclass(frozen=True)
class TrainerInputs:
    """What the loop has loaded when a stage builds its Trainer."""

    config: "QatuneConfig"
    runtime: "Runtime"
    precision: str  # bf16, fp16 or fp32
    dtype: "torch.dtype"  # of `precision`
    model: "PreTrainedModel"  # with the method applied
    tokenizer: "PreTrainedTokenizerBase"
    template: "ChatTemplate"
    train_set: "Dataset"  # only the stage's `columns`
    eval_set: "Dataset | None"  # the same
    callbacks: list["TrainerCallback"]
    processes: int  # processes training together


@dataclass(frozen=True)
class TrainingStage:
    """A stage that trains on conversations with the answers labelled (sft's behaviour; others override)."""

    name: str
    answers_questions: bool = True  # previews of held-out answers and evaluation after training apply
    columns: tuple[str, ...] = ("input_ids", "labels", "length")  # the prepared columns its Trainer reads
    section: str | None = None  # the config section it reads besides train, method, model and data
    # Which learning-rate advice applies: "sft" (measured and cited by model size), "preference" (size-free), None
    learning_rate_advice: Literal["sft", "preference"] | None = "sft"

    def validate(self, config: "QatuneConfig") -> list["Problem"]:
        """Rules across config sections, each a problem with its fix; `load_config` runs them with every other
        check, before anything is read from disk."""
        return []

    def check(self, config: "QatuneConfig", runtime: "Runtime") -> None:
        """Refuse, before any weight is read, what this stage cannot do here (the plan calls it)."""

    def template(self, tokenizer: Any, data_cfg: "DataConfig") -> "ChatTemplate":
        from qatune.data.templates import resolve_template

        return resolve_template(tokenizer, data_cfg.template)

    def check_records(self, convs: list["Conversation"]) -> None:
        """Refuse a record this stage cannot train on, naming it (conversations here: no preference records)."""
        for conv in convs:
            paired = conv.rejected is not None
            if paired or conv.label is not None:
                raise DataError(f"train.stage={self.name} trains on conversations, and this record is "
                                f"{'a preference pair' if paired else 'a labelled answer (label)'}", conv.location,
                                hint="set a preference stage in train.stage (pairs: dpo, orpo, simpo; labelled "
                                     "answers: see `qatune config docs`), or give chosen answers as plain "
                                     "conversations")

    def make_rows(self, convs: list["Conversation"], tokenizer: Any, template: "ChatTemplate", data: "DataConfig",
                  log: "DropLog") -> list[dict[str, Any]]:
        """The token rows the data stage writes for these records (drops counted in `log`)."""
        from qatune.data.samples import chat_rows

        return chat_rows(convs, tokenizer, template, data, log)

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

