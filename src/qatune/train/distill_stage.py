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


CALIBRATION_ROWS = 64  # training rows the angular_block choice measures the layers on: on the default model cut
# to 15 layers, 16, 64 and 107 rows of the shared medical sets all choose the same block (layers 2-16)


def ranges(indices: list[int]) -> str:
    """0-1, 17-29: consecutive layer indices said as ranges."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


class DistillStage(TrainingStage):
    def check(self, config: "QatuneConfig", runtime: "Runtime") -> None:
        from qatune.models import locate_model
        from qatune.train.distill import check_distill, teacher_config

        check_distill(config, runtime.world_size)
        locate_model(teacher_config(config))  # a teacher that is nowhere stops here, before any weight is read

    def adapt_model(self, model: Any, config: "QatuneConfig", train_set: Any, runtime: "Runtime") -> Any:
        cfg = config.distill
        if cfg.student_layers is None:
            return model
        from qatune.models import keep_decoder_layers

        total = model.config.num_hidden_layers
        rows = train_set.select(range(min(CALIBRATION_ROWS, len(train_set))))["input_ids"]
        keep = keep_decoder_layers(model, cfg.student_layers, cfg.layer_choice, rows)
        runtime.console.print(f"Student: {len(keep)} of the model's {total} decoder layers "
                              f"({cfg.layer_choice}): {ranges(keep)}")
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
