"""`train.stage: distill`: sft's data and template, a student cut from `model` when `distill.student_layers`
is set (depth pruning, below), and a Trainer whose loss reads a teacher (`qatune.train.distill`). Imports
nothing heavy, so the plug-in table stays cheap to import."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from qatune.errors import ModelLoadError, Problem
from qatune.train.checkpoints import TrainError
from qatune.train.stages.base import TrainerInputs, TrainingStage

if TYPE_CHECKING:
    from transformers import PreTrainedModel

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
    def validate(self, config: "QatuneConfig") -> list[Problem]:
        """A student that differs from its teacher, a method that saves a pruned student, a loss to compute with."""
        from qatune.train.methods import ADAPTER_METHODS

        cfg, problems = config.distill, []
        if cfg.teacher is None and cfg.student_layers is None:
            problems.append(Problem("train.stage", "distill with neither distill.teacher nor distill.student_layers: "
                                    "the student would be its own teacher", "set distill.teacher=PATH (a larger "
                                    "model), or distill.student_layers=N to cut the student from `model`"))
        if cfg.student_layers is not None and config.method.name in ADAPTER_METHODS:
            problems.append(Problem("distill.student_layers", f"makes a new, smaller model, and method "
                                    f"{config.method.name} would save only an adapter for it (its base exists "
                                    "nowhere)", "use method.name=full (or freeze): the student is saved as a whole "
                                    "model"))
        if not config.train.chunked_loss:
            problems.append(Problem("train.chunked_loss", "train.stage=distill computes its loss chunked over the "
                                    "answer tokens; false leaves it nothing to compute with",
                                    "drop train.chunked_loss=false"))
        return problems

    def check(self, config: "QatuneConfig", runtime: "Runtime") -> None:
        from qatune.models import locate_model
        from qatune.train.distill import teacher_config
        from qatune.train.distributed import backend

        if runtime.world_size > 1 and backend(config.train.distributed).shards_model:
            raise TrainError(f"train.stage=distill with train.distributed={config.train.distributed}: the sharded "
                             "output layer is out of reach of the chunked loss", hint="use train.distributed=ddp")
        locate_model(teacher_config(config))  # a teacher that is nowhere stops here, before any weight is read

    def adapt_model(self, model: Any, config: "QatuneConfig", train_set: Any, runtime: "Runtime") -> Any:
        cfg = config.distill
        if cfg.student_layers is None:
            return model
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


PLUGIN = DistillStage("distill", section="distill", learning_rate_advice=None)


# Depth pruning: the student as `student_layers` of the model's decoder layers.


def kept_layer_indices(total: int, count: int) -> list[int]:
    """`count` of `total` decoder layers, evenly spaced, the first and the last among them."""
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def angular_block_indices(model: "PreTrainedModel", count: int, rows: Iterable[Sequence[int]]) -> list[int]:
    """`count` of the model's decoder layers: all but one consecutive block, the block whose input and output
    hidden states are closest in angle, arccos(cosine) / pi averaged over every token of `rows` (token-id lists)
    (Gromov et al. 2024: such a block changes the residual stream least, so removing it costs least). The first
    and the last layer are always kept: the block lies between them."""
    import torch

    total = model.config.num_hidden_layers
    drop = total - count
    if drop == 0:
        return list(range(total))
    starts = range(1, total - drop)  # the block [start, start + drop) leaves layer 0 and layer total - 1
    distance = torch.zeros(len(starts), dtype=torch.float64)
    tokens = 0
    decoder = model.get_decoder()  # the decoder alone: no vocabulary-wide logits
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for row in rows:
                ids = torch.tensor([list(row)], device=model.device)
                # hidden_states[i] enters layer i; the last one is normed, and no block reaches it
                states = decoder(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
                for k, start in enumerate(starts):
                    cosine = torch.nn.functional.cosine_similarity(
                        states[start][0].double(), states[start + drop][0].double(), dim=-1)
                    distance[k] += torch.arccos(cosine.clamp(-1, 1)).sum() / torch.pi
                tokens += ids.shape[1]
    finally:
        model.train(training)
    if not tokens:
        raise ModelLoadError("distill.student_layer_choice=angular_block has no training rows to measure the "
                             "layers on", hint="give the distill stage training data, or choose evenly_spaced")
    start = starts[int(distance.argmin())]
    return [i for i in range(total) if not start <= i < start + drop]


def keep_decoder_layers(model: "PreTrainedModel", count: int, choice: str = "evenly_spaced",
                        rows: Iterable[Sequence[int]] = ()) -> list[int]:
    """Cut `model` in place to `count` of its decoder layers, their weights as they were: evenly spaced, first
    and last kept (DistilBERT's and Minitron's depth pruning), or, with `choice` angular_block, all but the block
    `angular_block_indices` finds on `rows`. The config says the new depth, so the model saves, loads and exports
    as any model of that size. Returns the indices kept."""
    import torch

    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelLoadError(f"{type(model).__name__} has no `layers` list of decoder layers to keep some of",
                             hint="distill into a smaller model of your own instead of distill.student_layers")
    total = len(layers)
    if count > total:
        raise ModelLoadError(f"distill.student_layers={count} but the model has {total} decoder layers",
                             hint=f"keep at most {total}")
    if choice == "angular_block":
        keep = angular_block_indices(model, count, rows)
    else:
        keep = kept_layer_indices(total, count)
    decoder.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(decoder.layers):
        if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            layer.self_attn.layer_idx = new_index  # the KV cache is indexed by it
    model.config.num_hidden_layers = count
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return keep

