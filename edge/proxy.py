"""The connection level: which peers may speak for a client (X-Forwarded-For/-Proto), and
a deadline for a request's headers, so silent or slow connections are not held forever."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edge.http import ASGIApp

log = logging.getLogger("edge.proxy")
HEADER_TIMEOUT = 10.0  # seconds from a connection (or a keep-alive request's first byte)


def trust_proxies(app: ASGIApp, proxies: tuple[str, ...]) -> ASGIApp | None:
    """`app` honouring forwarded headers from FORWARDED_ALLOW_IPS only, or None when no proxy
    is trusted (the default: without a proxy, anyone could pick their own address and dodge
    the login lockout). It goes in front of everything, so every guard sees the client's real
    address and scheme."""
    if not proxies:
        return None
    return ProxyHeadersMiddleware(app, trusted_hosts=list(proxies))


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, closing a connection whose request headers do not arrive
    within HEADER_TIMEOUT (uvicorn's keep-alive timeout covers idle keep-alive only)."""

    header_timeout = HEADER_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _expire(self) -> None:
        self._header_deadline = None
        log.info("closed a connection whose request headers did not arrive in time")
        self.transport.close()
