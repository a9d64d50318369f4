"""A small, real OpenAI-compatible HTTP server used as the upstream in tests."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import secrets
import socket
import struct
import threading
import time
import urllib.request
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DEFAULT_KEY = "sk-test-upstream-key-0123456789abcdef0123456789"
CREATED = 1_700_000_000
REAL_MODELS = ["gpt-4.1-mini", "gpt-4o", "gpt-3.5-turbo-instruct", "text-embedding-3-small"]
REAL_MODELS += ["text-embedding-3-large", "gpt-image-1", "dall-e-3", "whisper-1", "tts-1"]
REAL_MODELS += ["omni-moderation-latest"]
BAD_REQUEST = "invalid_request_error"
SERVER_ERROR = "The server had an error while processing your request."
# model id -> (status, message, type, param, code): these make every endpoint fail on purpose.
ERRORS: dict[str, tuple[int, str, str, str | None, str | None]] = {
    "error-400": (400, "Invalid value for 'temperature'", BAD_REQUEST, "temperature", None),
    "error-401": (401, "Incorrect API key provided", BAD_REQUEST, None, "invalid_api_key"),
    "error-403": (403, "You are not allowed to use this model.", "permission_error", None, None),
    "error-429": (429, "Rate limit reached for requests.", "requests", None, "rate_limit_exceeded"),
    "error-500": (500, SERVER_ERROR, "server_error", None, None),
    "error-503": (503, "The engine is currently overloaded.", "server_error", None, None),
}
MODE_MODELS = [*ERRORS, "slow-1.0", "cut-stream", "error-stream"]
# More failures in OpenAI's own words, not listed by /v1/models: each field must reach clients.
QUOTA = "You exceeded your current quota, please check your plan and billing details."
CONTEXT = "This model's maximum context length is 8192 tokens. Please reduce the length."
MORE_ERRORS: dict[str, tuple[int, str, str, str | None, str | None]] = {
    "error-429-quota": (429, QUOTA, "insufficient_quota", None, "insufficient_quota"),
    # Out of quota said by its type alone (code null), as some servers do.
    "error-429-quota-type": (429, QUOTA, "insufficient_quota", None, None),
    "error-400-context": (400, CONTEXT, BAD_REQUEST, "messages", "context_length_exceeded"),
    "error-500-code": (500, "Internal failure x.", "server_error", None, "internal_x"),
    "error-404-param": (404, "The model does not exist.", BAD_REQUEST, "model", "model_not_found"),
    "error-403-type": (403, "Your organization must be verified.", "org_verification", None,
                       "unverified_organization"),
}  # fmt: skip
# 200 answers that are not the API's (not listed): cut short, empty, without their results list.
MALFORMED = {
    "malformed-cut": b'{"id":"x","object":"chat.completion","choi',
    "malformed-empty": b"{}",
    "malformed-nolist": b'{"id":"x","object":"list","model":"m","usage":{"total_tokens":1}}',
}
# OpenAI's reasoning models: they refuse max_tokens (on OpenAI and on Azure alike).
REASONING = re.compile(r"(?:o[1-9]|gpt-5)(?:[-.].*)?")
NO_MAX_TOKENS = (
    "Unsupported parameter: 'max_tokens' is not supported with this model. "
    "Use 'max_completion_tokens' instead."
)


class _StreamCut(Exception):
    """Raised inside a stream so uvicorn drops the connection mid-body."""


class _QuietCut(logging.Filter):
    """Hides uvicorn's traceback for the deliberate stream cut, keeps every other error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]  # anyio task groups may wrap it
        return not isinstance(exc, _StreamCut)


logging.getLogger("uvicorn.error").addFilter(_QuietCut())


def _error(
    status: int, message: str, type_: str = BAD_REQUEST, param: Any = None, code: Any = None
) -> Response:
    """A response in OpenAI's error shape."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    headers = {"retry-after": "1"} if status == 429 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _words(text: str) -> list[str]:
    """Whitespace-separated pieces that join back to exactly `text` (a word plus its spacing)."""
    return re.findall(r"\s*\S+\s*", text)


def _text_of(content: Any) -> str:
    """Text of a chat message's content, a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = (p.get("text", "") for p in content if isinstance(p, dict))
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _shape_reply(text: str, body: dict) -> tuple[str, str]:
    """Applies `stop` and `max_tokens`; returns (reply, finish_reason)."""
    stops = body.get("stop") or []
    for stop in [stops] if isinstance(stops, str) else stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    words = _words(text)
    if isinstance(limit, int) and len(words) > limit:
        return "".join(words[:limit]).rstrip(), "length"
    return text, "stop"


def _usage(prompt: int, done: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def embed(text: str, dimensions: int = 8) -> list[float]:
    """Deterministic bag-of-words vector: shared words -> higher cosine similarity."""
    vec = [0.0] * dimensions
    for word in re.findall(r"\w+", text.lower()):
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        # A signed bucket keeps unrelated texts near zero similarity instead of all-positive.
        vec[int.from_bytes(digest[:4], "little") % dimensions] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vec))
    if norm == 0:
        vec[0], norm = 1.0, 1.0  # never hand out a zero vector: cosine would divide by zero
    return [v / norm for v in vec]


def tiny_png(seed: str, side: int = 8) -> bytes:
    """A valid side x side solid-colour RGB PNG, colour derived from `seed` (stdlib only)."""
    rgb = hashlib.md5(seed.encode()).digest()[:3]
    raw = (b"\x00" + rgb * side) * side  # filter byte 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(raw))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n"


async def _stream(
    model: str, first: Any, pieces: list[str], chunk: Callable, finish: str, usage: Any
) -> AsyncIterator[str]:
    """SSE body: optional first chunk, one chunk per word, finish chunk, usage, [DONE]."""
    if model == "comment-first":  # a comment before anything, and no usage at all
        yield ": keep-alive\n\n"
        usage = None
    if first is not None:
        yield _sse(first)
    if model == "cut-stream":
        pieces = pieces[:2]
    elif model == "error-stream":
        pieces = pieces[:1]
    drip = re.fullmatch(r"drip-(\d+(?:\.\d*)?)", model)
    for piece in pieces:
        yield _sse(chunk(piece, None))
        # Separate writes so clients really see several chunks; drip-X: X seconds apart.
        await asyncio.sleep(float(drip[1]) if drip else 0.01)
    if model == "cut-stream":
        raise _StreamCut  # no finish_reason, no [DONE]: uvicorn just drops the connection
    if model == "error-stream":
        yield _sse({"error": {"message": SERVER_ERROR, "type": "server_error"}})
        return
    yield _sse(chunk("", finish))
    if usage is not None:
        yield _sse({**chunk("", None), "choices": [], "usage": usage})
    yield _sse("[DONE]")
    if model == "done-then-hold":  # keeps the response open after [DONE] (some servers do)
        yield ": still here\n\n"
        await asyncio.sleep(20)


def _streaming(body: dict, *args: Any) -> StreamingResponse:
    usage = args[-1] if (body.get("stream_options") or {}).get("include_usage") else None
    gen = _stream(body["model"], *args[:-1], usage)
    return StreamingResponse(gen, media_type="text/event-stream")


async def _model_gate(body: dict, known: list[str]) -> Response | None:
    """Applies the failure/slow modes chosen by `model`; None means carry on normally."""
    model = body.get("model")
    if not isinstance(model, str):
        return _error(400, "you must provide a model parameter", param="model")
    if model in ERRORS:
        return _error(*ERRORS[model])
    if model in MORE_ERRORS:
        return _error(*MORE_ERRORS[model])
    if model in MALFORMED:
        return Response(MALFORMED[model], media_type="application/json")
    if REASONING.fullmatch(model) and model in known and body.get("max_tokens") is not None:
        return _error(400, NO_MAX_TOKENS, param="max_tokens", code="unsupported_parameter")
    if model == "html-page":
        # A base URL that points at a web page (a dashboard, a login portal), not an API.
        page = "<!DOCTYPE html><html><body>Welcome to the portal</body></html>"
        return Response(page, media_type="text/html")
    if model == "error-echo":
        # Like servers that quote the input they refuse (not listed by /v1/models).
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        quoted = _text_of(messages[-1].get("content")) if messages else ""
        return _error(400, f"Could not process the message {quoted!r}")
    if slow := re.fullmatch(r"(?:gpt-image-)?slow-(\d+(?:\.\d*)?)", model):
        await asyncio.sleep(float(slow[1]))  # async sleep so concurrent requests really overlap
    elif model == "no-usage":
        pass  # answers chat without a usage object (some servers never send one)
    elif model == "embed-per-token":
        pass  # answers embeddings with one vector per word (see embeddings)
    elif model in ("done-then-hold", "comment-first"):
        pass  # a comment first, or held open after [DONE] (see _stream)
    elif re.fullmatch(r"drip-(\d+(?:\.\d*)?)", model):
        pass  # streams its words slowly (see _stream)
    elif model in BAD_USAGE:
        pass  # answers with usage that is no count (see chat_completions)
    elif model not in known + MODE_MODELS:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return _error(404, message, code="model_not_found")
    return None


def _endpoint(handler: Callable[[dict], Response]) -> Callable[[Request], Awaitable[Response]]:
    """Wraps a handler of the parsed JSON body with parsing and the model modes."""

    async def endpoint(request: Request) -> Response:
        body = _json(await request.body())
        if not isinstance(body, dict):
            return _error(400, "We could not parse the JSON body of your request.")
        return await _model_gate(body, request.app.state.models) or handler(body)

    return endpoint


async def list_models(request: Request) -> Response:
    known = request.app.state.models
    owner = {m: "openai" for m in REAL_MODELS}
    data = [
        dict(id=m, object="model", created=CREATED, owned_by=owner.get(m, "fake-upstream"))
        for m in known + MODE_MODELS
    ]
    return JSONResponse({"object": "list", "data": data})


# Usage no count can be taken from: a negative count, one past any integer column, text.
BAD_USAGE = {
    "usage-negative": {"prompt_tokens": 3, "completion_tokens": -2, "total_tokens": 1},
    "usage-huge": {"prompt_tokens": 10**23, "completion_tokens": 1, "total_tokens": 10**23 + 1},
    "usage-text": {"prompt_tokens": "12abc", "completion_tokens": [1], "total_tokens": None},
}


@_endpoint
def chat_completions(body: dict) -> Response:
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    users = [_text_of(m.get("content")) for m in messages if m.get("role") == "user"]
    reply, finish = _shape_reply("Echo: " + (users[-1] if users else ""), body)
    pieces = _words(reply)
    usage = _usage(sum(len(_text_of(m.get("content")).split()) for m in messages), len(pieces))
    usage = BAD_USAGE.get(body["model"], usage)
    base = dict(
        id="chatcmpl-" + secrets.token_hex(12), created=int(time.time()), model=body["model"]
    )
    if not body.get("stream"):
        message = {"role": "assistant", "content": reply, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return JSONResponse(
            {**base, "object": "chat.completion", "choices": [choice]}
            | ({} if body["model"] == "no-usage" else {"usage": usage})
        )

    def chunk(text: str, reason: str | None, delta: dict | None = None) -> dict:
        delta = delta if delta is not None else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {**base, "object": "chat.completion.chunk", "choices": [choice]}

    first = chunk("", None, {"role": "assistant", "content": ""})
    return _streaming(body, first, pieces, chunk, finish, usage)


@_endpoint
def completions(body: dict) -> Response:
    prompt = body.get("prompt") or ""
    prompt = " ".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)
    reply, finish = _shape_reply(" completion of: " + prompt, body)
    pieces = _words(reply)
    usage = _usage(len(prompt.split()), len(pieces))
    base = dict(id="cmpl-" + secrets.token_hex(12), created=int(time.time()), model=body["model"])

    def chunk(text: str, reason: str | None) -> dict:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}
        return {**base, "object": "text_completion", "choices": [choice]}

    if not body.get("stream"):
        return JSONResponse({**chunk(reply, finish), "usage": usage})
    return _streaming(body, None, pieces, chunk, finish, usage)


@_endpoint
def embeddings(body: dict) -> Response:
    raw = body.get("input", "")
    texts = [str(t) for t in raw] if isinstance(raw, list) else [str(raw)]
    dims = body.get("dimensions") or 8
    as_b64 = body.get("encoding_format") == "base64"
    data = []
    for i, text in enumerate(texts):
        vec: Any = embed(text, dims)
        if body["model"] == "embed-per-token":  # like llama.cpp's server without pooling
            vec = [embed(word, dims) for word in text.split()]
        elif as_b64:
            vec = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vec})
    words = sum(len(t.split()) for t in texts)
    usage = {"prompt_tokens": words, "total_tokens": words}
    return JSONResponse({"object": "list", "data": data, "model": body["model"], "usage": usage})


@_endpoint
def images(body: dict) -> Response:
    prompt = str(body.get("prompt") or "")
    n = int(body.get("n") or 1)  # JSON's 2.0 is 2, as OpenAI reads it
    data = [{"b64_json": base64.b64encode(tiny_png(f"{prompt}#{i}")).decode()} for i in range(n)]
    out: dict[str, Any] = {"created": int(time.time()), "data": data}
    if not str(body.get("model") or "").startswith("gpt-image"):
        return JSONResponse(out)  # like dall-e-3: no token counts
    # gpt-image answers name the size and quality it used (never "auto").
    size, quality = body.get("size"), body.get("quality")
    out["size"] = size if size in ("1024x1024", "1024x1536", "1536x1024") else "1024x1024"
    out["quality"] = quality if quality in ("low", "medium", "high") else "high"
    words = len(prompt.split())
    usage = {
        "input_tokens": words,
        "output_tokens": 16 * n,
        "total_tokens": words + 16 * n,
        "input_tokens_details": {"text_tokens": words, "image_tokens": 0},
    }
    return JSONResponse({**out, "output_format": "png", "usage": usage})


class _Observe:
    """ASGI middleware: records requests, checks the key, counts in-flight, adds x-request-id."""

    def __init__(self, app: Any, upstream: FakeUpstream) -> None:
        self.app, self.up = app, upstream

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        # Read the body here so it can be recorded, then replay it to the app.
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False) and message["type"] == "http.request"
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for http.disconnect as usual
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        rid = "req_up_" + secrets.token_hex(12)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        record = {"path": scope["path"], "method": scope["method"], "headers": headers}
        # "completed": the whole response body was sent; "ended": the app has returned. Ended but
        # not completed means the response was cut short (the client left, or cut-stream).
        entry = {**record, "json": _json(body), "completed": False, "ended": False}
        self.up.requests.append(entry)

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("x-request-id", rid)
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                entry["completed"] = True

        authorised = headers.get("authorization") == self.up.authorization
        app = self.app
        if scope["path"].startswith("/v1") and not authorised:
            app = _error(*ERRORS["error-401"])
        # Counted until the app returns, which for a StreamingResponse is after the last chunk.
        self.up._in_flight += 1
        self.up.max_in_flight = max(self.up.max_in_flight, self.up._in_flight)
        try:
            await app(scope, replay, send_with_id)
        finally:
            self.up._in_flight -= 1
            entry["ended"] = True


class FakeUpstream:
    """An OpenAI-compatible server on 127.0.0.1, run by uvicorn in a daemon thread."""

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_KEY,
        basic: tuple[str, str] | None = None,
        models: list[str] | None = None,
    ) -> None:
        """`models`: the ids it lists and serves (OpenAI's, by default), besides the modes."""
        self.api_key = api_key
        # The one Authorization value /v1 accepts: Bearer api_key, or Basic user:password.
        if basic is None:
            self.authorization = f"Bearer {api_key}"
        else:
            pair = base64.b64encode(":".join(basic).encode()).decode()
            self.authorization = f"Basic {pair}"
        self.url = ""
        self.requests: list[dict] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        routes = [
            Route("/health", lambda request: JSONResponse({"ok": True})),
            Route("/v1/models", list_models),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/images/generations", images, methods=["POST"]),
        ]
        inner = Starlette(routes=routes)
        inner.state.models = list(models or REAL_MODELS)
        self.app = _Observe(inner, self)

    def start(self) -> FakeUpstream:
        """Serves on a free port and returns once /health answers."""
        # Hand uvicorn the already-bound socket: no window for another process to take the port.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fake-upstream", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.01)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            assert resp.status == 200
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    def stop(self) -> None:
        """Stops the server and waits for its thread."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            self._server.force_exit = True  # a client kept a stream open: don't hang the tests
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def wait_idle(self, timeout: float = 15.0) -> None:
        """Waits until no request is in flight (a slow call another test left behind)."""
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.05)

    def reset(self) -> None:
        """Forgets recorded requests and the in-flight high-water mark."""
        self.requests.clear()
        self.max_in_flight = 0

    def __enter__(self) -> FakeUpstream:
        return self if self._server else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DroppingUpstream:
    """A raw HTTP/1.1 upstream on 127.0.0.1 (an asyncio server in a daemon thread) that reads
    each request whole, then either answers it (keeping the connection alive) or closes the
    connection without a byte of answer, as `drops(connection, request)` says (both counted
    from 1): a server that crashed on the request, or one at its keep-alive limit."""

    def __init__(self, drops: Callable[[int, int], bool]) -> None:
        self.drops = drops
        self.api_key = DEFAULT_KEY  # not checked: only for the settings that point here
        self.connections = 0
        self.requests: list[dict] = []  # path, json, connection, dropped
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection, served = self.connections, 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the client closed its idle connection
                lines = head.decode("latin-1").split("\r\n")
                fields = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
                body = await reader.readexactly(int(fields.get("content-length", 0)))
                served += 1
                dropped = self.drops(connection, served)
                path = lines[0].split(" ")[1]
                record = {"path": path, "json": _json(body), "connection": connection}
                self.requests.append({**record, "dropped": dropped})
                if dropped:
                    return
                writer.write(self._answer(path, _json(body) or {}))
                await writer.drain()
        finally:
            writer.close()

    @staticmethod
    def _answer(path: str, body: dict) -> bytes:
        usage = _usage(1, 2)
        if path.endswith("/embeddings"):
            item = {"object": "embedding", "index": 0, "embedding": [0.5, 0.5]}
            answer = {"object": "list", "model": "m", "data": [item], "usage": usage}
            content, kind = json.dumps(answer).encode(), "application/json"
        elif body.get("stream"):
            base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m"}
            delta = {"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}
            end = {"index": 0, "delta": {}, "finish_reason": "stop"}
            events = [{**base, "choices": [delta]}, {**base, "choices": [end]}]
            events.append({**base, "choices": [], "usage": usage})
            content = "".join(map(_sse, [*events, "[DONE]"])).encode()
            kind = "text/event-stream"
        else:
            message = {"role": "assistant", "content": "Hi"}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            answer = {"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
                      "choices": [choice], "usage": usage}  # fmt: skip
            content, kind = json.dumps(answer).encode(), "application/json"
        head = f"HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {len(content)}\r\n\r\n"
        return head.encode() + content

    def start(self) -> DroppingUpstream:
        started = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0)
            )
            self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
            started.set()
            self._loop.run_forever()
            server.close()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="dropping-upstream", daemon=True)
        self._thread.start()
        started.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> DroppingUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
