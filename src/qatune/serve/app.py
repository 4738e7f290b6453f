"""The HTTP service: OpenAI-compatible routes, `/answer`, `/health`, `/metrics` and the chat page.

`create_app(engine, cfg)` builds the FastAPI app around a started engine (`serve.recipe` loads the
engine and runs uvicorn): the routers of `serve.routes` on one `Service` of its own. Every error
reaches the client as OpenAI's error JSON (`{"error": {"message", "type", "param", "code"}}`) with
a message that says what to change; no stack trace ever leaves the server.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from qatune.serve.api_errors import add_error_handlers
from qatune.serve.guard import RequestGuard, ThrottledLog, allowed_hosts
from qatune.serve.metrics import MetricsMiddleware, ServiceMetrics
from qatune.serve.protocol import Engine
from qatune.serve.routes import answer, openai, ops, page
from qatune.serve.service import Admission, Service

if TYPE_CHECKING:
    from qatune.config import ServeConfig

log = logging.getLogger("qatune.serve")
ROUTERS = (page.router, ops.router, openai.router, answer.router)
ROUTES = {route.path for router in ROUTERS for route in router.routes}  # metric labels; any other path is "other"


def keyed(path: str) -> bool:
    """Routes behind serve.api_key (the page, /health and /metrics stay open for browsers and probes)."""
    return path.startswith("/v1/") or path == "/answer"


def create_app(engine: Engine, cfg: "ServeConfig", metrics: ServiceMetrics | None = None) -> FastAPI:
    """The service around a started engine (the app stops the engine when it shuts down)."""
    service = Service(engine, cfg, metrics or ServiceMetrics(), Admission(engine, cfg.max_queue), ThrottledLog(log))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.stop()

    app = FastAPI(title="qatune", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_middleware(RequestGuard, api_key=cfg.api_key or os.environ.get("QATUNE_API_KEY") or None,  # type: ignore[arg-type]
                       keyed=keyed, max_body_bytes=cfg.max_body_bytes, read_timeout=cfg.read_timeout,
                       hosts=allowed_hosts(cfg.host, cfg.allowed_hosts), unexpected=service.unexpected,
                       abuse_refusals=cfg.abuse_refusals, abuse_delay=cfg.abuse_delay)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics, routes=ROUTES)  # type: ignore[arg-type]  # outermost
    add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


def _version() -> str:
    from qatune import __version__

    return __version__
