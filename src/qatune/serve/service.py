"""`Service`: what one app's routes share. `create_app` makes one per app (`app.state.service`), so two apps in
one process share nothing: not their engine, limits, metrics, admissions, nor the throttle of their error log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from qatune.serve.api_errors import ApiError, server_busy
from qatune.serve.guard import ThrottledLog
from qatune.serve.metrics import ServiceMetrics
from qatune.serve.protocol import Engine

if TYPE_CHECKING:
    from qatune.config import ServeConfig


class Admission:
    """Every admitted request counts against serve.max_queue, from before its tokenization to its last token:
    `preparing` (tokenizing, here) plus the engine's `in_flight` (submitted, not finished)."""

    def __init__(self, engine: Engine, bound: int) -> None:
        self.engine, self.bound, self.preparing = engine, bound, 0

    def __enter__(self) -> "Admission":
        if self.preparing + self.engine.in_flight >= self.bound:
            raise server_busy(f"{self.bound} requests are already admitted, serve.max_queue")
        self.preparing += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.preparing -= 1


@dataclass
class Service:
    engine: Engine  # started by whoever made it; stopped when the app shuts down
    cfg: "ServeConfig"
    metrics: ServiceMetrics
    admission: Admission
    unexpected: ThrottledLog  # tracebacks of unexpected errors (RequestGuard), at most one a minute

    def model(self, requested: str | None) -> str:
        """The served model a request asks for (the default when it names none); 404 for one not served here."""
        if requested is None or requested == "":
            return self.engine.default_model
        if requested not in self.engine.models:
            raise ApiError(404, f"model {requested[:100]!r} is not served here; served: {', '.join(self.engine.models)}",
                           param="model", code="model_not_found")
        return requested


def _service_of(request: Request) -> Service:
    return request.app.state.service


Served = Annotated[Service, Depends(_service_of)]  # a route's parameter: the Service of the app it runs in
