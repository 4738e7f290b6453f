"""What a training run leaves for people: train_report.json, the loss curve, the console summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

REPORT_FILE = "train_report.json"
LOSS_PLOT_FILE = "loss_curve.png"


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 50 else float("inf")


def eval_points(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]


def train_points(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in log_history if "loss" in e]


def eval_summary(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """Initial (step 0), best and final eval loss with perplexities, from the Trainer's log."""
    points = eval_points(log_history)
    if not points:
        return {}
    initial = next((loss for step, loss in points if step == 0), None)
    best_step, best = min(points, key=lambda p: p[1])
    final_step, final = points[-1]
    return {
        "initial_eval_loss": initial, "initial_eval_perplexity": perplexity(initial),
        "best_eval_loss": best, "best_eval_perplexity": perplexity(best), "best_step": best_step,
        "final_eval_loss": final, "final_eval_perplexity": perplexity(final), "final_eval_step": final_step,
    }


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


def print_summary(report: dict[str, Any], console: "Console") -> None:
    from rich.table import Table

    table = Table(title=f"Training: {report['method']} on {report['model']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()

    def fmt(value: float | None, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    if "initial_eval_loss" in report:
        table.add_row("eval loss", f"{fmt(report['initial_eval_loss'])} -> {fmt(report['final_eval_loss'])} "
                      f"(best {fmt(report['best_eval_loss'])} at step {report['best_step']})")
        table.add_row("eval perplexity", f"{fmt(report['initial_eval_perplexity'], 2)} -> "
                      f"{fmt(report['final_eval_perplexity'], 2)}")
    table.add_row("final train loss", fmt(report.get("final_train_loss")))
    table.add_row("steps", f"{report['global_step']} ({report['epochs']:.2f} epochs)")
    table.add_row("tokens", f"{report['tokens_seen']:,} at {report['tokens_per_s']:,.0f} tokens/s")
    table.add_row("wall time", f"{report['wall_time_s']:.1f} s (training {report['train_time_s']:.1f} s)")
    table.add_row("peak memory", ", ".join(f"{k} {v:,.0f} MiB" for k, v in report["peak_memory_mib"].items()))
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
