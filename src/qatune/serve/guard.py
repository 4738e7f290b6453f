"""What every request passes before the app does any work for it: a pure ASGI middleware.

In this order, each refusal an OpenAI error JSON: a Host that is not this server's name while it
is bound to loopback (400: DNS rebinding), a missing or wrong API key (401, before one byte of the
body is read), a body over `serve.max_body_bytes` (413: refused from its Content-Length, or while
it is read, before any JSON parsing) or not sent within `serve.read_timeout` (408). The body is
then handed to the app in one piece. An unexpected exception becomes a 500 whose traceback stays
in the server log, at most one traceback per minute (the others are counted).

A client address whose requests were refused (4xx) more than `serve.abuse_refusals` times in the
last 10 s has each new request held `serve.abuse_delay` s before anything is done for it: a
client hammering the server with bad requests is slowed to a trickle and costs almost no CPU,
while the others are served as before. (Behind a reverse proxy uvicorn takes the address from
X-Forwarded-For, so one abuser does not slow everyone.)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

log = logging.getLogger("qatune.serve")


class ThrottledLog:
    """Tracebacks of unexpected errors, at most one per `interval` seconds; the others are counted and the
    count is told with the next traceback, so a failure repeated by every request cannot flood the log."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self.logger, self.interval = logger, interval
        self.last = -interval
        self.suppressed = 0

    def error(self, message: str, exc: BaseException, always: bool = False) -> bool:
        """Log `message` with `exc`'s traceback unless one was logged in the last interval (or `always`); True
        when logged."""
        now = time.monotonic()
        if now - self.last < self.interval and not always:
            self.suppressed += 1
            return False
        note = f" ({self.suppressed} more in the last {self.interval:g} s without traceback)" if self.suppressed else ""
        self.logger.error(message + note, exc_info=(type(exc), exc, exc.__traceback__))
        self.last, self.suppressed = now, 0
        return True


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def allowed_hosts(bind: str, configured: list[str]) -> set[str] | None:
    """Host names requests may carry: `configured` when given, the loopback names when bound to loopback,
    else None (any: a public server is reached by whatever name its proxy or DNS gives it)."""
    if configured:
        return {h.lower() for h in configured}
    return set(LOOPBACK) if bind in LOOPBACK or bind.startswith("127.") else None


def host_name(value: str) -> str:
    """The name of a Host header, without its port (`[::1]:8000` -> `::1`)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Strikes:
    """Recent refusals per client address (the most recent `capacity` addresses), within `window` seconds."""

    def __init__(self, limit: int, window: float = 10.0, capacity: int = 4096) -> None:
        self.limit, self.window, self.capacity = limit, window, capacity
        self._times: OrderedDict[str, deque[float]] = OrderedDict()

    def count(self, address: str, now: float) -> int:
        times = self._times.get(address)
        while times and now - times[0] > self.window:
            times.popleft()
        return len(times) if times else 0

    def add(self, address: str, now: float) -> None:
        times = self._times.setdefault(address, deque(maxlen=max(self.limit * 2, 1)))
        self._times.move_to_end(address)
        times.append(now)
        while len(self._times) > self.capacity:
            self._times.popitem(last=False)

    def abusive(self, address: str) -> bool:
        return self.limit > 0 and self.count(address, time.monotonic()) >= self.limit


class _Refused(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}


class RequestGuard:
    """Host, key and body checks before the app runs; unexpected errors become a 500 with a throttled trace."""

    def __init__(self, app: Callable[..., Awaitable[None]], api_key: str | None, keyed: Callable[[str], bool],
                 max_body_bytes: int, read_timeout: float, hosts: set[str] | None, unexpected: ThrottledLog,
                 abuse_refusals: int = 0, abuse_delay: float = 1.0) -> None:
        self.app, self.api_key, self.keyed = app, api_key, keyed
        self.max_body_bytes, self.read_timeout, self.hosts = max_body_bytes, read_timeout, hosts
        self.unexpected = unexpected  # the app's: its throttle is no other app's
        self.strikes, self.abuse_delay = Strikes(abuse_refusals), abuse_delay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        address = (scope.get("client") or ("?", 0))[0]
        if self.strikes.abusive(address):
            await asyncio.sleep(self.abuse_delay)

        async def sending(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if 400 <= message["status"] < 500 and message["status"] not in (429, 499):  # not the client's fault
                    self.strikes.add(address, time.monotonic())
            await send(message)

        send_error = sending
        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            self._check_host(headers)
            self._check_key(scope["path"], headers)
            body = await self._read_body(headers, receive)
            if body is None:  # the client left while sending: nobody reads this, but the metrics count it
                await _send_error(send_error, 499, error_body("client closed the request", "invalid_request_error",
                                                              code="client_closed"))
                return
            await self.app(scope, _replay(body, receive), sending)
        except _Refused as refused:
            if not started:
                await _send_error(send_error, refused.status, error_body(refused.message, refused.kind, refused.param,
                                                                   refused.code), refused.headers)
        except Exception as exc:  # the last net: no traceback leaves the server, and few reach its log
            self.unexpected.error(f"unexpected error on {scope.get('method')} {scope.get('path')}", exc)
            if not started:
                await _send_error(send, 500, error_body("internal error; the server log has the details",
                                                        "server_error"))

    def _check_host(self, headers: dict[str, str]) -> None:
        if self.hosts is None or "host" not in headers:
            return
        name = host_name(headers["host"])
        if name not in self.hosts:
            raise _Refused(400, f"Host {headers['host'][:100]!r} is not a name of this server (it answers to "
                                f"{', '.join(sorted(self.hosts))}): refused against DNS rebinding; "
                                "add the name to serve.allowed_hosts if it is yours", param="Host",
                           code="invalid_host")

    def _check_key(self, path: str, headers: dict[str, str]) -> None:
        if self.api_key is None or not self.keyed(path):
            return
        given = headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), self.api_key.encode())):
            raise _Refused(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes | None:
        limit = self.max_body_bytes
        too_large = _Refused(413, f"the request body is over this server's limit of {limit} bytes "
                                  "(serve.max_body_bytes); send a shorter conversation", code="request_too_large")
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise _Refused(400, f"Content-Length {declared[:40]!r} is not a number", param="Content-Length")
            if int(declared) > limit:
                raise too_large

        async def collect() -> bytes | None:
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)

        try:
            return await asyncio.wait_for(collect(), self.read_timeout)
        except asyncio.TimeoutError:
            raise _Refused(408, f"the request body did not arrive within {self.read_timeout:g} s "
                                "(serve.read_timeout)", code="request_timeout") from None


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body in one message, then the client's own messages (so a disconnect is still seen)."""
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    """An error answer that also closes the connection (the rest of a refused body is never read)."""
    payload = json.dumps(body).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close"), *extra]})
    await send({"type": "http.response.body", "body": payload})
