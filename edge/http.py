"""Small ASGI helpers the edge middlewares share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Paths that answer with OpenAI's error shape; everything else gets FastAPI's {"detail": ...}.
BEARER_PREFIXES = ("/v1/", "/metrics")


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header (names are lower case in ASGI), or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


def is_bearer_api(path: str) -> bool:
    return path.startswith(BEARER_PREFIXES) or path == "/v1"


def error_body(path: str, status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape on the bearer APIs, FastAPI's elsewhere (Gradio's pages read it)."""
    if not is_bearer_api(path):
        return {"detail": message}
    kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_exceeded"}
    error_type = kind.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


async def send_json(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": orjson.dumps(body)})


async def refuse(
    scope: Scope,
    send: Send,
    status: int,
    message: str,
    *,
    code: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer a request the edge refuses, in the shape its client expects."""
    await send_json(send, status, error_body(scope["path"], status, message, code), headers)


async def read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole request body, and False if the client left before sending it."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app `body` first, then passes on (for disconnect events)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again
