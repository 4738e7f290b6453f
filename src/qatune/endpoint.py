"""A client for any OpenAI-compatible chat-completions service (a hosted API, vLLM, Ollama, `qatune serve`):
`chat_completions(endpoint, conversations, decoding)` sends them with at most `endpoint.concurrency` in
flight and returns each reply's text in order.

Each request has a timeout; a timeout, a refused connection, 429 or a 5xx is retried after `backoff_s`,
doubled each time, or after the server's Retry-After when it sends one, up to `retries` times. Any other
answer (401, 404, a 400 for this model) is an EndpointError at once, naming the URL, the status and the
server's own message: retrying would not change it. The API key is read from the environment variable
that `endpoint.api_key_env` names, never from a file. One `httpx.Client` serves all threads (it is
thread-safe and keeps connections alive).

Used by the data stages (`qatune.synth`: a teacher writes pairs, paraphrases, answers) and by anything
else that asks a model over HTTP.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qatune.config.base import DecodingConfig
from qatune.config.root import mask_url_password
from qatune.config.synth import EndpointConfig
from qatune.errors import QatuneError

if TYPE_CHECKING:
    import httpx

RETRIED_STATUS = {408, 409, 429, 500, 502, 503, 504}
Messages = list[dict[str, str]]


class EndpointError(QatuneError):
    """The endpoint refused a request, or kept failing after every retry."""


@dataclass
class EndpointStats:
    """What a batch of requests cost: for the data stages' reports."""

    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    timeouts: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # why requests were retried: "timeout", "status 503"...
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, reason: str | None) -> None:
        with self._lock:
            self.requests += 1
            if reason is not None:
                self.retries += 1
                self.timeouts += reason == "timeout"
                self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "retries": self.retries, "timeouts": self.timeouts,
                "retry_reasons": dict(self.reasons)}


def describe(endpoint: EndpointConfig) -> str:
    """`model @ url` (a password in the URL masked): how records and reports name the teacher."""
    return f"{endpoint.model} @ {mask_url_password(endpoint.url or '')}"


def chat_completions(endpoint: EndpointConfig, conversations: Sequence[Messages], decoding: DecodingConfig,
                     stats: EndpointStats | None = None, sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """The assistant's reply to each conversation, in order; `stats` (if given) counts requests and retries."""
    import httpx

    if not endpoint.url:
        raise EndpointError("no endpoint.url to send requests to", hint="give --endpoint URL (e.g. "
                            "http://localhost:8000/v1)")
    stats = stats if stats is not None else EndpointStats()
    url = endpoint.url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(endpoint.api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    options: dict[str, Any] = {"max_tokens": decoding.max_new_tokens, "temperature": decoding.temperature}
    if decoding.temperature > 0 and decoding.top_p < 1:
        options["top_p"] = decoding.top_p
    with httpx.Client(timeout=endpoint.timeout_s, headers=headers) as client, \
            ThreadPoolExecutor(max_workers=endpoint.concurrency) as pool:
        futures = [pool.submit(_complete, client, url, {"model": endpoint.model, "messages": list(messages),
                                                         **options}, endpoint, stats, sleep)
                   for messages in conversations]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()  # the first failure stops the batch; what finished is the caller's to keep
            raise


def _complete(client: "httpx.Client", url: str, body: dict[str, Any], endpoint: EndpointConfig,
              stats: EndpointStats, sleep: Callable[[float], None]) -> str:
    import httpx

    where = mask_url_password(url)
    attempt = 0
    while True:
        retry_after: float | None = None
        try:
            response = client.post(url, json=body)
        except httpx.TimeoutException:
            reason = "timeout"
        except httpx.TransportError as exc:  # refused, reset, DNS
            reason = f"connection error ({type(exc).__name__})"
        else:
            if response.status_code == 200:
                stats.count(None)
                return _reply_text(response, where)
            if response.status_code not in RETRIED_STATUS:
                stats.count(None)
                raise EndpointError(f"{where} answered {response.status_code}: {_server_message(response)}",
                                    hint=_hint(response.status_code, endpoint))
            reason = f"status {response.status_code}"
            retry_after = _retry_after(response)
        last = attempt == endpoint.retries
        stats.count(None if last else reason)
        if last:
            raise EndpointError(f"{where}: {reason} on all {endpoint.retries + 1} attempts",
                                hint="check the endpoint, or raise endpoint.retries / endpoint.timeout_s; run the "
                                     "same command again: finished prompts are kept and skipped")
        sleep(retry_after if retry_after is not None else endpoint.backoff_s * 2 ** attempt)
        attempt += 1


def _reply_text(response: "httpx.Response", where: str) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise EndpointError(f"{where} answered 200 without choices[0].message.content: {response.text[:200]!r}",
                            hint="the URL must be an OpenAI-compatible API base (ending in /v1)") from None
    return content or ""


def _server_message(response: "httpx.Response") -> str:
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
    except (ValueError, AttributeError):
        pass
    return response.text[:300] or response.reason_phrase


def _retry_after(response: "httpx.Response") -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None


def _hint(status: int, endpoint: EndpointConfig) -> str | None:
    if status in (401, 403):
        return f"set the API key in the environment variable {endpoint.api_key_env} (endpoint.api_key_env names it)"
    if status == 404:
        return (f"is endpoint.model {endpoint.model!r} served there (GET {endpoint.url}/models), and does the URL "
                "end in /v1?")
    return None
