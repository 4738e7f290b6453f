"""What a finished run writes besides the weights: previews of held-out answers, the report, and
the figures that go into it."""

from __future__ import annotations

import resource
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from qatune.config import DecodingConfig, QatuneConfig
from qatune.reports import write_report as write_report_file
from qatune.train import report as train_report
from qatune.train.report import TrainReport


def preview_rows(validation: Any, count: int) -> list[dict[str, Any]]:
    """The first held-out conversations, cut before their last answer."""
    rows: list[dict[str, Any]] = []
    if validation is None:
        return rows
    for messages in validation.select(range(min(count, len(validation))))["messages"]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        rows.append({"prompt": messages[:last], "question": messages[last - 1]["content"],
                     "reference": messages[last]["content"]})
    return rows


def answer_previews(model: Any, tokenizer: Any, template: Any, rows: list[dict[str, Any]],
                    decoding: DecodingConfig, batch_size: int, label: str) -> None:
    """Each row's answer by `model` under `label` ("base" or "tuned")."""
    if not rows:
        return
    from qatune.infer.generation import generate

    # Before training an adapter's base answers come from the same model with the adapter switched off.
    off = model.disable_adapter() if label == "base" and hasattr(model, "disable_adapter") else nullcontext()
    with off:
        answers = generate(model, tokenizer, template.source, [r["prompt"] for r in rows], decoding,
                           template.end_of_turn_id, batch_size)
    for row, answer in zip(rows, answers):
        row[label] = answer.text


def build_report(config: QatuneConfig, stage: str, precision: str, device: str, trainer: Any, parameters: Any, *,
                 data_reused: bool, resumed_from: Path | None, stage_metrics: dict[str, Any], processes: int,
                 replicas: list[float] | None, preview: list[dict[str, Any]], train_seconds: float,
                 started: float) -> TrainReport:
    """The report of a completed run from its trained Trainer (`parameters`: the method's ParameterCount;
    `started`: perf_counter when the run began)."""
    from qatune import __version__
    from qatune.compat.transformers import tokens_seen_this_run

    state, log = trainer.state, trainer.state.log_history
    tokens = tokens_seen_this_run(trainer)
    return TrainReport(
        qatune_version=__version__, method=config.method.name, model=config.model.name_or_path, stage=stage,
        device=device, precision=precision, trainable_parameters=parameters.trainable,
        total_parameters=parameters.total, train_samples=len(trainer.train_dataset),
        eval_samples=len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
        data_reused=data_reused, resumed_from=str(resumed_from) if resumed_from else None,
        global_step=state.global_step, epochs=state.epoch or 0.0, stopped_early=state.global_step < state.max_steps,
        eval_loss=train_report.eval_summary(log),
        loss_history={"train": train_report.train_points(log), "eval": train_report.eval_points(log)},
        stage_metrics=stage_metrics, final_train_loss=next((e["loss"] for e in reversed(log) if "loss" in e), None),
        best_checkpoint=state.best_model_checkpoint, tokens_seen=tokens,
        tokens_per_s=tokens / train_seconds if train_seconds else 0.0, train_time_s=train_seconds,
        wall_time_s=time.perf_counter() - started, peak_memory_mib=peak_memory(device), processes=processes,
        distributed=config.train.distributed if processes > 1 else None, replica_checksums=replicas,
        replicas_identical=len(set(replicas)) == 1 if replicas else None,
        preview=[{k: row[k] for k in ("question", "reference", "base", "tuned")} for row in preview])


def write_report(report: TrainReport, out: Path) -> None:
    """train_report.json, listing every file of the run folder (itself included)."""
    report.files = sorted({p.name for p in out.iterdir()} | {train_report.REPORT_FILE})
    write_report_file(report, out / train_report.REPORT_FILE)


def replica_checksums(model: Any) -> list[float]:
    """Each rank's sum of its trainable weights: data-parallel replicas must end identical."""
    import torch
    import torch.distributed as dist

    local = torch.tensor([sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)],
                         dtype=torch.float64, device=next(model.parameters()).device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [float(t.item()) for t in gathered]


def peak_memory(device: str) -> dict[str, float]:
    import torch

    peak = {"process_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device == "cuda":
        peak["gpu_allocated"] = torch.cuda.max_memory_allocated() / 2**20
    return peak
