"""The training stage as a recipe: `train(config, runtime) -> TrainResult`.

- `plan` checks what this machine can do (method, engine, precision, logger) and decides what
  happens to train.output_dir (resume point, or the earlier run's files it would remove, only with
  train.overwrite_output_dir; never the model's own folder) and that data.output_dir may be written:
  it reads the folders and writes nothing.
- `setup` loads: the tokenizer once, the data (prepared or reused), the model the method's way,
  the fast paths, and the Trainer with qatune's collator and callbacks; rank 0 removes what the plan
  listed first.
- `run` trains (resuming if planned), then writes weights or adapter, the tokenizer with the training
  chat template, a generation config that stops at end-of-turn, the report and the loss curve (each
  of qatune's own files atomically; the Trainer's pickled training_args.bin is deleted: no pickle is
  published with the weights).

Everything global the stage changes (oneDNN's kernel cache size, the random state, progress bars)
holds inside `process_state` and is undone after. Evaluation after training is the caller's
(`qatune.workflow.train_and_evaluate`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune import files as atomic
from qatune.config import QatuneConfig
from qatune.recipe import execute
from qatune.train import learning_rate_advice
from qatune.train import report as train_report
from qatune.train.arguments import check_optimizer, check_reporter, resolve_precision
from qatune.train.checkpoints import (
    CONFIG_FILE,
    OutputDecision,
    TrainError,
    complete_checkpoints,
    decide_output_dir,
    delete_earlier_run,
    delete_training_args_pickle,
)

if TYPE_CHECKING:
    from accelerate import PartialState
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

    from qatune.data.prepare import PreparedData
    from qatune.data.templates import ChatTemplate
    from qatune.runtime import Runtime
    from qatune.train.fast_paths import FastPaths
    from qatune.train.methods import ParameterCount
    from qatune.train.stages.base import TrainingStage
    from qatune.train.trainer import FlowControl

__all__ = ["TrainCompleted", "TrainError", "TrainInterrupted", "TrainPlan", "TrainResult", "TrainWorkerDone",
           "complete_checkpoints", "plan", "run", "setup", "train"]


@dataclass(frozen=True)
class TrainCompleted:
    output_dir: Path
    report: train_report.TrainReport
    preview: list[dict[str, str]] = field(default_factory=list)
    held_out: Any = None  # the validation split (a datasets.Dataset), for evaluation after training


@dataclass(frozen=True)
class TrainInterrupted:
    """Ctrl-C or SIGTERM: the run stopped after a step and saved a checkpoint to resume from."""

    output_dir: Path
    step: int
    checkpoint: Path | None


@dataclass(frozen=True)
class TrainWorkerDone:
    """A rank other than 0 of a distributed run finished its share; rank 0 writes and reports."""

    output_dir: Path
    rank: int
    step: int


TrainResult = TrainCompleted | TrainInterrupted | TrainWorkerDone


@dataclass(frozen=True)
class TrainPlan:
    config: QatuneConfig
    runtime: "Runtime"
    stage: "TrainingStage"
    precision: str  # bf16, fp16 or fp32
    output: OutputDecision
    callbacks: tuple[Any, ...] = ()  # extra transformers TrainerCallbacks (`qatune tune` prunes through one)

    @property
    def dtype(self) -> Any:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]


@dataclass
class TrainComponents:
    tokenizer: "PreTrainedTokenizerBase"
    template: "ChatTemplate"
    data: "PreparedData"  # train and validation splits
    data_reused: bool
    model: "PreTrainedModel"  # with the method applied (a PeftModel for adapters)
    parameters: "ParameterCount"
    fast: "FastPaths"
    trainer: "Trainer"
    flow: "FlowControl"
    processes: "PartialState"  # accelerate's: one process, or one of several


def plan(config: QatuneConfig, runtime: "Runtime", callbacks: Sequence[Any] = ()) -> TrainPlan:
    """What this machine and the disk allow (the config's own rules ran in `load_config`), and what will happen to
    train.output_dir. Reads no weights."""
    from qatune import plugins
    from qatune.data.prepare import refuse_unless_data_folder
    from qatune.train.distributed import backend
    from qatune.train.methods import check_method_here

    cfg = config.train
    check_method_here(config.method, runtime.device)
    backend(cfg.distributed).check(runtime.device)
    check_optimizer(cfg.optimizer, runtime.device)
    precision, warning = resolve_precision(cfg.precision, runtime)
    if warning:
        runtime.console.print(f"[yellow]{warning}[/yellow]")
    check_reporter(cfg.report_to)
    output = decide_output_dir(config, runtime.world_size)
    refuse_unless_data_folder(Path(config.data.output_dir))  # the data stage's own plan checks the rest
    stage = plugins.load("stage", cfg.stage)
    stage.check(config, runtime)
    for advice in learning_rate_advice.plan_warnings(config):  # the model's size calls for another value
        runtime.console.print(f"[yellow]{advice}[/yellow]")
    return TrainPlan(config, runtime, stage, precision, output, tuple(callbacks))


@contextmanager
def process_state(plan: TrainPlan) -> Iterator[None]:
    """What holds in this process while the stage loads and trains, undone after."""
    from qatune.compat.bitsandbytes import optimizer_overrides_scoped
    from qatune.compat.process import environment_defaults
    from qatune.compat.torch import seeded
    from qatune.compat.transformers import progress_bars_off

    cache = str(plan.config.train.cpu_kernel_cache)
    with ExitStack() as stack:
        # oneDNN and ideep read these when they next cache a kernel; the user's own settings win.
        stack.enter_context(environment_defaults({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": cache,
                                                  "LRU_CACHE_CAPACITY": cache}))
        # Seeded before the model is built: adapter initialisation repeats too.
        stack.enter_context(seeded(plan.config.train.seed, plan.runtime.device))
        stack.enter_context(progress_bars_off())
        stack.enter_context(optimizer_overrides_scoped())  # 8-bit optimizers' overrides end with this training
        stack.enter_context(plan.stage.library_patches(plan.runtime))
        yield


def setup(plan: TrainPlan) -> TrainComponents:
    """Tokenizer, data, model, fast paths and Trainer; rank 0 first removes what the plan replaces."""
    import transformers
    from accelerate import PartialState

    from qatune.data.prepare import prepare_or_reuse
    from qatune.models import load_tokenizer
    from qatune.train.methods import apply_method, count_parameters, load_for_method
    from qatune.train.stages.base import TrainerInputs
    from qatune.train.trainer import FlowControl, ProgressBar

    config, runtime, cfg = plan.config, plan.runtime, plan.config.train
    console = runtime.console
    # One process, or one of several under torchrun / accelerate launch (`qatune train --nproc N`).
    processes = PartialState(cpu=runtime.device == "cpu")
    with processes.main_process_first():  # rank 0 cleans the folder and tokenizes; the others then reuse
        if runtime.main:
            delete_earlier_run(plan.output)
        tokenizer = load_tokenizer(config.model)
        data, reused = prepare_or_reuse(config, tokenizer, runtime, samples=plan.stage)
    console.print(f"Data: {len(data.train)} train / {len(data.validation or [])} eval samples "
                  f"({'reused' if reused else 'prepared'} in {data.output_dir})")
    template = plan.stage.template(tokenizer, config.data)

    model = load_for_method(config.model, config.method, plan.dtype, runtime.device)
    model = plan.stage.adapt_model(model, config, data.train, runtime)
    model = apply_method(model, config.method, cfg.gradient_checkpointing)
    parameters = count_parameters(model)
    console.print(f"Method {config.method.name}: {parameters}; precision {plan.precision} on {runtime.device}")

    columns = list(plan.stage.columns)
    train_set = data.train.select_columns(columns)
    eval_set = data.validation.select_columns(columns) if data.validation is not None else None
    flow = FlowControl(console, evaluate=eval_set is not None)
    callbacks: list[Any] = [flow, ProgressBar(console), *plan.callbacks]
    if cfg.early_stopping_patience:
        callbacks.append(transformers.EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_threshold))
    trainer, fast = plan.stage.build_trainer(TrainerInputs(
        config, runtime, plan.precision, plan.dtype, model, tokenizer, template, train_set, eval_set, callbacks,
        processes.num_processes))
    console.print(fast.summary)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # ProgressBar says it all
    return TrainComponents(tokenizer, template, data, reused, model, parameters, fast, trainer, flow, processes)


def run(plan: TrainPlan, c: TrainComponents) -> TrainResult:
    """Train, then write the model, tokenizer, generation config, report and loss curve (rank 0)."""
    import torch

    from qatune.infer.generation import save_generation_config
    from qatune.train.outputs import answer_previews, build_report, preview_rows, replica_checksums, write_report

    config, runtime, cfg = plan.config, plan.runtime, plan.config.train
    started = time.perf_counter()
    out = plan.output.folder
    out.mkdir(parents=True, exist_ok=True)
    if runtime.main:
        atomic.write_text(out / CONFIG_FILE, config.to_yaml())  # secrets withheld
    answers = plan.stage.answers_questions and runtime.main
    preview = preview_rows(c.data.validation, cfg.preview_questions) if answers else []
    # The checkpoint, if any, is loaded later, inside trainer.train(): this is the base model.
    answer_previews(c.model, c.tokenizer, c.template, preview, config.eval.decoding, config.eval.batch_size, "base")
    if runtime.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    resume = plan.output.resume_from
    try:
        with c.flow.signals(), c.fast.training(c.model):
            output = c.trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        last = complete_checkpoints(out)
        raise TrainError(
            f"out of memory at step {c.trainer.state.global_step} (batch {cfg.per_device_batch_size} x up to "
            f"{config.data.max_length} tokens)" + (f"; last checkpoint {last[-1]}" if last else ""),
            hint="try method.name=qlora (4-bit base), train.gradient_checkpointing=true, "
                 "train.optimizer=adamw_8bit, a smaller "
                 "train.per_device_batch_size with more gradient_accumulation_steps, or a lower data.max_length",
        ) from None
    state = c.trainer.state
    if c.flow.interrupted:
        last = complete_checkpoints(out)
        checkpoint = last[-1] if last else None
        runtime.console.print(f"Interrupted at step {state.global_step}: checkpoint {checkpoint}. "
                              "Continue with train.resume=true.")
        return TrainInterrupted(out, state.global_step, checkpoint)

    unwrapped = c.trainer.accelerator.unwrap_model(c.trainer.model)
    c.trainer.save_model(str(out))  # every rank takes part (FSDP/DeepSpeed gather the shards); rank 0 writes
    several = c.processes.num_processes > 1
    replicas = replica_checksums(unwrapped) if several and cfg.distributed == "ddp" else None
    if not runtime.main:
        return TrainWorkerDone(out, runtime.rank, state.global_step)
    delete_training_args_pickle(out)
    if c.template.source:  # the template the model learned, even a named one (a base model's pt run has none)
        c.tokenizer.chat_template = c.template.source
    c.tokenizer.save_pretrained(str(out))
    save_generation_config(unwrapped, c.tokenizer, c.template.end_of_turn_id, out)
    answer_previews(unwrapped, c.tokenizer, c.template, preview, config.eval.decoding, config.eval.batch_size,
                    "tuned")

    log = state.log_history
    report = build_report(config, plan.stage.name, plan.precision, runtime.device, c.trainer, c.parameters,
                          data_reused=c.data_reused, resumed_from=resume, stage_metrics=plan.stage.report(log),
                          processes=c.processes.num_processes, replicas=replicas, preview=preview,
                          train_seconds=output.metrics.get("train_runtime", 0.0), started=started)
    with atomic.atomic_path(out / train_report.LOSS_PLOT_FILE) as plot:
        train_report.save_loss_plot(log, plot, f"{config.method.name} on {config.model.name_or_path}",
                                    plan.stage.plot_series(log))
    write_report(report, out)
    return TrainCompleted(out, report, preview, c.data.validation)


def train(config: QatuneConfig, runtime: "Runtime | None" = None, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune `config.model` on `config.data` with `config.method`; write everything to train.output_dir."""
    from qatune.runtime import Runtime

    decided = plan(config, runtime or Runtime.detect(), callbacks)
    with process_state(decided):
        return execute(sys.modules[__name__], decided)


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text
