"""Workspace files: the data files a page lists, uploads (bounded), downloads (sandboxed) and JSON reports."""

from __future__ import annotations

import json
import os
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from qatune.errors import QatuneError
from qatune.studio.jobs import NotFound
from qatune.studio.state import Studio
from qatune.text_input import Name

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt", ".md")
STUDIO_FOLDERS = (".studio", "runs", "prepared", "exports")  # what the studio writes: never listed as data

router = APIRouter()


class UploadTooLarge(QatuneError):
    """An upload over the studio's limit."""


@router.get("/api/files")
async def list_files(studio: Studio, under: Name = ".") -> dict[str, Any]:
    root = studio.workspace.root
    folder = studio.workspace.resolve(under)
    found = []
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        rel = path.relative_to(root)
        if rel.parts[0] in STUDIO_FOLDERS or not path.is_file():
            continue
        if (path.parent / "config.json").is_file() or (path.parent / "adapter_config.json").is_file():
            continue  # a model's or an adapter's folder, not data
        if path.suffix in DATA_SUFFIXES or path.name == "dataset_info.json":
            found.append({"path": rel.as_posix(), "bytes": path.stat().st_size})
    return {"root": str(root), "files": found}


@router.put("/api/files/{relative:path}")
async def upload(relative: Name, request: Request, studio: Studio) -> dict[str, Any]:
    target = studio.workspace.resolve(relative)
    limit = studio.max_upload_bytes
    too_large = UploadTooLarge(f"the file is over the studio's upload limit ({limit} bytes)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.upload")
    size = 0
    try:
        with open(partial, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                out.write(chunk)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return {"path": studio.workspace.relative(target), "bytes": size}


@router.get("/files/{relative:path}")
async def download(relative: Name, studio: Studio) -> FileResponse:
    path = studio.workspace.resolve(relative)
    if not path.is_file():
        raise NotFound(f"no file {relative!r} in the workspace")
    # A page from the workspace runs in a sandbox, never with the studio's origin and API.
    return FileResponse(path, headers={"Content-Security-Policy": "sandbox", "Cache-Control": "no-store"})


@router.get("/api/reports/{relative:path}")
async def report(relative: Name, studio: Studio) -> Any:
    path = studio.workspace.resolve(relative)
    if path.suffix != ".json" or not path.is_file():
        raise NotFound(f"no JSON report {relative!r} in the workspace")
    return json.loads(path.read_text(encoding="utf-8"))
