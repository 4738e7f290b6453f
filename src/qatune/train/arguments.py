"""The train section mapped onto what this machine can do and onto transformers.TrainingArguments."""

from __future__ import annotations

import importlib.util
import math
from typing import TYPE_CHECKING, Any

from qatune.config import QatuneConfig
from qatune.train.checkpoints import TrainError

if TYPE_CHECKING:
    from qatune.runtime import Runtime

REPORTER_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def resolve_precision(requested: str, runtime: "Runtime") -> tuple[str, str | None]:
    """bf16, fp16 or fp32 for this device, and a warning to show where the choice is slow; fp16 never
    on CPU (no fast kernels, overflow-prone)."""
    import torch

    if requested == "auto":
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[runtime.compute_dtype()], None
    if requested == "fp16" and runtime.device == "cpu":
        raise TrainError("train.precision=fp16 on CPU: there are no fast fp16 CPU kernels and fp16 overflows",
                         hint="use train.precision=auto (bf16 where the CPU has it, else fp32)")
    if requested == "bf16" and not runtime.native_bf16:
        if runtime.device == "cuda":
            raise TrainError("train.precision=bf16 but this GPU has no bf16", hint="use train.precision=auto (fp16)")
        return requested, ("warning: this CPU has no native bf16 (AVX512-BF16/AMX); bf16 is emulated and much "
                           "slower than fp32. train.precision=auto picks fp32 here.")
    return requested, None


def check_reporter(report_to: str) -> None:
    modules = REPORTER_PACKAGES.get(report_to, ())
    if modules and not any(importlib.util.find_spec(m) for m in modules):
        raise TrainError(f"train.report_to={report_to} needs the {modules[-1]} package",
                         hint=f"pip install {modules[-1]}, or set train.report_to=none")


# train.optimizer -> (needs bitsandbytes, needs CUDA). Each trains 2 steps on the CPU here (torch 2.13,
# transformers 5.24, bitsandbytes 0.50.2; tests/train/test_qlora.py); torch's fused AdamW has a CPU kernel.
# 8-bit state measured on the default model after one step: full fine-tuning 261 MiB vs AdamW's 1,026 MiB
# (2.0 vs 8 bytes per parameter); its LoRA 5.0 vs 14.1 MiB (tensors under 4,096 elements stay fp32).
OPTIMIZERS: dict[str, tuple[bool, bool]] = {
    "adamw_torch": (False, False), "adamw_torch_fused": (False, False), "adafactor": (False, False),
    "sgd": (False, False), "adamw_8bit": (True, False), "lion_8bit": (True, False),
    # On a CPU bitsandbytes warns and falls back to plain adamw_8bit: paging is CUDA unified memory.
    "paged_adamw_8bit": (True, True),
}


def check_optimizer(optimizer: str, device: str) -> None:
    """Refuse, before loading, an optimiser that cannot run on this device."""
    from qatune.train.methods import bitsandbytes_problem

    bnb, cuda = OPTIMIZERS[optimizer]
    if cuda and device != "cuda":
        raise TrainError(f"train.optimizer={optimizer} pages its state between GPU and CPU memory (CUDA unified "
                         "memory); this machine has no CUDA GPU",
                         hint="use train.optimizer=adamw_8bit (the same 8-bit state, not paged)")
    if bnb:
        problem = bitsandbytes_problem(device, f"train.optimizer={optimizer}")
        if problem:
            raise TrainError(problem[0], hint=f"{problem[1]}; or use train.optimizer=adamw_torch")


def training_arguments(config: QatuneConfig, precision: str, runtime: "Runtime", train_samples: int,
                       has_eval: bool, decoder_layers: list[str] | None = None, arguments_class: type | None = None,
                       **stage_arguments: Any) -> Any:
    """Map qatune's train section onto transformers.TrainingArguments (one place, documented defaults), or onto
    a stage's subclass of it (`arguments_class`, e.g. TRL's DPOConfig) with that stage's own `stage_arguments`."""
    from transformers import TrainingArguments

    from qatune.train.distributed import backend

    arguments_class = arguments_class or TrainingArguments

    cfg = config.train
    device = runtime.device
    steps_per_epoch = max(math.ceil(train_samples / (cfg.per_device_batch_size * runtime.world_size))
                          // cfg.gradient_accumulation_steps, 1)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_epochs)
    # Checkpoints follow evaluations (the best one must exist); both default to once per epoch.
    eval_steps = cfg.eval_steps or cfg.save_steps or steps_per_epoch
    save_steps = cfg.save_steps or eval_steps
    return arguments_class(**dict(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_epochs, max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps > 0 else cfg.warmup_ratio,
        optim=cfg.optimizer, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type=cfg.lr_scheduler,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device == "cpu",
        seed=cfg.seed, data_seed=cfg.seed,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
        logging_steps=cfg.logging_steps or max(total // 50, 1),
        eval_strategy="steps" if has_eval else "no", eval_steps=eval_steps,
        eval_on_start=cfg.eval_at_start and has_eval,
        save_strategy="steps", save_steps=save_steps, save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=cfg.load_best_at_end and has_eval,
        metric_for_best_model="eval_loss", greater_is_better=False,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False, disable_tqdm=True, dataloader_pin_memory=device == "cuda",
        ddp_find_unused_parameters=False,  # every trainable parameter gets a gradient; searching costs a pass
        **backend(cfg.distributed).training_arguments(decoder_layers or []),
    ) | stage_arguments)  # a stage's own arguments win (KTO needs its own batch order)
