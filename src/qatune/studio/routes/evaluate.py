"""The Evaluate page: base against tuned (`qatune eval --compare`), and the filled review sheet summarized."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from qatune.commands import command_line
from qatune.studio.paths import PathRefused
from qatune.studio.state import ModelJob, Studio, page_settings
from qatune.text_input import Name

router = APIRouter()


class SheetRequest(BaseModel):
    sheet: Name


@router.post("/api/eval")
async def evaluate(body: ModelJob, studio: Studio) -> dict[str, Any]:
    tuned, out = studio.run_folder(body.run), f"runs/{body.run}/eval"
    if not body.data:
        raise PathRefused("an evaluation set is needed", hint="pick a data file")
    argv = command_line("eval", compare=[studio.model(body.base), tuned], data=[studio.path(body.data)], out=out,
                        overrides=page_settings("eval", body.extra))
    return studio.start("eval", argv, out)


@router.post("/api/summarize")
async def summarize(body: SheetRequest, studio: Studio) -> dict[str, Any]:
    return studio.start("summarize", command_line("eval", "summarize", studio.path(body.sheet)))
