"""The HTTP service: OpenAI-compatible routes, `/answer`, `/health`, `/metrics` and the chat page.

`create_app(engine, cfg)` builds the FastAPI app around a started engine (`serve.recipe` loads the
engine and runs uvicorn). Every error reaches the client as OpenAI's error JSON
(`{"error": {"message", "type", "param", "code"}}`) with a message that says what to change;
no stack trace ever leaves the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from qatune.serve.guard import RequestGuard, allowed_hosts, error_body
from qatune.serve.metrics import MetricsMiddleware, ServiceMetrics
from qatune.serve.protocol import (
    Engine,
    EngineDown,
    Generation,
    QueueFull,
    Sampling,
    Update,
    chat_prompt,
)

if TYPE_CHECKING:
    from qatune.config import ServeConfig

log = logging.getLogger("qatune.serve")
PAGE = Path(__file__).parent / "static" / "index.html"
ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/answer"}
RETRY_AFTER_S = 2
SEED_RANGE = (-2**63, 2**63 - 1)  # what torch.Generator.manual_seed and vLLM both take


def keyed(path: str) -> bool:
    """Routes behind serve.api_key (the page, /health and /metrics stay open for browsers and probes)."""
    return path.startswith("/v1/") or path == "/answer"


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = \
            status, message, kind, param, code, headers


_error_body = error_body


# ---- request bodies (unknown fields are ignored, as OpenAI clients send many) -------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _Decoding(_Body):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None, description="up to 4 non-empty strings")
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one answer per request")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    repetition_penalty: float | None = Field(None, ge=1, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    stream_options: dict[str, Any] | None = None


class ChatRequest(_Decoding):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Decoding):
    prompt: str


class AnswerRequest(_Body):
    question: str = Field(min_length=1)
    model: str | None = None


# ---- the app -------------------------------------------------------------------------------------

def create_app(engine: Engine, cfg: "ServeConfig", metrics: ServiceMetrics | None = None) -> FastAPI:
    """The service around a started engine (the app stops the engine when it shuts down)."""
    metrics = metrics or ServiceMetrics()
    api_key = cfg.api_key or os.environ.get("QATUNE_API_KEY") or None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.stop()

    app = FastAPI(title="qatune", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(RequestGuard, api_key=api_key, keyed=keyed,  # type: ignore[arg-type]
                       max_body_bytes=cfg.max_body_bytes, read_timeout=cfg.read_timeout,
                       hosts=allowed_hosts(cfg.host, cfg.allowed_hosts), abuse_refusals=cfg.abuse_refusals,
                       abuse_delay=cfg.abuse_delay)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=ROUTES)  # type: ignore[arg-type]  # outermost
    app.state.engine, app.state.metrics = engine, metrics
    admission = _Admission(engine, cfg.max_queue)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(exc.message, exc.kind, exc.param, exc.code), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()]
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        return JSONResponse(_error_body("invalid request: " + "; ".join(problems[:5]), "invalid_request_error",
                                        ".".join(str(p) for p in first if p != "body") or None), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(_error_body(str(exc.detail), "invalid_request_error"), exc.status_code,
                            headers=getattr(exc, "headers", None))

    # Unexpected exceptions are answered (500) and logged, throttled, by RequestGuard.

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness for probes: 503 once the engine is dead. Model names are on /v1/models, behind the key."""
        alive = engine.alive
        return JSONResponse({"status": "ok" if alive else "engine_dead", "engine": engine.kind,
                             "queue_depth": engine.queue_depth, "in_flight": engine.in_flight + admission.preparing},
                            200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue.set(engine.queue_depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "qatune",
             "root": name if m.adapter is None else next(iter(engine.models)), "adapter": m.adapter}
            for name, m in engine.models.items()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        model = _model(engine, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        _check_size(cfg, messages, "messages")
        with admission:  # until the engine has it, then the engine counts it
            prompt = await _chat_tokens(engine, model, messages)
            generation = _start(engine, metrics, prompt, _sampling(cfg, engine, body, len(prompt)), model)
        return await _respond(cfg, metrics, request, body, model, generation, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        model = _model(engine, body.model)
        _check_size(cfg, [{"content": body.prompt}], "prompt")
        with admission:
            prompt = await asyncio.to_thread(engine.tokenizer.encode, body.prompt)
            if not prompt:
                raise ApiError(400, "prompt is empty: give some text to continue", param="prompt")
            generation = _start(engine, metrics, prompt, _sampling(cfg, engine, body, len(prompt)), model)
        return await _respond(cfg, metrics, request, body, model, generation, chat=False)

    @app.post("/answer")
    async def answer(body: AnswerRequest, request: Request) -> dict[str, Any]:
        model = _model(engine, body.model)
        messages = [{"role": "user", "content": body.question}]
        _check_size(cfg, messages, "question")
        with admission:
            prompt = await _chat_tokens(engine, model, messages, param="question")
            generation = _start(engine, metrics, prompt, _sampling(cfg, engine, _Decoding(), len(prompt)), model)
        text, _, usage = await _collect(generation, request, cfg, metrics)
        return {"answer": text, "model": model, "usage": usage}

    return app


def _version() -> str:
    from qatune import __version__

    return __version__


def _model(engine: Engine, requested: str | None) -> str:
    if requested is None or requested == "":
        return engine.default_model
    if requested not in engine.models:
        raise ApiError(404, f"model {requested[:100]!r} is not served here; served: {', '.join(engine.models)}",
                       param="model", code="model_not_found")
    return requested


class _Admission:
    """Every admitted request counts against serve.max_queue, from before its tokenization to its last token:
    `preparing` (tokenizing, here) plus the engine's `in_flight` (submitted, not finished)."""

    def __init__(self, engine: Engine, bound: int) -> None:
        self.engine, self.bound, self.preparing = engine, bound, 0

    def __enter__(self) -> "_Admission":
        if self.preparing + self.engine.in_flight >= self.bound:
            raise ApiError(503, f"the server is busy ({self.bound} requests are already admitted, serve.max_queue); "
                                "retry in a moment", "server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.preparing += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.preparing -= 1


def _check_size(cfg: "ServeConfig", messages: list[dict[str, str]], param: str) -> None:
    """The cheap bounds, before any template or tokenizer runs: message count and characters."""
    if len(messages) > cfg.max_messages:
        raise ApiError(413, f"{len(messages)} messages; this server accepts at most {cfg.max_messages} "
                            "(serve.max_messages)", param=param, code="context_length_exceeded")
    chars = sum(len(m["content"]) for m in messages)
    if chars > cfg.max_input_chars:
        raise ApiError(413, f"the {param} hold {chars} characters; this server accepts at most "
                            f"{cfg.max_input_chars} (serve.max_input_chars): send a shorter text",
                       param=param, code="context_length_exceeded")


async def _chat_tokens(engine: Engine, model: str, messages: list[dict[str, str]], param: str = "messages") -> list[int]:
    """The chat prompt's tokens, rendered and tokenized in a worker thread (never on the event loop)."""
    from qatune.infer.generation import ForgedTurnError

    try:
        return await asyncio.to_thread(chat_prompt, engine, model, messages)
    except ForgedTurnError as exc:
        raise ApiError(400, f"{exc.message}; fix: {exc.hint}", param=param, code="control_token") from None
    except Exception as exc:  # the template refuses this conversation (roles out of order, ...)
        raise ApiError(400, f"the chat template of {model!r} cannot render these messages: {str(exc)[:300]}",
                       param=param) from None


def _sampling(cfg: "ServeConfig", engine: Engine, body: _Decoding, prompt_tokens: int) -> Sampling:
    """Checked decoding settings: limits give 413 (prompt) and 400 (everything else)."""
    if prompt_tokens > cfg.max_input_tokens:
        raise ApiError(413, f"the prompt has {prompt_tokens} tokens; this server accepts at most "
                            f"{cfg.max_input_tokens} (serve.max_input_tokens)", param="messages",
                       code="context_length_exceeded")
    requested = body.max_completion_tokens or body.max_tokens
    if requested is not None and requested > cfg.max_tokens:
        raise ApiError(400, f"max_tokens={requested} is above this server's limit of {cfg.max_tokens} "
                            "(serve.max_tokens)", param="max_tokens")
    defaults = cfg.decoding
    max_new = requested or min(defaults.max_new_tokens, cfg.max_tokens)
    if engine.max_positions and prompt_tokens + max_new > engine.max_positions:
        raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_new}) exceeds the model's "
                            f"context of {engine.max_positions} tokens", param="max_tokens",
                       code="context_length_exceeded")
    if body.frequency_penalty or body.presence_penalty:
        raise ApiError(400, "frequency_penalty and presence_penalty are not supported; use repetition_penalty "
                            "(1.0-2.0, above 1 discourages repeats)", param="frequency_penalty")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
    if any(len(s) > cfg.max_stop_chars for s in stops):
        raise ApiError(400, f"a stop string is longer than this server's limit of {cfg.max_stop_chars} characters "
                            "(serve.max_stop_chars)", param="stop")
    return Sampling(
        max_new_tokens=max_new,
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        repetition_penalty=defaults.repetition_penalty if body.repetition_penalty is None else body.repetition_penalty,
        stop=tuple(stops), seed=body.seed,
    )


def _start(engine: Engine, metrics: ServiceMetrics, prompt: list[int], sampling: Sampling, model: str) -> Generation:
    try:
        generation = engine.generate(prompt, sampling, model)
    except QueueFull as exc:
        raise ApiError(503, f"the server is busy ({exc}); retry in a moment", "server_busy",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except EngineDown as exc:
        raise ApiError(503, f"the server cannot answer: {exc}; it needs a restart (/health says 503)",
                       "server_error", code="engine_down") from None
    metrics.queue.set(engine.queue_depth)
    metrics.prompt.inc(len(prompt))
    return generation


async def _updates(generation: Generation, timeout: float, metrics: ServiceMetrics) -> AsyncIterator[Update]:
    """A generation's updates until it finishes; asyncio.TimeoutError after `timeout` seconds; cancelled when left."""
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


async def _collect(generation: Generation, request: Request, cfg: "ServeConfig",
                   metrics: ServiceMetrics) -> tuple[str, str, dict[str, int]]:
    """The whole answer; the generation stops early if the client disconnects."""
    async def gather() -> tuple[str, str, dict[str, int]]:
        parts: list[str] = []
        async for update in _updates(generation, cfg.request_timeout, metrics):
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
        raise ApiError(504, f"no complete answer within {cfg.request_timeout:g} s (serve.request_timeout); "
                            "ask for fewer max_tokens", "timeout") from None


def _usage(update: Update) -> dict[str, int]:
    return {"prompt_tokens": update.prompt_tokens, "completion_tokens": update.completion_tokens,
            "total_tokens": update.prompt_tokens + update.completion_tokens}


async def _respond(cfg: "ServeConfig", metrics: ServiceMetrics, request: Request, body: _Decoding,
                   model: str, generation: Generation, chat: bool) -> Any:
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(generation, cfg, metrics, ident, created, model, chat, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, reason, usage = await _collect(generation, request, cfg, metrics)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
    return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": usage}


async def _sse(generation: Generation, cfg: "ServeConfig", metrics: ServiceMetrics, ident: str, created: int,
               model: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, reason: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        return _event({"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]})

    if chat:
        yield chunk(None, None, first=True)
    try:
        async for update in _updates(generation, cfg.request_timeout, metrics):
            if update.finish_reason == "error":
                yield _event(_error_body(f"generation failed: {update.error}", "server_error"))
                break
            if update.text or update.finish_reason:
                yield chunk(update.text, update.finish_reason if update.finish_reason != "cancelled" else None)
            if update.finish_reason and include_usage:
                yield _event({"id": ident, "object": kind, "created": created, "model": model, "choices": [],
                              "usage": _usage(update)})
    except asyncio.TimeoutError:
        yield _event(_error_body(f"no complete answer within {cfg.request_timeout:g} s (serve.request_timeout)",
                                 "timeout"))
    yield "data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

