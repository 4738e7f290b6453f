"""`qatune studio`: the browser front end over the workspace's files and the `qatune` commands.

Pages (static HTML and JS in `static/`, no build step): Data, Train, Evaluate, Chat, Export. The
API under `/api/` starts jobs (`qatune.studio.jobs`: the same CLI as subprocesses, the command
shown with each), reads run folders (`qatune.studio.progress`), and serves workspace files under
`/files/`. Every path is the workspace's (`qatune.studio.paths`); bound to loopback the studio
answers only loopback Host names (DNS rebinding); with a token every request needs it (a Bearer
header, or the cookie set when a page is opened with `?token=`); uploads stop at a size limit.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from qatune.errors import QatuneError
from qatune.serve.guard import allowed_hosts, host_name
from qatune.studio import form
from qatune.studio.jobs import JobConflict, JobRunner, NotFound
from qatune.studio.paths import PathRefused, Workspace
from qatune.studio.progress import curves, run_state

STATIC = Path(__file__).parent / "static"
PAGES = ("data", "train", "eval", "chat", "export")
COOKIE = "qatune_studio"
MAX_JSON_BYTES = 1 << 20
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt", ".md")
# `qatune data check` prints `FILE, line N, field 'F': reason: detail` per problem.
CHECK_LINE = re.compile(r"^(?P<file>.+?)(?:, (?:line|row) (?P<line>\d+))?(?:, field '(?P<field>[^']*)')?"
                        r": (?P<reason>[a-z_]+): (?P<detail>.*)$")
TOTAL_STEPS = re.compile(r"^step \d+/(\d+)", re.M)
# Keys a page may add to a job's command besides its own flags: settings, never a path.
EXTRA_KEYS = {"eval": ("eval.decoding.", "eval.max_samples", "eval.batch_size", "eval.side_by_side", "model.dtype"),
              "export": ("export.check_max_new_tokens", "export.dtype", "model.dtype"),
              "serve": ("serve.decoding.", "model.dtype")}


class UploadTooLarge(QatuneError):
    """An upload over the studio's limit."""


class TrainForm(BaseModel):
    run: str
    sources: list[str] = Field(default_factory=list)
    values: dict[str, str] = Field(default_factory=dict)


class CheckRequest(BaseModel):
    path: str
    format: str = "auto"
    dataset: str | None = None
    encoding: str = "utf-8"


class ModelJob(BaseModel):
    base: str = "default"
    run: str
    data: str | None = None
    gguf: str | None = None
    quantize: str | None = None
    force: bool = False
    extra: list[str] = Field(default_factory=list)


class SheetRequest(BaseModel):
    sheet: str


def create_app(workspace: Workspace, token: str | None = None, host: str = "127.0.0.1",
               max_upload_bytes: int = 256 << 20) -> FastAPI:
    """The studio over `workspace`; `token`, when set, is required on every request."""
    runner = JobRunner(workspace)
    hosts = allowed_hosts(host, [])

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        runner.stop_all("serve")  # chat servers end with the studio; training goes on

    app = FastAPI(title="qatune studio", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runner, app.state.workspace = runner, workspace

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if hosts is not None and host_name(request.headers.get("host", "")) not in hosts:
            return JSONResponse({"error": "unexpected Host header (DNS rebinding?): open the studio at 127.0.0.1"}, 400)
        if token:
            given = request.query_params.get("token")
            if given is not None and _same(given, token) and request.method == "GET":
                response = RedirectResponse(request.url.remove_query_params("token").path, 303)
                response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
                return response
            header = request.headers.get("authorization", "").removeprefix("Bearer ")
            if not any(_same(v, token) for v in (header, request.cookies.get(COOKIE, ""))):
                return JSONResponse({"error": "this studio needs its token: open it with ?token=TOKEN"}, 401)
        length = request.headers.get("content-length")
        if request.method == "POST" and length and (not length.isdigit() or int(length) > MAX_JSON_BYTES):
            return JSONResponse({"error": f"a request body over {MAX_JSON_BYTES} bytes"}, 413)
        return await call_next(request)

    @app.exception_handler(QatuneError)
    async def qatune_error(_: Request, exc: QatuneError) -> JSONResponse:
        status = {JobConflict: 409, PathRefused: 403, UploadTooLarge: 413, NotFound: 404}.get(type(exc), 400)
        return JSONResponse({"error": str(exc)}, status)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/data", 303)

    for name in PAGES:
        app.add_api_route(f"/{name}", _page(name), methods=["GET"], include_in_schema=False)

    # ---- files ------------------------------------------------------------------------------------
    @app.get("/api/files")
    async def list_files(under: str = ".") -> dict[str, Any]:
        folder = workspace.resolve(under)
        found = []
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            rel = path.relative_to(workspace.root)
            if rel.parts[0] in (".studio", "runs", "prepared", "exports") or not path.is_file():
                continue
            if (path.parent / "config.json").is_file() or (path.parent / "adapter_config.json").is_file():
                continue  # a model's or an adapter's folder, not data
            if path.suffix in DATA_SUFFIXES or path.name == "dataset_info.json":
                found.append({"path": rel.as_posix(), "bytes": path.stat().st_size})
        return {"root": str(workspace.root), "files": found}

    @app.put("/api/files/{relative:path}")
    async def upload(relative: str, request: Request) -> dict[str, Any]:
        target = workspace.resolve(relative)
        too_large = UploadTooLarge(f"the file is over the studio's upload limit ({max_upload_bytes} bytes)")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_upload_bytes:
            raise too_large
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.upload")
        size = 0
        try:
            with open(partial, "wb") as out:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_upload_bytes:
                        raise too_large
                    out.write(chunk)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return {"path": workspace.relative(target), "bytes": size}

    @app.get("/files/{relative:path}")
    async def download(relative: str) -> FileResponse:
        path = workspace.resolve(relative)
        if not path.is_file():
            raise NotFound(f"no file {relative!r} in the workspace")
        # A page from the workspace runs in a sandbox, never with the studio's origin and API.
        return FileResponse(path, headers={"Content-Security-Policy": "sandbox", "Cache-Control": "no-store"})

    # ---- data -----------------------------------------------------------------------------------
    @app.post("/api/check")
    async def check(body: CheckRequest) -> dict[str, Any]:
        workspace.resolve(body.path)
        args = ["data", "check", body.path, "--format", body.format, "--encoding", body.encoding]
        if body.dataset:
            args += ["--dataset", body.dataset]
        return runner.start("check", args).as_dict()

    @app.get("/api/jobs/{job_id}/problems")
    async def problems(job_id: str) -> dict[str, Any]:
        text, _ = runner.log(job_id)
        return {"job": runner.get(job_id).as_dict(), **check_problems(text)}

    @app.post("/api/prepare")
    async def prepare(body: TrainForm) -> dict[str, Any]:
        overrides = form.train_overrides(workspace, body.run, body.sources, body.values)
        return runner.start("prepare", ["data", "prepare", *overrides], f"prepared/{body.run}").as_dict()

    @app.get("/api/prepared/{run}")
    async def prepared(run: str) -> dict[str, Any]:
        report = workspace.resolve(f"prepared/{run}") / "data_report.json"
        if not report.is_file():
            raise NotFound(f"run {run!r} has no prepared data yet")
        return json.loads(report.read_text(encoding="utf-8"))

    # ---- train ----------------------------------------------------------------------------------
    @app.get("/api/schema")
    async def schema() -> dict[str, Any]:
        return {"fields": form.schema_fields(), "presets": form.PRESETS, "workspace": str(workspace.root)}

    @app.post("/api/train/check")
    async def train_check(body: TrainForm) -> dict[str, Any]:
        return form.check(form.train_overrides(workspace, body.run, body.sources, body.values))

    @app.post("/api/train")
    async def train(body: TrainForm, resume: bool = False) -> dict[str, Any]:
        overrides = form.train_overrides(workspace, body.run, body.sources, body.values)
        verdict = form.check(overrides)
        if not verdict["ok"]:
            return JSONResponse({"error": "the form has problems", **verdict}, 400)  # type: ignore[return-value]
        if resume:
            overrides.append("train.resume=true")
        return runner.start("train", ["train", *overrides], f"runs/{body.run}").as_dict()

    @app.get("/api/runs")
    async def runs() -> dict[str, Any]:
        folder = workspace.root / "runs"
        found = [_run_view(runner, workspace, p.name) for p in sorted(folder.iterdir())] if folder.is_dir() else []
        return {"runs": sorted(found, key=lambda r: r["modified"], reverse=True)}

    @app.get("/api/runs/{run}")
    async def run_view(run: str) -> dict[str, Any]:
        return _run_view(runner, workspace, run)

    @app.get("/api/runs/{run}/events")
    async def run_events(run: str, request: Request) -> StreamingResponse:
        workspace.resolve(f"runs/{run}")

        async def stream() -> AsyncIterator[str]:
            last = None
            while not await request.is_disconnected():
                view = await asyncio.to_thread(_run_view, runner, workspace, run)
                text = json.dumps(view)
                if text != last:
                    yield f"data: {text}\n\n"
                    last = text
                await asyncio.sleep(0.5)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    # ---- jobs -----------------------------------------------------------------------------------
    @app.get("/api/jobs")
    async def jobs() -> dict[str, Any]:
        return {"jobs": [j.as_dict() for j in runner.jobs()]}

    @app.get("/api/jobs/{job_id}")
    async def job(job_id: str, offset: int = 0) -> dict[str, Any]:
        text, after = runner.log(job_id, offset)
        return {**runner.get(job_id).as_dict(), "log": text, "offset": after}

    @app.post("/api/jobs/{job_id}/stop")
    async def stop(job_id: str) -> dict[str, Any]:
        return runner.stop(job_id).as_dict()

    # ---- evaluate, chat, export -----------------------------------------------------------------
    @app.post("/api/eval")
    async def evaluate(body: ModelJob) -> dict[str, Any]:
        tuned, out = _run_folder(workspace, body.run), f"runs/{body.run}/eval"
        if not body.data:
            raise PathRefused("an evaluation set is needed", hint="pick a data file")
        args = ["eval", "--compare", _model(workspace, body.base), tuned, "--data", _path(workspace, body.data),
                "--out", out, *_extra("eval", body.extra)]
        return runner.start("eval", args, out).as_dict()

    @app.post("/api/summarize")
    async def summarize(body: SheetRequest) -> dict[str, Any]:
        return runner.start("summarize", ["eval", "summarize", _path(workspace, body.sheet)]).as_dict()

    @app.post("/api/export")
    async def export(body: ModelJob) -> dict[str, Any]:
        out = f"exports/{body.run}"
        args = ["export", "--model", _model(workspace, body.base), "--adapter", _run_folder(workspace, body.run),
                "--out", out, *(["--gguf", body.gguf] if body.gguf else []),
                *(["--quantize", body.quantize] if body.quantize else []), *(["--force"] if body.force else []),
                *_extra("export", body.extra)]
        return runner.start("export", args, out).as_dict()

    @app.get("/api/reports/{relative:path}")
    async def report(relative: str) -> Any:
        path = workspace.resolve(relative)
        if path.suffix != ".json" or not path.is_file():
            raise NotFound(f"no JSON report {relative!r} in the workspace")
        return json.loads(path.read_text(encoding="utf-8"))

    @app.post("/api/chat")
    async def chat(body: ModelJob) -> dict[str, Any]:
        adapter = _run_folder(workspace, body.run)
        running = next((j for j in runner.jobs() if j.kind == "serve" and j.state == "running"
                        and j.output == f"chat/{body.run}"), None)
        if running:
            return running.as_dict()
        port = _free_port()
        args = ["serve", "--model", _model(workspace, body.base), "--adapter", f"{body.run}={adapter}",
                "--port", str(port), *_extra("serve", body.extra)]
        env = {"QATUNE_API_KEY": token} if token else None
        return runner.start("serve", args, f"chat/{body.run}", port=port, env=env).as_dict()

    @app.get("/api/chat/{job_id}/ready")
    async def chat_ready(job_id: str) -> dict[str, Any]:
        job = runner.get(job_id)
        return {"ready": job.state == "running" and await asyncio.to_thread(_answers, job.port), "job": job.as_dict()}

    return app


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())  # bytes: any text given compares, in constant time


def _page(name: str) -> Any:
    async def page() -> FileResponse:
        return FileResponse(STATIC / f"{name}.html", headers={"Cache-Control": "no-store"})
    return page


def check_problems(log: str) -> dict[str, Any]:
    """`qatune data check`'s output as rows of file, line, field, reason and detail, plus its summary line."""
    rows, summary = [], ""
    for line in log.splitlines():
        match = CHECK_LINE.match(line)
        if match and not line.startswith("error:"):
            row = match.groupdict()
            rows.append({**row, "line": int(row["line"]) if row["line"] else None})
        elif " records (" in line:
            summary = line
        elif line.startswith("error:"):
            summary = line
    return {"problems": rows, "summary": summary}


def _run_view(runner: JobRunner, workspace: Workspace, run: str) -> dict[str, Any]:
    if not form.RUN_NAME.fullmatch(run):
        raise PathRefused(f"run name {run!r}")
    folder = workspace.resolve(f"runs/{run}")
    job = runner.latest(f"runs/{run}", ("train",))
    view: dict[str, Any] = {"run": run, **run_state(folder), **curves(folder), "job": job.as_dict() if job else None,
                            "modified": folder.stat().st_mtime if folder.exists() else 0}
    if job and job.state == "running":
        view["state"] = "running"
    elif job and job.state == "failed" and view["state"] == "empty":
        view["state"] = "failed"
    if job:
        text, _ = runner.log(job.id)
        totals = TOTAL_STEPS.findall(text)
        view["max_steps"] = int(totals[-1]) if totals else None
        view["log_tail"] = "\n".join(text.splitlines()[-12:])
    view["step"] = int(view["train"][-1][0]) if view["train"] else 0
    return view


def _path(workspace: Workspace, relative: str) -> str:
    return workspace.relative(workspace.resolve(relative))


def _run_folder(workspace: Workspace, run: str) -> str:
    if not form.RUN_NAME.fullmatch(run):
        raise PathRefused(f"run name {run!r}")
    return _path(workspace, f"runs/{run}")


def _model(workspace: Workspace, model: str) -> str:
    return model if model == "default" else _path(workspace, model)


def _extra(kind: str, extra: list[str]) -> list[str]:
    refused = [e for e in extra if "=" not in e or not e.split("=", 1)[0].startswith(EXTRA_KEYS[kind])]
    if refused:
        raise PathRefused(f"not a {kind} setting this page may add: {', '.join(refused)}",
                          hint=f"keys starting with {', '.join(EXTRA_KEYS[kind])}")
    return list(extra)


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


def serve_studio(workspace: str | Path, host: str = "127.0.0.1", port: int = 7860, token: str | None = None) -> None:
    """Run the studio until Ctrl-C."""
    import uvicorn

    space = Workspace(workspace)
    url = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    print(f"qatune studio on {url} (workspace {space.root}); Ctrl-C to stop", flush=True)
    uvicorn.run(create_app(space, token, host), host=host, port=port, log_level="warning")
