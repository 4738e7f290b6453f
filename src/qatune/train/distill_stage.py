"""The `distill` entry of `train.stages`: sft's data and template, a student cut from `model` when
`distill.student_layers` is set, and a Trainer whose loss reads a teacher (`train.distill`). Imports
nothing heavy, so the stage table stays cheap to import."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qatune.train.stages import TrainerInputs, TrainingStage

if TYPE_CHECKING:
    from qatune.config import QatuneConfig
    from qatune.runtime import Runtime
    from qatune.train.fast_paths import FastPaths


class DistillStage(TrainingStage):
    def check(self, config: "QatuneConfig", runtime: "Runtime") -> None:
        from qatune.models import locate_model
        from qatune.train.distill import check_distill, teacher_config

        check_distill(config, runtime.world_size)
        locate_model(teacher_config(config))  # a teacher that is nowhere stops here, before any weight is read

    def adapt_model(self, model: Any, config: "QatuneConfig") -> Any:
        layers = config.distill.student_layers
        if layers is None:
            return model
        from qatune.models import keep_decoder_layers

        keep_decoder_layers(model, layers)
        return model

    def trainer_class(self) -> type:
        from qatune.train.distill import DistillTrainer

        return DistillTrainer

    def build_trainer(self, inputs: TrainerInputs) -> tuple[Any, "FastPaths"]:
        from qatune.train.distill import distillation_loss

        config = inputs.config
        loss = distillation_loss(config, inputs.model, inputs.tokenizer, inputs.dtype)
        trainer, fast = super().build_trainer(inputs)
        # sft's Trainer and batching, with the distillation loss in place of the cross-entropy
        trainer.compute_loss_func = fast.loss = loss
        cfg = config.distill
        student = f"{config.distill.student_layers} layers of the model" if cfg.student_layers else "the model"
        fast.summary += (f"; distilling {cfg.teacher or config.model.name_or_path} into {student} "
                         f"({cfg.divergence}, alpha {cfg.alpha}, temperature {cfg.temperature})" if cfg.alpha
                         else f"; {student}, cross-entropy alone (distill.alpha 0: no teacher loaded)")
        return trainer, fast


DISTILL_STAGE = DistillStage("distill", answers_questions=True)
