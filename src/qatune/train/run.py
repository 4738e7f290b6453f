"""The training stage: `train(config) -> TrainResult`.

Reads top to bottom: check what this machine can do and what output_dir holds, prepare (or reuse)
the data, load the model the method's way, build the Hugging Face Trainer with qatune's collator
and callbacks, train (resuming if asked), then write weights or adapter, tokenizer with the
training chat template, generation config that stops at end-of-turn, report and loss curve.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune import __version__
from qatune.config import QatuneConfig, TrainConfig
from qatune.errors import QatuneError
from qatune.train import report as train_report

if TYPE_CHECKING:
    from qatune.eval.run import EvalResult
    from rich.console import Console

PRESETS = Path(__file__).parent / "presets"  # DeepSpeed configs, one per train.distributed value
CONFIG_FILE = "config.yaml"
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
RUN_OUTPUTS = ("runs", "adapter_model.safetensors", "adapter_config.json", "model.safetensors",
               train_report.LOSS_PLOT_FILE)
# Keys that may change when a run is resumed; any other difference would silently make a different run.
RESUMABLE_CHANGES = (
    "train.resume", "train.overwrite_output_dir", "train.num_epochs", "train.max_steps", "train.eval_steps",
    "train.save_steps", "train.save_total_limit", "train.logging_steps", "train.report_to", "train.eval_at_start",
    "train.early_stopping_patience", "train.early_stopping_threshold", "train.preview_questions",
    # speed switches: the same computation, batched or projected differently
    "train.padding_free", "train.chunked_loss", "train.lean_dropout", "train.cpu_kernel_cache",
    "data.output_dir", "eval.", "serve.", "export.",
)


class TrainError(QatuneError):
    """Training cannot start or could not go on."""


@dataclass
class TrainResult:
    output_dir: Path
    report: dict[str, Any]
    interrupted: bool = False
    checkpoint: Path | None = None  # the checkpoint to resume from after an interruption
    preview: list[dict[str, str]] = field(default_factory=list)
    evaluation: "EvalResult | None" = None  # with eval.after_train
    main: bool = True  # False on the other ranks of a distributed run: rank 0 reports


# ---------------------------------------------------------------------------------------------
# Checks before anything heavy


def resolve_precision(requested: str, device: str, console: "Console | None" = None) -> str:
    """bf16, fp16 or fp32 for this device; fp16 never on CPU (no fast kernels, overflow-prone)."""
    import torch

    from qatune.models import compute_dtype, native_bf16

    if requested == "auto":
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[compute_dtype(device)]
    if requested == "fp16" and device == "cpu":
        raise TrainError("train.precision=fp16 on CPU: there are no fast fp16 CPU kernels and fp16 overflows",
                         hint="use train.precision=auto (bf16 where the CPU has it, else fp32)")
    if requested == "bf16" and not native_bf16(device):
        if device == "cuda":
            raise TrainError("train.precision=bf16 but this GPU has no bf16", hint="use train.precision=auto (fp16)")
        if console:
            console.print("[yellow]warning: this CPU has no native bf16 (AVX512-BF16/AMX); bf16 is emulated and "
                          "much slower than fp32. train.precision=auto picks fp32 here.[/yellow]")
    return requested


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders whose trainer_state.json (written last by the Trainer) is readable, by step."""
    found = []
    for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name[len(CHECKPOINT_PREFIX):]
        try:
            json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # killed while saving: not a resume point
        if step.isdigit():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def plan_output_dir(config: QatuneConfig, world_size: int = 1, remove: bool = True) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to mix two runs in one folder.

    Starting over removes the earlier run's outputs where `remove` (the main process only)."""
    cfg = config.train
    out = Path(cfg.output_dir)
    checkpoints = complete_checkpoints(out)
    if cfg.resume:
        if not checkpoints:
            raise TrainError(f"train.resume=true but {out} holds no complete checkpoint to resume from",
                             hint="set train.resume=false to start a new run")
        changes = _config_changes(out / CONFIG_FILE, config)
        if changes:
            raise TrainError(f"cannot resume {out}: the config differs from the run's own {CONFIG_FILE} in "
                             + "; ".join(changes),
                             hint="set those keys back, or start a new run in another train.output_dir")
        written_by = checkpoint_world_size(checkpoints[-1])
        if written_by != world_size:
            raise TrainError(f"{checkpoints[-1]} was written by {written_by} process(es) and this run has {world_size}: "
                             "the data order and random state would not continue",
                             hint=f"resume with --nproc {written_by} (the same world size)")
        return checkpoints[-1]
    earlier = sorted(p.name for p in out.glob(f"{CHECKPOINT_PREFIX}*")) + \
        [n for n in (train_report.REPORT_FILE,) if (out / n).exists()]
    if earlier and not cfg.overwrite_output_dir:
        raise TrainError(f"{out} already holds a run ({', '.join(earlier[:4])})",
                         hint="train.resume=true continues it; train.overwrite_output_dir=true starts over; "
                              "or choose another train.output_dir")
    # Starting over: nothing of the earlier run may be mistaken for this one's. Only the main process
    # removes: another rank runs this after rank 0 has gone on to write the new run's files.
    if remove:
        for name in earlier + [n for n in RUN_OUTPUTS if (out / n).exists()]:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return None


def checkpoint_world_size(checkpoint: Path) -> int:
    """How many processes wrote a checkpoint: the Trainer saves one RNG state per rank."""
    per_rank = list(checkpoint.glob("rng_state_*.pth"))
    return len(per_rank) if per_rank else 1


def _config_changes(saved_path: Path, config: QatuneConfig) -> list[str]:
    import yaml

    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return [f"{saved_path.name} (missing or unreadable)"]
    before, now = _flatten(saved), _flatten(config.model_dump(mode="json"))
    return [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(before.keys() | now.keys())
            if before.get(key) != now.get(key) and not key.startswith(RESUMABLE_CHANGES)]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _check_reporter(report_to: str) -> None:
    needs = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
    import importlib.util

    modules = needs.get(report_to, ())
    if modules and not any(importlib.util.find_spec(m) for m in modules):
        raise TrainError(f"train.report_to={report_to} needs the {modules[-1]} package",
                         hint=f"pip install {modules[-1]}, or set train.report_to=none")


# ---------------------------------------------------------------------------------------------
# The stage


def train(config: QatuneConfig, console: "Console | None" = None, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune `config.model` on `config.data` with `config.method`; write everything to train.output_dir.

    `callbacks` are extra transformers TrainerCallbacks (`qatune tune` prunes trials through one)."""
    import torch
    import transformers
    from rich.console import Console

    from accelerate import PartialState

    from qatune.data.prepare import prepare_or_reuse
    from qatune.data.templates import stage_template
    from qatune.infer.generation import save_generation_config
    from qatune.models import load_tokenizer
    from qatune.train.methods import apply_method, check_method_here, load_for_method, summarize
    from qatune.train.trainer import FlowControl, ProgressBar, QatuneTrainer

    console = console or Console()
    started = time.perf_counter()
    cfg = config.train
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # One process, or one of several under torchrun / accelerate launch (`qatune train --nproc N`).
    processes = PartialState(cpu=device == "cpu")
    main = processes.is_main_process
    console.quiet = console.quiet or not main  # one voice: rank 0 reports
    check_method_here(config.method, device)
    check_distributed(cfg.distributed, device)
    # oneDNN and ideep read these when they next cache a kernel; the user's own settings stay.
    for cache_capacity in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(cache_capacity, str(cfg.cpu_kernel_cache))
    precision = resolve_precision(cfg.precision, device, console)
    _check_reporter(cfg.report_to)
    out = Path(cfg.output_dir)
    with processes.main_process_first():  # rank 0 cleans the folder and tokenizes; the others then reuse
        resume_from = plan_output_dir(config, processes.num_processes, remove=main)
        data, reused = prepare_or_reuse(config)
    console.print(f"Data: {len(data.train)} train / {len(data.validation or [])} eval samples "
                  f"({'reused' if reused else 'prepared'} in {data.output_dir})")
    if data.validation is None and cfg.early_stopping_patience:
        raise TrainError("train.early_stopping_patience needs eval data, and this dataset has none",
                         hint="set data.val_size above 0 or add data.eval_sources")
    if config.eval.after_train and cfg.stage == "pt":
        raise TrainError("eval.after_train answers questions, and a pt stage learns plain text (its eval loss "
                         "is the held-out perplexity)", hint="set eval.after_train=false; evaluate the sft stage")
    if config.eval.after_train and not config.eval.data and data.validation is None:
        raise TrainError("eval.after_train has nothing to evaluate: no eval.data and no held-out split",
                         hint="set eval.data, data.eval_sources or data.val_size above 0")
    tokenizer = load_tokenizer(config.model)
    template = stage_template(tokenizer, config.data.template, cfg.stage)

    transformers.utils.logging.disable_progress_bar()
    transformers.set_seed(cfg.seed)  # before the model: adapter initialisation is seeded too
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    model = load_for_method(config.model, config.method, dtype, device)
    model = apply_method(model, config.method, cfg.gradient_checkpointing)
    params = summarize(model)
    console.print(f"Method {config.method.name}: {params}; precision {precision} on {device}")

    out.mkdir(parents=True, exist_ok=True)
    if main:
        (out / CONFIG_FILE).write_text(config.to_yaml(), encoding="utf-8")
    # A pt stage has documents, not questions, to preview.
    preview = _preview_rows(data.validation, cfg.preview_questions) if main and cfg.stage == "sft" else []
    if preview:  # the checkpoint, if any, is loaded later, inside trainer.train(): this is the base model
        for row, answer in zip(preview, _answers(model, tokenizer, template, preview, config, base=True)):
            row["base"] = answer

    columns = ["input_ids", "labels", "length"]
    train_set = data.train.select_columns(columns)
    eval_set = data.validation.select_columns(columns) if data.validation is not None else None
    args = training_arguments(config, precision, device, len(train_set), eval_set is not None,
                              getattr(model, "_no_split_modules", None) or [])
    flow = FlowControl(console, evaluate=eval_set is not None)
    trainer_callbacks: list[Any] = [flow, ProgressBar(console), *callbacks]
    if cfg.early_stopping_patience:
        trainer_callbacks.append(transformers.EarlyStoppingCallback(cfg.early_stopping_patience,
                                                                    cfg.early_stopping_threshold))
    speed = apply_fast_paths(config, model, device, dtype, processes.num_processes, tokenizer.pad_token_id
                             if tokenizer.pad_token_id is not None else template.end_of_turn_id)
    console.print(speed.summary)
    trainer = QatuneTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer,
        data_collator=speed.collator, compute_loss_func=speed.loss, callbacks=trainer_callbacks,
    )
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # ProgressBar says it all
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        with flow.signals(), speed.training(model):
            output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        last = complete_checkpoints(out)
        raise TrainError(
            f"out of memory at step {trainer.state.global_step} (batch {cfg.per_device_batch_size} x up to "
            f"{config.data.max_length} tokens)" + (f"; last checkpoint {last[-1]}" if last else ""),
            hint="try method.name=qlora (GPU), train.gradient_checkpointing=true, a smaller "
                 "train.per_device_batch_size with more gradient_accumulation_steps, or a lower data.max_length",
        ) from None
    if flow.interrupted:
        last = complete_checkpoints(out)
        checkpoint = last[-1] if last else None
        console.print(f"Interrupted at step {trainer.state.global_step}: checkpoint {checkpoint}. "
                      "Continue with train.resume=true.")
        return TrainResult(out, {"interrupted": True, "global_step": trainer.state.global_step}, True, checkpoint)

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    trainer.save_model(str(out))  # every rank takes part (FSDP/DeepSpeed gather the shards); rank 0 writes
    replicas = _replica_checksums(unwrapped) if processes.num_processes > 1 and cfg.distributed == "ddp" else None
    if not main:
        return TrainResult(out, {"rank": processes.process_index, "global_step": trainer.state.global_step},
                           main=False)
    if template.source:  # the template the model learned, even a named one (a base model's pt run has none)
        tokenizer.chat_template = template.source
    tokenizer.save_pretrained(str(out))
    save_generation_config(unwrapped, tokenizer, template.end_of_turn_id, out)
    if preview:
        tuned = _answers(unwrapped, tokenizer, template, preview, config, base=False)
        for row, answer in zip(preview, tuned):
            row["tuned"] = answer

    state = trainer.state
    log = state.log_history
    tokens = state.num_input_tokens_seen - (trainer._initial_num_input_tokens_seen or 0)
    runtime = output.metrics.get("train_runtime", 0.0)
    report = {
        "qatune_version": __version__, "method": config.method.name, "model": config.model.name_or_path,
        "device": device, "precision": precision,
        "trainable_parameters": params.trainable, "total_parameters": params.total,
        "train_samples": len(train_set), "eval_samples": len(eval_set) if eval_set is not None else 0,
        "data_reused": reused, "resumed_from": str(resume_from) if resume_from else None,
        "global_step": state.global_step, "epochs": state.epoch or 0.0,
        "stopped_early": state.global_step < state.max_steps,
        **train_report.eval_summary(log),
        "final_train_loss": next((e["loss"] for e in reversed(log) if "loss" in e), None),
        "best_checkpoint": state.best_model_checkpoint,
        "tokens_seen": tokens, "tokens_per_s": tokens / runtime if runtime else 0.0,
        "train_time_s": runtime, "wall_time_s": time.perf_counter() - started,
        "peak_memory_mib": _peak_memory(device),
        "processes": processes.num_processes, "distributed": cfg.distributed if processes.num_processes > 1 else None,
        "replica_checksums": replicas,
        "replicas_identical": len(set(replicas)) == 1 if replicas else None,
        "preview": [{k: row[k] for k in ("question", "reference", "base", "tuned")} for row in preview],
    }
    train_report.save_loss_plot(log, out / train_report.LOSS_PLOT_FILE,
                                f"{config.method.name} on {config.model.name_or_path}")
    _write_report(report, out)  # the run is complete before any evaluation starts
    evaluation = None
    if config.eval.after_train:
        del trainer, model, unwrapped  # the evaluation loads base and tuned model afresh
        gc.collect()
        evaluation = _evaluate_after_train(config, data.validation, out, console)
        report["evaluation"] = {"report": str(evaluation.output_dir / "eval_report.json"),
                                "deltas": evaluation.report.get("deltas", {}),
                                "forgetting_warnings": evaluation.report["forgetting"]["warnings"]}
        _write_report(report, out)
    return TrainResult(out, report, preview=preview, evaluation=evaluation)


def _write_report(report: dict[str, Any], out: Path) -> None:
    report["files"] = sorted({p.name for p in out.iterdir()} | {train_report.REPORT_FILE})
    (out / train_report.REPORT_FILE).write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")


def _evaluate_after_train(config: QatuneConfig, validation: Any, out: Path, console: "Console") -> "EvalResult":
    """Base against tuned on eval.data (else the held-out split) and eval.general, into OUT/eval/."""
    from qatune.data.records import Conversation
    from qatune.errors import Location
    from qatune.eval.run import ModelSpec, evaluate, load_sets, tuned_spec
    from qatune.eval.sets import set_from_conversations

    cfg = config.eval.model_copy(update={"output_dir": str(out / "eval")})
    sets = load_sets(cfg, config.data.encoding)
    if not cfg.data:  # train() checked that a held-out split exists
        rows = validation.select(range(min(cfg.max_samples or len(validation), len(validation))))
        held_out = [Conversation(m, source, Location(str(loc))) for m, source, loc
                    in zip(rows["messages"], rows["source"], rows["location"])]
        sets.insert(0, set_from_conversations("held_out", held_out))
    console.print(f"Evaluating base against tuned (eval.after_train) into {cfg.output_dir}/")
    specs = [ModelSpec("base", config.model.name_or_path), tuned_spec(str(out), config.model.name_or_path)]
    return evaluate(config.model_copy(update={"eval": cfg}), specs, sets, console)


@dataclass
class FastPaths:
    """How batches are built, attended and scored: train.padding_free and train.chunked_loss, where they apply."""

    collator: Any
    loss: Any  # a Trainer compute_loss_func, or None for the model's own loss
    padding_free_on: str | None  # the device whose padding-free attention the training loop uses
    mixed_precision: bool
    summary: str

    @contextmanager
    def training(self, model: Any) -> Iterator[None]:
        """What holds while the Trainer runs; the model is as loaded again afterwards (for generation)."""
        from peft.helpers import disable_input_dtype_casting

        from qatune.train.attention import padding_free_attention

        with ExitStack() as stack:
            if self.padding_free_on:
                stack.enter_context(padding_free_attention(model, self.padding_free_on))
            # peft casts each LoRA input to the adapter's fp32 and autocast casts it back to bf16 for the
            # product: under mixed precision both copies are waste (same values, measured ~2% of a step).
            stack.enter_context(disable_input_dtype_casting(model, active=self.mixed_precision))
            yield


def apply_fast_paths(config: QatuneConfig, model: Any, device: str, dtype: Any, processes: int,
                     pad_token_id: int) -> FastPaths:
    """Decide batching and loss, and swap LoRA's dropout on CPUs (train.lean_dropout)."""
    import torch

    from qatune.train.attention import padding_free_implementation
    from qatune.train.collator import PackingCollator, PaddingCollator
    from qatune.train.dropout import use_lean_dropout
    from qatune.train.loss import LabelledCrossEntropy, plain_output_layer

    cfg = config.train
    # Prefix tuning prepends virtual keys to every row: the samples of a row would share them.
    padding_free = cfg.padding_free and config.method.name != "prefix"
    # FSDP and ZeRO-3 hold the output layer in shards outside the forward pass.
    sharded = processes > 1 and cfg.distributed in ("fsdp", "deepspeed_zero3", "deepspeed_zero3_offload")
    output_layer = plain_output_layer(model) if cfg.chunked_loss and not sharded else None
    parts = [f"padding-free rows ({padding_free_implementation(device)} attention)" if padding_free else
             "padded batches" + (" (prefix tuning pads)" if cfg.padding_free else "")]
    if output_layer is not None:
        parts.append("loss chunked over answer tokens")
    else:
        reason = "" if not cfg.chunked_loss else " (sharded output layer)" if sharded else " (output layer not plain)"
        parts.append("the model's own loss" + reason)
    if cfg.lean_dropout and device == "cpu" and use_lean_dropout(model):
        parts.append("lean LoRA dropout")
    return FastPaths(
        collator=PackingCollator() if padding_free else PaddingCollator(pad_token_id, 8 if device == "cuda" else None),
        loss=LabelledCrossEntropy(output_layer, dtype) if output_layer is not None else None,
        padding_free_on=device if padding_free else None,
        mixed_precision=dtype != torch.float32,
        summary="Fast paths: " + "; ".join(parts),
    )


def training_arguments(config: QatuneConfig, precision: str, device: str, train_samples: int,
                       has_eval: bool, decoder_layers: list[str] | None = None) -> Any:
    """Map qatune's train section onto transformers.TrainingArguments (one place, documented defaults)."""
    from transformers import TrainingArguments

    cfg: TrainConfig = config.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = max(math.ceil(train_samples / (cfg.per_device_batch_size * world))
                          // cfg.gradient_accumulation_steps, 1)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_epochs)
    # Checkpoints follow evaluations (the best one must exist); both default to once per epoch.
    eval_steps = cfg.eval_steps or cfg.save_steps or steps_per_epoch
    save_steps = cfg.save_steps or eval_steps
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_epochs, max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps > 0 else cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, lr_scheduler_type=cfg.lr_scheduler,
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
        **distributed_arguments(cfg.distributed, decoder_layers or []),
    )


def distributed_arguments(engine: str, decoder_layers: list[str]) -> dict[str, Any]:
    """TrainingArguments for `train.distributed` (plain DDP needs none: torchrun's environment is enough)."""
    if engine == "fsdp":
        return {"fsdp": "full_shard auto_wrap",
                "fsdp_config": {"transformer_layer_cls_to_wrap": decoder_layers, "use_orig_params": True}}
    if engine.startswith("deepspeed"):
        return {"deepspeed": str(PRESETS / f"{engine}.json")}
    return {}


def check_distributed(engine: str, device: str) -> None:
    """FSDP and DeepSpeed shard over CUDA GPUs; refuse them elsewhere before loading anything."""
    if engine == "ddp":
        return
    if device != "cuda":
        raise TrainError(f"train.distributed={engine} shards the model over CUDA GPUs; this machine has none",
                         hint="use train.distributed=ddp (data parallel, also on CPUs with the gloo backend)")
    if engine.startswith("deepspeed"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise TrainError(f"train.distributed={engine} needs the deepspeed package", hint="pip install deepspeed")


def _replica_checksums(model: Any) -> list[float]:
    """Each rank's sum of its trainable weights: data-parallel replicas must end identical."""
    import torch
    import torch.distributed as dist

    local = torch.tensor([sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)],
                         dtype=torch.float64, device=next(model.parameters()).device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [float(t.item()) for t in gathered]


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def _peak_memory(device: str) -> dict[str, float]:
    import torch

    peak = {"process_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device == "cuda":
        peak["gpu_allocated"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def _preview_rows(validation: Any, count: int) -> list[dict[str, str]]:
    """The first held-out conversations, cut before their last answer."""
    rows = []
    if validation is None:
        return rows
    for messages in validation.select(range(min(count, len(validation))))["messages"]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        rows.append({"prompt": messages[:last], "question": messages[last - 1]["content"],
                     "reference": messages[last]["content"]})
    return rows


def _answers(model: Any, tokenizer: Any, template: Any, rows: list[dict[str, Any]], config: QatuneConfig,
             base: bool) -> list[str]:
    from contextlib import nullcontext

    from qatune.infer.generation import Decoding, generate

    # An adapter's base answers come from the same model with the adapter switched off.
    off = model.disable_adapter() if base and hasattr(model, "disable_adapter") else nullcontext()
    with off:
        answers = generate(model, tokenizer, template.source, [r["prompt"] for r in rows],
                           Decoding.from_config(config.eval), template.end_of_turn_id,
                           config.eval.batch_size)
    return [a.text for a in answers]
