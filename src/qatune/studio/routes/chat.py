"""The Chat page: `qatune serve` of a run's adapter on a free port (one per run), and whether it answers yet."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from typing import Any

from fastapi import APIRouter

from qatune.commands import command_line
from qatune.studio.state import ModelJob, Studio, page_settings
from qatune.text_input import Name

router = APIRouter()


@router.post("/api/chat")
async def chat(body: ModelJob, studio: Studio) -> dict[str, Any]:
    adapter, output = studio.run_folder(body.run), f"chat/{body.run}"
    running = next((j for j in studio.runner.jobs() if j.kind == "serve" and j.state == "running"
                    and j.output == output), None)
    if running:
        return running.as_dict()
    port = _free_port()
    argv = command_line("serve", model=studio.model(body.base), adapter=[f"{body.run}={adapter}"], port=port,
                        overrides=page_settings("serve", body.extra))
    env = {"QATUNE_API_KEY": studio.token} if studio.token else None
    return studio.start("serve", argv, output, port=port, env=env)


@router.get("/api/chat/{job_id}/ready")
async def chat_ready(job_id: Name, studio: Studio) -> dict[str, Any]:
    job = studio.runner.get(job_id)
    return {"ready": job.state == "running" and await asyncio.to_thread(_answers, job.port), "job": job.as_dict()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int | None) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
