"""Every refusal as OpenAI's error JSON (`{"error": {"message", "type", "param", "code"}}`): `ApiError`, raised
anywhere a request is handled, and the app's handlers for it and for FastAPI's own errors."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qatune.serve.guard import error_body
from qatune.text_input import printable

RETRY_AFTER_S = 2  # what a busy server asks a client to wait (Retry-After)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = \
            status, message, kind, param, code, headers


def server_busy(why: str) -> ApiError:
    """503 with Retry-After: the request may succeed in a moment."""
    return ApiError(503, f"the server is busy ({why}); retry in a moment", "server_busy",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def validation_problems(exc: RequestValidationError) -> tuple[str, str | None]:
    """A refused request's message naming each field (five at most) and its first field. Never the input
    itself: it may be huge, or hold a lone surrogate that no answer can encode (FastAPI's own handler echoes it)."""
    fields = [printable(".".join(str(p) for p in e["loc"] if p != "body")) for e in exc.errors()]
    problems = [f"{field or 'body'}: {printable(e['msg'])}" for field, e in zip(fields, exc.errors())]
    return "invalid request: " + "; ".join(problems[:5]), fields[0] if fields and fields[0] else None


def add_error_handlers(app: FastAPI) -> None:
    """ApiError, invalid bodies (422 naming the fields) and HTTP errors (404, 405) as OpenAI's error JSON.
    Unexpected exceptions are answered (500) and logged, throttled, by RequestGuard."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = validation_problems(exc)
        return JSONResponse(error_body(message, "invalid_request_error", field), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), exc.status_code,
                            headers=getattr(exc, "headers", None))
