"""Request bodies: capped in size (MAX_REQUEST_BYTES) before anything parses them, and read
with an idle timeout, so a slow or silent client cannot hold the server's memory or a task."""

from __future__ import annotations

import asyncio
import time

from edge.http import ASGIApp, Message, Receive, Scope, Send, header, read_body, refuse, replay

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# Uploads stream to Gradio's own parser; edge/files.py bounds them by the user's upload quota.
STREAMED_PATHS = {"/gradio_api/upload", "/gradio_api/upload/"}


class TooLarge(Exception):
    pass


class BodyLimit:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        idle_seconds: float = 30.0,
        total_seconds: float = 120.0,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle = idle_seconds
        self.total = total_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        if scope["path"] in STREAMED_PATHS:
            await self.app(scope, self._idle_limited(receive, disconnect=True), send)
            return
        length = header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._too_large(scope, send)
            return
        try:
            body, complete = await read_body(self._capped(self._idle_limited(receive)))
        except TooLarge:
            await self._too_large(scope, send)
            return
        except TimeoutError:
            await refuse(scope, send, 408, "The request body did not arrive in time.")
            return
        if complete:
            await self.app(scope, replay(body, receive), send)

    def _idle_limited(self, receive: Receive, *, disconnect: bool = False) -> Receive:
        """Each piece of the body must come within the idle time, and the whole body within
        the total time (else TimeoutError, or a disconnect for an app that reads the body
        itself); after the body, receive waits for a disconnect as long as the answer takes."""
        done = False
        deadline = time.monotonic() + self.total

        async def limited() -> Message:
            nonlocal done
            if done:
                return await receive()
            try:
                left = min(self.idle, deadline - time.monotonic())
                # A timer, not wait_for's task around each piece (every /v1 call reads one).
                async with asyncio.timeout(max(left, 0.001)):
                    message = await receive()
            except TimeoutError:
                if not disconnect:
                    raise
                done = True
                return {"type": "http.disconnect"}
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return limited

    def _capped(self, receive: Receive) -> Receive:
        seen = 0

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise TooLarge
            return message

        return capped

    async def _too_large(self, scope: Scope, send: Send) -> None:
        limit = f"{self.max_bytes / 1024 / 1024:.1f} MB"
        message = f"The request body is larger than this server's limit of {limit} "
        message += "(MAX_REQUEST_BYTES)."
        await refuse(scope, send, 413, message, code="request_too_large")
