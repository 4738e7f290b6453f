"""What operators read, without the API key: /health for probes and /metrics for Prometheus."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from qatune.serve.service import Served

router = APIRouter()


@router.get("/health")
async def health(service: Served) -> JSONResponse:
    """Liveness for probes: 503 once the engine is dead. Model names are on /v1/models, behind the key."""
    engine = service.engine
    alive = engine.alive
    return JSONResponse({"status": "ok" if alive else "engine_dead", "engine": engine.kind,
                         "queue_depth": engine.queue_depth,
                         "in_flight": engine.in_flight + service.admission.preparing}, 200 if alive else 503)


@router.get("/metrics")
async def prometheus(service: Served) -> Response:
    service.metrics.queue.set(service.engine.queue_depth)
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
