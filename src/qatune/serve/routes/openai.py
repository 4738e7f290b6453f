"""OpenAI's API: /v1/models, /v1/chat/completions and /v1/completions (streamed over SSE on request)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from qatune.serve.bodies import ChatRequest, CompletionRequest
from qatune.serve.prompting import Ask, start_generation
from qatune.serve.replies import Reply, respond
from qatune.serve.service import Served

router = APIRouter()


@router.get("/v1/models")
async def models(service: Served) -> dict[str, Any]:
    engine = service.engine
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "qatune",
         "root": name if m.adapter is None else next(iter(engine.models)), "adapter": m.adapter}
        for name, m in engine.models.items()]}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, service: Served) -> Any:
    ask = Ask(service.model(body.model), "messages",
              messages=tuple({"role": m.role, "content": m.text()} for m in body.messages))
    generation = await start_generation(service, ask, body)
    return await respond(service, request, generation, Reply.to("chat", ask.model), body)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, service: Served) -> Any:
    ask = Ask(service.model(body.model), "prompt", text=body.prompt)
    generation = await start_generation(service, ask, body)
    return await respond(service, request, generation, Reply.to("completion", ask.model), body)
