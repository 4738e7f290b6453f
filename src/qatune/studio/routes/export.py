"""The Export page: `qatune export` of a run's adapter on its base, into exports/RUN."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from qatune.commands import command_line
from qatune.studio.state import ModelJob, Studio, page_settings

router = APIRouter()


@router.post("/api/export")
async def export(body: ModelJob, studio: Studio) -> dict[str, Any]:
    out = f"exports/{body.run}"
    argv = command_line("export", model=studio.model(body.base), adapter=studio.run_folder(body.run), out=out,
                        gguf=body.gguf, quantize=body.quantize, force=body.force,
                        overrides=page_settings("export", body.extra))
    return studio.start("export", argv, out)
