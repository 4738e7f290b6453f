"""qatune's pieces inside the Hugging Face Trainer: the seeded length-grouped sampler, the progress
bar, and the flow control for Ctrl-C and the final evaluation. Imports transformers at the top, so
only the train stage imports this module, inside `train()`."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

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


class QatuneTrainer(Trainer):
    _predicting = False

    def prediction_step(self, *args: Any, **kwargs: Any) -> Any:
        self._predicting = True
        try:
            return super().prediction_step(*args, **kwargs)
        finally:
            self._predicting = False

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | int | None:
        # An eval batch's loss is its own token mean. The Trainer would divide by the tokens of every
        # rank's current batch, which is wrong on a rank whose last batch is a duplicate pad, dropped
        # after gathering (an eval set that does not divide over the processes).
        if self._predicting:
            return None
        return super()._get_num_items_in_batch(batch_samples, device)

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        # A compute_loss_func that brings its own forward arguments (LabelledCrossEntropy: no logits,
        # the last hidden state) gets them on every call, training and evaluation alike.
        extra = getattr(self.compute_loss_func, "model_kwargs", None)
        return super().compute_loss(model, {**inputs, **extra} if extra else inputs, *args, **kwargs)

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        # A padding-free row has no attention mask and no padding. Counting tokens unlike pad_token_id
        # would miss real end-of-turn tokens wherever the pad token is the end-of-turn token (SmolLM2).
        if "cu_seq_lens_q" in inputs:
            inputs = {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}
        super()._track_num_input_tokens(inputs)

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
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

    @contextmanager
    def signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handle(signum: int, frame: Any) -> None:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            self.console.print("\n[yellow]Stopping after this step and saving a checkpoint "
                               "(Ctrl-C again to abort without saving)...[/yellow]")

        for sig in previous:
            signal.signal(sig, handle)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

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
