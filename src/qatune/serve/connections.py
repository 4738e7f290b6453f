"""uvicorn's connection limits from `serve`: how many at once, how long idle, how long half-sent.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but a connection whose
request headers never finish stays open for ever (slowloris), and with `limit_concurrency` a few
hundred of those would lock every client out. `BoundedH11Protocol` (qatune.compat.uvicorn) closes a
connection that has not sent a complete request head within `serve.read_timeout` of opening or of
its last answer; `RequestGuard` bounds the body the same way. In production put a reverse proxy in front as well
(deploy/nginx.conf).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qatune.compat.uvicorn import BoundedH11Protocol

if TYPE_CHECKING:
    from qatune.config import ServeConfig


def uvicorn_options(cfg: "ServeConfig") -> dict[str, Any]:
    """Keyword arguments of `uvicorn.run` / `uvicorn.Config` for `serve` (host and port aside)."""
    protocol = type("BoundedH11Protocol", (BoundedH11Protocol,), {"head_timeout": cfg.read_timeout})
    return {"http": protocol, "limit_concurrency": cfg.limit_concurrency,
            "timeout_keep_alive": cfg.timeout_keep_alive,
            "h11_max_incomplete_event_size": cfg.max_header_bytes, "log_level": "warning"}
