"""The Data page: `qatune data check` of a file (its problems as rows) and `qatune data prepare` of a run."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from qatune.commands import command_line
from qatune.studio import form
from qatune.studio.jobs import NotFound
from qatune.studio.state import Studio
from qatune.text_input import Name

# `qatune data check` prints `FILE, line N, field 'F': reason: detail` per problem.
CHECK_LINE = re.compile(r"^(?P<file>.+?)(?:, (?:line|row) (?P<line>\d+))?(?:, field '(?P<field>[^']*)')?"
                        r": (?P<reason>[a-z_]+): (?P<detail>.*)$")

router = APIRouter()


class CheckRequest(BaseModel):
    path: Name
    format: Name = "auto"
    dataset: Name | None = None
    encoding: Name = "utf-8"


@router.post("/api/check")
async def check(body: CheckRequest, studio: Studio) -> dict[str, Any]:
    studio.workspace.resolve(body.path)
    return studio.start("check", command_line("data check", body.path, format=body.format, dataset=body.dataset,
                                              encoding=body.encoding))


@router.get("/api/jobs/{job_id}/problems")
async def problems(job_id: Name, studio: Studio) -> dict[str, Any]:
    text, _ = studio.runner.log(job_id)
    return {"job": studio.runner.get(job_id).as_dict(), **check_problems(text)}


@router.post("/api/prepare")
async def prepare(body: form.TrainForm, studio: Studio) -> dict[str, Any]:
    overrides = form.train_overrides(studio.workspace, body)
    return studio.start("prepare", command_line("data prepare", overrides=overrides), f"prepared/{body.run}")


@router.get("/api/prepared/{run}")
async def prepared(run: Name, studio: Studio) -> dict[str, Any]:
    report = studio.workspace.resolve(f"prepared/{run}") / "data_report.json"
    if not report.is_file():
        raise NotFound(f"run {run!r} has no prepared data yet")
    return json.loads(report.read_text(encoding="utf-8"))


def check_problems(log: str) -> dict[str, Any]:
    """`qatune data check`'s output as rows of file, line, field, reason and detail, plus its summary line."""
    rows, summary = [], ""
    for line in log.splitlines():
        match = CHECK_LINE.match(line)
        if match and not line.startswith("error:"):
            row = match.groupdict()
            rows.append({**row, "line": int(row["line"]) if row["line"] else None})
        elif " records (" in line or line.startswith("error:"):
            summary = line
    return {"problems": rows, "summary": summary}
