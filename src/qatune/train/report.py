"""What a training run leaves for people: train_report.json (`TrainReport`), the loss curve, the console
summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune.reports import flattened, gathered, omitted_when_none

if TYPE_CHECKING:
    from rich.console import Console

REPORT_FILE = "train_report.json"
LOSS_PLOT_FILE = "loss_curve.png"


@dataclass(frozen=True)
class EvalLossSummary:
    """Initial (step 0), best and final eval loss with their perplexities."""

    initial_eval_loss: float | None  # None when the run did not evaluate at step 0
    initial_eval_perplexity: float | None
    best_eval_loss: float
    best_eval_perplexity: float
    best_step: int
    final_eval_loss: float
    final_eval_perplexity: float
    final_eval_step: int


@dataclass
class TrainReport:
    """train_report.json. Every field has a default: a report an older qatune wrote may lack it."""

    qatune_version: str = ""
    method: str = ""
    model: str = ""
    stage: str = ""
    device: str = ""
    precision: str = ""
    trainable_parameters: int = 0
    total_parameters: int = 0
    train_samples: int = 0
    eval_samples: int = 0
    data_reused: bool = False
    resumed_from: str | None = None
    global_step: int = 0
    epochs: float = 0.0
    stopped_early: bool = False
    eval_loss: EvalLossSummary | None = flattened(EvalLossSummary)  # None: the run had no eval data
    # (step, loss) points by "train" and "eval": eval's diagnosis reads the curves' shape (still falling, overfitting)
    loss_history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    stage_metrics: dict[str, Any] = gathered()  # the stage's own figures (`TrainingStage.report`), JSON-ready
    final_train_loss: float | None = None
    best_checkpoint: str | None = None
    tokens_seen: int = 0
    tokens_per_s: float = 0.0
    train_time_s: float = 0.0
    wall_time_s: float = 0.0
    peak_memory_mib: dict[str, float] = field(default_factory=dict)
    processes: int = 1
    distributed: str | None = None  # train.distributed, with more than one process
    replica_checksums: list[float] | None = None  # ddp: each rank's sum of its trainable weights
    replicas_identical: bool | None = None
    preview: list[dict[str, str]] = field(default_factory=list)  # question, reference, base and tuned answers
    files: list[str] = field(default_factory=list)  # every file of the run folder
    evaluation: dict[str, Any] | None = omitted_when_none()  # eval.after_train's headline (`EvalResult.headline`)


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 50 else float("inf")


def eval_points(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]


def train_points(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in log_history if "loss" in e]


def eval_summary(log_history: list[dict[str, Any]]) -> EvalLossSummary | None:
    """Initial (step 0), best and final eval loss with perplexities, from the Trainer's log; None without any."""
    points = eval_points(log_history)
    if not points:
        return None
    initial = next((loss for step, loss in points if step == 0), None)
    best_step, best = min(points, key=lambda p: p[1])
    final_step, final = points[-1]
    return EvalLossSummary(initial, perplexity(initial), best, perplexity(best), best_step,
                           final, perplexity(final), final_step)


def save_loss_plot(log_history: list[dict[str, Any]], path: Path, title: str,
                   extra: dict[str, list[tuple[int, float]]] | None = None) -> None:
    """Train and eval loss by step; `extra` curves (a stage's own, e.g. reward accuracy) on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    train = train_points(log_history)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#1f77b4")
    evals = eval_points(log_history)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", color="#d62728", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if extra := {label: points for label, points in (extra or {}).items() if points}:
        second = ax.twinx()
        for label, points in extra.items():
            second.plot(*zip(*points), label=label, linestyle="--", marker=".")
        second.set_ylabel(", ".join(extra))
        more_handles, more_labels = second.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_summary(report: TrainReport, console: "Console") -> None:
    from rich.table import Table

    table = Table(title=f"Training: {report.method} on {report.model}", show_header=False)
    table.add_column(style="bold")
    table.add_column()

    def fmt(value: float | None, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    if (losses := report.eval_loss) is not None:
        table.add_row("eval loss", f"{fmt(losses.initial_eval_loss)} -> {fmt(losses.final_eval_loss)} "
                      f"(best {fmt(losses.best_eval_loss)} at step {losses.best_step})")
        table.add_row("eval perplexity", f"{fmt(losses.initial_eval_perplexity, 2)} -> "
                      f"{fmt(losses.final_eval_perplexity, 2)}")
    table.add_row("final train loss", fmt(report.final_train_loss))
    table.add_row("steps", f"{report.global_step} ({report.epochs:.2f} epochs)")
    table.add_row("tokens", f"{report.tokens_seen:,} at {report.tokens_per_s:,.0f} tokens/s")
    table.add_row("wall time", f"{report.wall_time_s:.1f} s (training {report.train_time_s:.1f} s)")
    table.add_row("peak memory", ", ".join(f"{k} {v:,.0f} MiB" for k, v in report.peak_memory_mib.items()))
    console.print(table)


def print_preview(rows: list[dict[str, str]], console: "Console") -> None:
    """Held-out questions with the base and tuned answers side by side."""
    from rich.table import Table

    table = Table(title="Held-out questions: base vs tuned", show_lines=True)
    for column in ("question", "reference", "base model", "tuned model"):
        table.add_column(column, ratio=1, overflow="fold")
    for row in rows:
        table.add_row(row["question"], row["reference"], row["base"], row["tuned"])
    console.print(table)
