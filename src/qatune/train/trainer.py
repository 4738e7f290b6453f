"""qatune's pieces inside the Hugging Face Trainer: the seeded length-grouped sampler, the progress
bar, and the flow control for Ctrl-C and the final evaluation. Imports transformers at the top, so
only the train stage imports this module, inside `train()`."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from qatune.compat.process import signal_handlers
from qatune.compat.transformers import TrainerOverrides
from qatune.train.report import perplexity


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order drawn from seed + epoch, not from the global RNG, so a run resumed from
    a checkpoint sees exactly the batches the uninterrupted run would have seen."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


class QatuneTrainer(TrainerOverrides):
    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        # A compute_loss_func that brings its own forward arguments (LabelledCrossEntropy: no logits,
        # the last hidden state) gets them on every call, training and evaluation alike.
        extra = getattr(self.compute_loss_func, "model_kwargs", None)
        return super().compute_loss(model, {**inputs, **extra} if extra else inputs, *args, **kwargs)

    def train_sampler(self, dataset: Any) -> torch.utils.data.Sampler | None:
        if self.args.train_sampling_strategy != "group_by_length":
            return None
        # Grouped by the global batch: N processes then read the order one process with batch N x B reads.
        global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return SeededLengthGroupedSampler(global_batch, dataset[self.args.length_column_name],
                                          self.args.data_seed or self.args.seed)


class FlowControl(TrainerCallback):
    """Ctrl-C (or SIGTERM from a scheduler) finishes the current step, saves a checkpoint and stops;
    a second Ctrl-C aborts at once. The last step is always evaluated and saved, so the report has
    a final eval loss and the best-checkpoint choice sees it."""

    def __init__(self, console: Console, evaluate: bool) -> None:
        self.console = console
        self.evaluate = evaluate
        self.interrupted = False

    def signals(self) -> AbstractContextManager[None]:
        """Ctrl-C and SIGTERM handled by this callback inside the block, as before after."""
        return signal_handlers(self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        self.console.print("\n[yellow]Stopping after this step and saving a checkpoint "
                           "(Ctrl-C again to abort without saving)...[/yellow]")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        elif state.global_step >= state.max_steps:
            control.should_save = True
            control.should_evaluate = self.evaluate
        return control


class ProgressBar(TrainerCallback):
    """A progress bar with loss, learning rate, tokens/s and ETA in a terminal; a log line per
    logging step elsewhere (CI logs, nohup), so both show the same figures."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: Any = None
        self.loss: float | None = None
        self.lr: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()
        self.first_step = state.global_step
        self.first_tokens = state.num_input_tokens_seen
        if self.console.is_terminal:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def _info(self, state: Any) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = (state.num_input_tokens_seen - self.first_tokens) / elapsed
        loss = "-" if self.loss is None else f"{self.loss:.4f}"
        lr = "-" if self.lr is None else f"{self.lr:.2e}"
        return f"loss {loss}  lr {lr}  {rate:,.0f} tok/s"

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, info=self._info(state))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.loss, self.lr = logs["loss"], logs.get("learning_rate")
            if self.progress is None:
                done = state.global_step - self.first_step
                left = (time.perf_counter() - self.started) / max(done, 1) * (state.max_steps - state.global_step)
                self.console.print(f"step {state.global_step}/{state.max_steps}  {self._info(state)}  eta {left:.0f} s")
        if "eval_loss" in logs:
            loss = logs["eval_loss"]
            self.console.print(f"step {state.global_step}: eval loss {loss:.4f} (perplexity {perplexity(loss):.2f})")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
