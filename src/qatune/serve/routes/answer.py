"""/answer: one question in, one answer out, in serve.decoding (the simplest client: curl, a form)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from qatune.serve.bodies import AnswerRequest, Decoding
from qatune.serve.prompting import Ask, start_generation
from qatune.serve.replies import Reply, respond
from qatune.serve.service import Served

router = APIRouter()


@router.post("/answer")
async def answer(body: AnswerRequest, request: Request, service: Served) -> dict[str, Any]:
    ask = Ask(service.model(body.model), "question", messages=({"role": "user", "content": body.question},))
    decoding = Decoding()  # the server's defaults
    generation = await start_generation(service, ask, decoding)
    return await respond(service, request, generation, Reply.to("answer", ask.model), decoding)
