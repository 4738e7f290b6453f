"""The Train page: the form from the schema, its check, the training job, and the runs with their progress."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from qatune.commands import command_line
from qatune.models import embedded_models
from qatune.studio import form
from qatune.studio.progress import curves, run_state
from qatune.studio.state import Studio, StudioState
from qatune.text_input import Name

TOTAL_STEPS = re.compile(r"^step \d+/(\d+)", re.M)

router = APIRouter()


@router.get("/api/schema")
async def schema(studio: Studio) -> dict[str, Any]:
    return {"fields": form.schema_fields(), "presets": form.PRESETS, "workspace": str(studio.workspace.root),
            "models": [{"name": name, "description": line} for name, line in embedded_models().items()]}


@router.post("/api/train/check")
async def train_check(body: form.TrainForm, studio: Studio) -> dict[str, Any]:
    return form.check(studio.workspace, body)


@router.post("/api/train", response_model=None)
async def train(body: form.TrainForm, studio: Studio, resume: bool = False) -> dict[str, Any] | JSONResponse:
    verdict = form.check(studio.workspace, body)
    if not verdict["ok"]:
        return JSONResponse({"error": "the form has problems", **verdict}, 400)
    overrides = [*verdict["overrides"], *(["train.resume=true"] if resume else [])]
    return studio.start("train", command_line("train", overrides=overrides), f"runs/{body.run}")


@router.get("/api/runs")
async def runs(studio: Studio) -> dict[str, Any]:
    folder = studio.workspace.root / "runs"
    found = [run_view(studio, p.name) for p in sorted(folder.iterdir())] if folder.is_dir() else []
    return {"runs": sorted(found, key=lambda r: r["modified"], reverse=True)}


@router.get("/api/runs/{run}")
async def run(run: Name, studio: Studio) -> dict[str, Any]:
    return run_view(studio, run)


@router.get("/api/runs/{run}/events")
async def run_events(run: Name, request: Request, studio: Studio) -> StreamingResponse:
    studio.run_folder(run)

    async def stream() -> AsyncIterator[str]:
        last = None
        while not await request.is_disconnected():
            text = json.dumps(await asyncio.to_thread(run_view, studio, run))
            if text != last:
                yield f"data: {text}\n\n"
                last = text
            await asyncio.sleep(0.5)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def run_view(studio: StudioState, run: str) -> dict[str, Any]:
    """A run as the Train page shows it: its state, loss curves, latest training job and log tail."""
    folder = studio.workspace.resolve(studio.run_folder(run))
    job = studio.runner.latest(f"runs/{run}", ("train",))
    view: dict[str, Any] = {"run": run, **run_state(folder), **curves(folder), "job": job.as_dict() if job else None,
                            "modified": folder.stat().st_mtime if folder.exists() else 0}
    if job and job.state == "running":
        view["state"] = "running"
    elif job and job.state == "failed" and view["state"] == "empty":
        view["state"] = "failed"
    if job:
        text, _ = studio.runner.log(job.id)
        totals = TOTAL_STEPS.findall(text)
        view["max_steps"] = int(totals[-1]) if totals else None
        view["log_tail"] = "\n".join(text.splitlines()[-12:])
    view["step"] = int(view["train"][-1][0]) if view["train"] else 0
    return view
