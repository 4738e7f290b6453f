"""`qatune studio`: the browser front end over the workspace's files and the `qatune` commands.

Pages (static HTML and JS in `static/`, no build step): Data, Train, Evaluate, Chat, Export. The
API under `/api/` (`qatune.studio.routes`, a router per page or concern) starts jobs
(`qatune.studio.jobs`: the same CLI as subprocesses, each command line from the command table, shown
with the job), reads run folders (`qatune.studio.progress`), and serves workspace files under
`/files/`. Every path is the workspace's (`qatune.studio.paths`); bound to loopback the studio
answers only loopback Host names (DNS rebinding); with a token every request needs it (a Bearer
header, or the cookie set when a page is opened with `?token=`); uploads stop at a size limit.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from qatune.errors import QatuneError
from qatune.serve.api_errors import validation_problems
from qatune.serve.guard import allowed_hosts, host_name
from qatune.studio.jobs import JobConflict, JobRunner, NotFound
from qatune.studio.paths import PathRefused, Workspace
from qatune.studio.routes import chat, data, evaluate, export, files, jobs, train
from qatune.studio.state import StudioState

STATIC = Path(__file__).parent / "static"
PAGES = ("data", "train", "eval", "chat", "export")
COOKIE = "qatune_studio"
MAX_JSON_BYTES = 1 << 20
STATUS_OF_ERROR = {JobConflict: 409, PathRefused: 403, files.UploadTooLarge: 413, NotFound: 404}  # else 400


def create_app(workspace: Workspace, token: str | None = None, host: str = "127.0.0.1",
               max_upload_bytes: int = 256 << 20) -> FastAPI:
    """The studio over `workspace`; `token`, when set, is required on every request."""
    studio = StudioState(workspace, JobRunner(workspace), token, max_upload_bytes)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        studio.runner.stop_all("serve")  # chat servers end with the studio; training goes on

    app = FastAPI(title="qatune studio", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.studio = studio
    app.middleware("http")(_guard(allowed_hosts(host, []), token))
    app.add_exception_handler(QatuneError, _qatune_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_api_route("/", _home, methods=["GET"], include_in_schema=False)
    for name in PAGES:
        app.add_api_route(f"/{name}", _page(name), methods=["GET"], include_in_schema=False)
    for part in (files, data, train, jobs, evaluate, export, chat):
        app.include_router(part.router)
    return app


def _guard(hosts: set[str] | None, token: str | None) -> Any:
    """The middleware every request passes: the Host (DNS rebinding), the token, the size of a JSON body."""

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

    return guard


async def _qatune_error(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, STATUS_OF_ERROR.get(type(exc), 400))


async def _invalid_request(_: Request, exc: Exception) -> JSONResponse:
    """422 naming the fields, as the pages show any `error`; see `validation_problems` for why not FastAPI's own."""
    message, field = validation_problems(exc)  # type: ignore[arg-type]
    return JSONResponse({"error": message, "field": field}, 422)


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())  # bytes: any text given compares, in constant time


async def _home() -> RedirectResponse:
    return RedirectResponse("/data", 303)


def _page(name: str) -> Any:
    async def page() -> FileResponse:
        return FileResponse(STATIC / f"{name}.html", headers={"Cache-Control": "no-store"})
    return page


def serve_studio(workspace: str | Path, host: str = "127.0.0.1", port: int = 7860, token: str | None = None) -> None:
    """Run the studio until Ctrl-C."""
    import uvicorn

    space = Workspace(workspace)
    url = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    print(f"qatune studio on {url} (workspace {space.root}); Ctrl-C to stop", flush=True)
    uvicorn.run(create_app(space, token, host), host=host, port=port, log_level="warning")
