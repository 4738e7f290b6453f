"""Jobs of every page: the list, one job with its log from an offset, and stopping one (as Ctrl-C)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from qatune.studio.state import Studio
from qatune.text_input import Name

router = APIRouter()


@router.get("/api/jobs")
async def jobs(studio: Studio) -> dict[str, Any]:
    return {"jobs": [j.as_dict() for j in studio.runner.jobs()]}


@router.get("/api/jobs/{job_id}")
async def job(job_id: Name, studio: Studio,
              offset: int = Query(0, ge=0, description="the byte of the log to read from")) -> dict[str, Any]:
    text, after = studio.runner.log(job_id, offset)
    return {**studio.runner.get(job_id).as_dict(), "log": text, "offset": after}


@router.post("/api/jobs/{job_id}/stop")
async def stop(job_id: Name, studio: Studio) -> dict[str, Any]:
    return studio.runner.stop(job_id).as_dict()
