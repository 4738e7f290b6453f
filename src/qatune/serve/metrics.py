"""Prometheus metrics of the service, in a registry of its own (no global state between apps).

Names are part of the deployment contract: `deploy/prometheus.yml` scrapes them and the Grafana
dashboard plots them; `tests/serve/test_deploy.py` checks the two agree with `METRIC_NAMES`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

METRIC_NAMES = {
    "requests": "qatune_requests_total",
    "latency": "qatune_request_latency_seconds",
    "first_token": "qatune_time_to_first_token_seconds",
    "generated": "qatune_generated_tokens_total",
    "prompt": "qatune_prompt_tokens_total",
    "queue": "qatune_queue_depth",
    "batch": "qatune_batch_size",
    "steps": "qatune_engine_steps_total",
}
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # prometheus_client adds _total to counters itself.
        self.requests = Counter("qatune_requests", "HTTP requests by route and status code.", ["route", "status"],
                                registry=r)
        self.latency = Histogram("qatune_request_latency_seconds", "Time from request to the last byte of the answer.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("qatune_time_to_first_token_seconds", "Time from request to the first token.",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter("qatune_generated_tokens", "Tokens generated.", registry=r)
        self.prompt = Counter("qatune_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.queue = Gauge("qatune_queue_depth", "Requests waiting for a place in the running batch.", registry=r)
        self.batch = Gauge("qatune_batch_size", "Requests decoded together in the last step.", registry=r)
        # generated_tokens_total / engine_steps_total is the mean batch: how much requests share steps.
        self.steps = Counter("qatune_engine_steps", "Model steps (prefill or decode) of the engine.", registry=r)

    def on_step(self, waiting: int, running: int, tokens: int) -> None:
        """Called by the engine after each step."""
        self.queue.set(waiting)
        self.batch.set(running)
        self.steps.inc()
        self.generated.inc(tokens)


class MetricsMiddleware:
    """Counts every request by route and status, and times it to its last body message (streams included), counted
    as that message is sent so that a client holding a whole answer finds it counted; an unfinished one when it ends.

    Unknown paths share the route label `other`, so random URLs cannot blow up the label set."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        started = time.perf_counter()
        status = {"code": 500, "counted": False}

        def count() -> None:
            if not status["counted"]:
                status["counted"] = True
                self.metrics.requests.labels(route, str(status["code"])).inc()
                self.metrics.latency.labels(route).observe(time.perf_counter() - started)

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count()
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            count()  # an answer never finished (the client left, or the app raised)
