"""From a running generation to the client: `respond` answers every route, whole or streamed as server-sent
events, and `Reply` is the one place that writes the answer's JSON (OpenAI's chat and text completions, and
`/answer`'s own). A client that leaves stops its generation; one that waits too long gets 504."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import StreamingResponse

from qatune.serve.api_errors import ApiError
from qatune.serve.bodies import Decoding
from qatune.serve.guard import error_body
from qatune.serve.protocol import Generation, Update
from qatune.serve.service import Service

Shape = Literal["chat", "completion", "answer"]


@dataclass(frozen=True)
class Reply:
    """How the answer to one request is written: whole (`whole`) or in chunks (`chunk`, `usage_chunk`)."""

    shape: Shape
    model: str
    ident: str
    created: int

    @classmethod
    def to(cls, shape: Shape, model: str) -> "Reply":
        return cls(shape, model, f"{'chatcmpl' if shape == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                   int(time.time()))

    def whole(self, text: str, reason: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.shape == "answer":
            return {"answer": text, "model": self.model, "usage": usage}
        if self.shape == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return self._envelope("chat.completion" if self.shape == "chat" else "text_completion", [choice]) \
            | {"usage": usage}

    def chunk(self, text: str | None, reason: str | None, first: bool = False) -> dict[str, Any]:
        if self.shape == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        return self._envelope(self._chunk_object, [choice])

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._envelope(self._chunk_object, []) | {"usage": usage}

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.shape == "chat" else "text_completion"

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.model, "choices": choices}


async def respond(service: Service, request: Request, generation: Generation, reply: Reply,
                  decoding: Decoding) -> Any:
    """The answer of every route: streamed when the request asks (`stream`), else whole once it is done."""
    if decoding.stream:
        include_usage = bool((decoding.stream_options or {}).get("include_usage"))
        return StreamingResponse(_events(service, generation, reply, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, reason, usage = await _collect(service, generation, request)
    return reply.whole(text, reason, usage)


async def _updates(service: Service, generation: Generation) -> AsyncIterator[Update]:
    """A generation's updates until it finishes; asyncio.TimeoutError after serve.request_timeout; cancelled when
    left."""
    timeout, metrics = service.cfg.request_timeout, service.metrics
    started = time.perf_counter()
    first = True
    try:
        while True:
            left = timeout - (time.perf_counter() - started)
            update = await asyncio.wait_for(generation.next_update(), max(left, 0.0))
            if first:
                metrics.first_token.observe(time.perf_counter() - started)
                first = False
            yield update
            if update.finish_reason:
                return
    finally:
        generation.cancel()


async def _collect(service: Service, generation: Generation, request: Request) -> tuple[str, str, dict[str, int]]:
    """The whole answer; the generation stops early if the client disconnects."""
    async def gather() -> tuple[str, str, dict[str, int]]:
        parts: list[str] = []
        async for update in _updates(service, generation):
            parts.append(update.text)
            if update.finish_reason:
                if update.finish_reason == "error":
                    raise ApiError(500, f"generation failed: {update.error}", "server_error")
                return "".join(parts), update.finish_reason, _usage(update)
        raise ApiError(500, "generation ended without an answer", "server_error")

    async def disconnected() -> None:
        # The body has been read, so the server's next message is the disconnect: awaiting it sees a client
        # leave at once, where polling `is_disconnected` let an answer that ended within the poll pass as 200.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer, watcher = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([answer, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        client_left = watcher.done() and not watcher.cancelled() and watcher.exception() is None
        watcher.cancel()
        if not answer.done():  # the client left (or this request was cancelled): stop generating for it
            answer.cancel()
        # A cancel is only requested above: wait until the task has taken it, so that neither its result
        # nor its exception is read from a task that is still running (the old 500 with two tracebacks).
        await asyncio.wait([answer, watcher])
    if client_left or answer.cancelled():
        raise ApiError(499, "client closed the request", code="client_closed")
    try:
        return answer.result()
    except asyncio.TimeoutError:
        raise ApiError(504, f"no complete answer within {service.cfg.request_timeout:g} s (serve.request_timeout); "
                            "ask for fewer max_tokens", "timeout") from None


async def _events(service: Service, generation: Generation, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    if reply.shape == "chat":
        yield _event(reply.chunk(None, None, first=True))
    try:
        async for update in _updates(service, generation):
            if update.finish_reason == "error":
                yield _event(error_body(f"generation failed: {update.error}", "server_error"))
                break
            if update.text or update.finish_reason:
                yield _event(reply.chunk(update.text, update.finish_reason if update.finish_reason != "cancelled"
                                         else None))
            if update.finish_reason and include_usage:
                yield _event(reply.usage_chunk(_usage(update)))
    except asyncio.TimeoutError:
        yield _event(error_body(f"no complete answer within {service.cfg.request_timeout:g} s "
                                "(serve.request_timeout)", "timeout"))
    yield "data: [DONE]\n\n"


def _usage(update: Update) -> dict[str, int]:
    return {"prompt_tokens": update.prompt_tokens, "completion_tokens": update.completion_tokens,
            "total_tokens": update.prompt_tokens + update.completion_tokens}


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
