"""uvicorn: its h11 protocol class, extended with a deadline for each request head.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but a connection whose
request headers never finish stays open for ever (slowloris). The subclass below relies on
uvicorn's `H11Protocol` internals (`connection_made`, `on_response_complete`, `connection_lost`,
`cycle`, `transport`, `loop`): tests/compat checks they are still there.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head (`head_timeout`, set per server)."""

    head_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        waiting_since = self.cycle  # a new request head replaces the cycle
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_overdue, waiting_since)

    def _disarm(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_overdue(self, waiting_since: Any) -> None:
        if self.cycle is waiting_since and not self.transport.is_closing():
            self.transport.close()
