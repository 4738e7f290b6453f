"""What a finished run writes besides the weights: previews of held-out answers, the report, and
the figures that go into it."""

from __future__ import annotations

import resource
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from qatune.config import DecodingConfig
from qatune.files import write_json
from qatune.train import report as train_report


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


def write_report(report: dict[str, Any], out: Path) -> None:
    """train_report.json, listing every file of the run folder (itself included)."""
    report["files"] = sorted({p.name for p in out.iterdir()} | {train_report.REPORT_FILE})
    write_json(out / train_report.REPORT_FILE, report)


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
