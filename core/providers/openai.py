"""OpenAI and any OpenAI-compatible server, over one aiohttp client for every call.

One client means one behaviour on every path (chat, embeddings, images, models, the /v1
relay): the same URL and credentials, the same timeouts (REQUEST_TIMEOUT is a connect and
idle-read limit, never a limit on a whole answer), and the same retries, made only before the
first byte of an answer so a stream is never sent twice, and never once the upstream may have
the request (a new connection it closed without answering).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import logging
import random
import re
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import orjson

from core import errors
from core.backends import Backend, from_settings
from core.config import Settings, public_url
from core.endpoints import ENDPOINTS
from core.passthrough import event_data, sse_batches, usage_of
from core.schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResult,
    ImageRequest,
    ImageResult,
    ModelInfo,
    StreamChunk,
    Usage,
    guess_kinds,
)

log = logging.getLogger(__name__)

OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_MODELS = {
    "chat": "gpt-4.1-mini",
    "completion": "gpt-3.5-turbo-instruct",
    "image": "gpt-image-1",
    "embedding": "text-embedding-3-small",
}
# Keyless servers (Ollama, llama.cpp, vLLM) ignore the key; some clients insist on one.
PLACEHOLDER_KEY = "not-needed"
# What OpenAI's own SDK retries: timeouts of the request, conflicts, rate limits, 5xx.
RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}
MAX_RETRY_WAIT = 10.0


def map_status(
    status: int,
    body: object,
    *,
    retry_after: str | None = None,
    model: str | None = None,
    path: str = "",
) -> errors.ServiceError:
    """An upstream HTTP error as the service's error, keeping what clients act on: the
    upstream's message (scrubbed of keys later), type, code and param; and the status itself
    (a fallback is tried on 429 and 5xx)."""
    error = _mapped(status, body, retry_after=retry_after, model=model, path=path)
    error.upstream_status = status
    return error


def _mapped(
    status: int, body: object, *, retry_after: str | None, model: str | None, path: str
) -> errors.ServiceError:
    message, kind, code, param = _error_fields(body)
    # The upstream's own words, ended as a sentence (ours may follow).
    said = f": {message}" if message else "."
    if message and not message.rstrip().endswith((".", "!", "?")):
        said += "."
    # What a client acts on, as the upstream said it (a class default only where it said none).
    fields: dict[str, Any] = {"error_type": kind, "code": code, "param": param}
    if status == 401:
        # OpenAI's 401 message quotes part of the key, and its fields are about our key,
        # not the caller's: none of it is passed on.
        return errors.UpstreamAuthError()
    if status == 403:
        return errors.UpstreamForbidden(f"The upstream refused the request{said}", **fields)
    if status == 404:
        if code == "model_not_found" or (model and "model" in message.lower()):
            return errors.ModelNotFound(
                f"The upstream has no model {model!r}, or this key has no access to it"
                f"{said} Pick one from the Models tab."
                if model
                else None,
                **fields,
            )
        # No such route at all (llama.cpp's server has no images endpoint, for one).
        return errors.Unsupported(
            f"The upstream has no /{path} endpoint (it answered 404{said}): it cannot do this. "
            "Point OPENAI_BASE_URL at a server that can.",
            **fields,
        )
    if status == 429:
        try:
            seconds = float(retry_after) if retry_after else None
        except ValueError:
            seconds = None
        if "insufficient_quota" in (code, kind):
            text = f"The upstream account has no quota left{said}"
            # Said by its type only: the code says it too, or a client that retries on
            # rate_limit_exceeded (the default) would retry a hard quota error.
            fields["code"] = code or "insufficient_quota"
        else:
            text = f"The upstream is rate limiting requests{said} Wait a moment and try again."
        return errors.RateLimited(text, retry_after=seconds, **fields)
    if status >= 500:
        return errors.UpstreamError(f"The upstream failed with status {status}{said}", **fields)
    if status == 413:
        return errors.UpstreamTooLarge(f"The upstream found the request too large{said}", **fields)
    return errors.UpstreamRejected(
        f"The upstream rejected the request (status {status}){said}", **fields
    )


def _error_fields(body: object) -> tuple[str, str | None, str | None, str | None]:
    """(message, type, code, param) of an error body: OpenAI's shape, FastAPI's {"detail"}
    (a text, or a list of {"loc", "msg"}) or a bare {"message"}; a numeric code (llama.cpp,
    vLLM) as text; messages cut to 500 characters."""

    def text(value: object) -> str | None:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value if isinstance(value, str) and value else None

    def details(value: object) -> str | None:
        if not isinstance(value, list):
            return text(value)
        said = [
            f"{'.'.join(str(p) for p in d.get('loc') or [])}: {d.get('msg')}".lstrip(": ")
            for d in value
            if isinstance(d, dict) and isinstance(d.get("msg"), str)
        ]
        return "; ".join(said) or None

    if not isinstance(body, dict):
        return "", None, None, None
    inner = body.get("error", body)
    if isinstance(inner, str):  # {"error": "..."} (Ollama, some proxies)
        return inner[:500], None, None, None
    if not isinstance(inner, dict):
        return "", None, None, None
    message = text(inner.get("message")) or details(inner.get("detail")) or ""
    return message[:500], text(inner.get("type")), text(inner.get("code")), text(inner.get("param"))


def _message(body: object) -> str:
    return _error_fields(body)[0] or "no details"


class OpenAIProvider:
    """The OpenAI-compatible backend: one aiohttp session (per event loop) for every call.

    The /v1 gateway's calls pass the bytes through (forward_*): they are already in OpenAI's
    shape, so parsing and re-serialising them would only add latency. The typed calls read
    just the fields they need with orjson (the SDK's typed objects cost more CPU than the rest
    of the relay put together).
    """

    functions = frozenset(ENDPOINTS)
    honours = None  # every field goes upstream as the client sent it
    notice = None
    supports_passthrough = True

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        backend = backend or from_settings(settings)[0]
        spec = backend.spec
        self.name = spec.name
        self._key_env = spec.api_key_env
        self._shorthand = backend.shorthand
        # Credentials in the URL never go further than this: every request sends them as a
        # header (aiohttp refuses a URL with them next to an Authorization header).
        url = spec.base_url or OPENAI_URL
        self.base_url = public_url(url)
        self.api_key = backend.api_key  # kept secret: never shown, logged or returned
        self.configured = backend.api_key is not None or spec.base_url is not None
        key = backend.api_key.get_secret_value() if backend.api_key else None
        # The variables' backend has OpenAI's models as defaults; a file's backend has what
        # the file says (core.router picks them from its list).
        self.default_models = {**(DEFAULT_MODELS if backend.shorthand else {}), **spec.defaults}
        # api.openai.com wants max_completion_tokens; compatible servers know max_tokens (but
        # OpenAI's reasoning models refuse it wherever they are served: see cap_param_for).
        self.cap_param = (
            "max_completion_tokens" if "api.openai.com" in self.base_url else "max_tokens"
        )
        basic = _basic_auth(url)
        self._headers = {
            "Authorization": basic or f"Bearer {key or PLACEHOLDER_KEY}",
            "Content-Type": "application/json",
            # Raw bytes are relayed as they are: they must not arrive compressed.
            "Accept-Encoding": "identity",
        }
        # No limit on a whole answer: a healthy stream may take many minutes.
        wait = spec.timeout or settings.request_timeout
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=wait, sock_connect=min(wait, 10.0), sock_read=wait
        )
        retries = spec.max_retries
        self._retries = settings.upstream_max_retries if retries is None else retries
        self._http: aiohttp.ClientSession | None = None  # made in the serving event loop
        self._http_loop: asyncio.AbstractEventLoop | None = None

    def describe(self) -> str:
        return f"OpenAI-compatible at {self.base_url}"

    def cap_param_for(self, model: str | None) -> str:
        """The parameter that caps `model`'s reply: max_completion_tokens for OpenAI's
        reasoning models on any host (Azure OpenAI's refuse max_tokens too), else cap_param."""
        return cap_param_for(model, self.cap_param)

    def tokenizer(self, model: str | None) -> Callable[[str], int] | None:
        return None  # not at hand: core.tokens counts OpenAI's models with OpenAI's

    def count_prompt(self, request: ChatRequest) -> int | None:
        return None

    def _check_configured(self) -> None:
        if self.configured:
            return
        if not self._shorthand:
            raise errors.NotConfigured(
                f"The {self.name} backend has no key: set {self._key_env or 'its api_key_env'} "
                "in the environment, or give it a base_url (a keyless server)."
            )
        raise errors.NotConfigured(
            "No upstream key found - set OPENAI_API_KEY (or OPENAI_BASE_URL for a keyless "
            "server such as Ollama), or PROVIDER=local for the embedded model."
        )

    async def _stream(
        self, path: str, body: dict[str, Any], model: str | None, chat: bool
    ) -> AsyncIterator[StreamChunk]:
        """Stream over the raw connection, reading each event with orjson: the SDK's typed
        chunk objects cost more CPU than the rest of the relay put together. Every choice
        is read (n > 1), with its log probabilities; tool calls, which arrive in pieces, are
        passed on whole when their choice finishes."""
        finished = False
        calls: dict[int, dict[int, dict[str, Any]]] = {}  # choice -> call index -> the call
        upstream = self.forward_stream(path, orjson.dumps(body), model)
        async with aclosing(sse_batches(upstream)) as batches:
            async for events in batches:
                for event in events:
                    data = event_data(event)
                    if data is None:
                        continue
                    if data == b"[DONE]":
                        finished = True
                        continue
                    try:
                        chunk = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        raise errors.UpstreamError(
                            "The upstream sent an unreadable chunk."
                        ) from None
                    if "error" in chunk:
                        raise errors.StreamInterrupted(
                            f"The upstream reported an error: {_message(chunk)}"
                        )
                    usage = usage_of(chunk.get("usage"))
                    choices = chunk.get("choices") or []
                    if not choices:
                        if usage:
                            yield StreamChunk(usage=usage)
                        continue
                    for choice in choices:
                        piece = _piece(choice, chat, calls, usage)
                        if piece is not None:
                            yield piece
                            usage = None  # once per event
        if not finished:
            raise errors.StreamInterrupted()

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [m.model_dump(exclude_none=True) for m in request.messages],
            "temperature": request.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            **_sampling(request, CHAT_FIELDS),
        }
        if request.max_tokens:
            body[self.cap_param_for(request.model)] = request.max_tokens
        if request.stop:
            body["stop"] = request.stop
        async with aclosing(self._stream("chat/completions", body, request.model, True)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def completion_stream(self, request: CompletionRequest) -> AsyncIterator[StreamChunk]:
        body: dict[str, Any] = {
            "model": request.model,
            "prompt": request.prompt,
            "temperature": request.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            **_sampling(request, COMPLETION_FIELDS),
        }
        if request.max_tokens:
            body["max_tokens"] = request.max_tokens
        if request.stop:
            body["stop"] = request.stop
        async with aclosing(self._stream("completions", body, request.model, False)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def generate_images(self, request: ImageRequest) -> ImageResult:
        model = request.model or self.default_models["image"]
        body: dict[str, Any] = {"model": model, "prompt": request.prompt, "n": request.n}
        if request.size != "auto":
            body["size"] = request.size
        if request.quality != "auto":
            body["quality"] = request.quality
        if not model.startswith("gpt-image"):
            # gpt-image models always answer b64_json; other servers must be asked for it.
            body["response_format"] = "b64_json"
        answer = await self._json("images/generations", body, model)
        images, revised = [], []
        for item in _list(answer, "data"):
            if not isinstance(item, dict) or not isinstance(item.get("b64_json"), str):
                raise errors.UpstreamError(
                    "The upstream returned image URLs or no image data instead of b64_json."
                )
            images.append(base64.b64decode(item["b64_json"]))
            revised.append(item.get("revised_prompt"))
        if not images:
            raise errors.UpstreamError("The upstream returned no images.")
        return ImageResult(
            model=model, images=images, revised_prompts=revised, usage=usage_of(answer.get("usage"))
        )

    async def embeddings(self, request: EmbeddingRequest) -> EmbeddingResult:
        body: dict[str, Any] = {
            "model": request.model,
            "input": request.texts,
            "encoding_format": "float",
        }
        if request.dimensions:
            body["dimensions"] = request.dimensions
        answer = await self._json("embeddings", body, request.model)
        items = _list(answer, "data")
        try:
            ordered = sorted(items, key=lambda d: d.get("index", 0))
            vectors = [[float(x) for x in item["embedding"]] for item in ordered]
        except (AttributeError, KeyError, TypeError, ValueError):
            raise errors.UpstreamError(
                "The upstream's embeddings answer is malformed: each item of 'data' needs an "
                "'embedding' list of numbers."
            ) from None
        if len(vectors) != len(request.texts):
            raise errors.UpstreamError(
                f"The upstream returned {len(vectors)} vectors for {len(request.texts)} texts "
                "(a server that returns one vector per token needs a pooling setting)."
            )
        return EmbeddingResult(
            model=answer.get("model") or request.model or "",
            dimensions=len(vectors[0]) if vectors else 0,
            vectors=vectors,
            usage=usage_of(answer.get("usage")) or Usage(),
        )

    async def list_models(self) -> list[ModelInfo]:
        answer = await self._json("models", None, None, method="GET")
        models = [
            ModelInfo(
                id=m["id"],
                owned_by=str(m.get("owned_by") or ""),
                created=m.get("created") if isinstance(m.get("created"), int) else None,
                kinds=guess_kinds(m["id"]),
            )
            for m in _list(answer, "data")
            if isinstance(m, dict) and isinstance(m.get("id"), str)
        ]
        return sorted(models, key=lambda m: m.id)

    async def ping(self) -> bool:
        if not self.configured:
            return False
        try:
            async with self._session().get(
                f"{self.base_url}/models", timeout=aiohttp.ClientTimeout(total=3)
            ) as response:
                return response.status < 400
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()

    # ---- the one HTTP client ---------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._http is None or self._http.closed or self._http_loop is not loop:
            # A session belongs to one event loop; scripts and tests may run several.
            connector = _NotingConnector(limit=1000, ttl_dns_cache=300)
            self._http = aiohttp.ClientSession(
                headers=self._headers, timeout=self._timeout, connector=connector
            )
            self._http_loop = loop
        return self._http

    async def _open(self, method: str, url: str, payload: bytes | None) -> aiohttp.ClientResponse:
        """The upstream's answer, once its status and headers are in: retried up to
        UPSTREAM_MAX_RETRIES times on 408/409/429/5xx and on a connection that could not be
        made, and once when a reused keep-alive connection turns out closed. Never after a
        byte of the body has arrived (a stream is never sent twice), and never when a fresh
        connection is closed without an answer: the upstream may have done the work."""
        attempt = 0
        stale_retried = False
        while True:
            wait: float | None = 0.0
            connection = _Connection()
            _ATTEMPT.set(connection)
            try:
                response = await self._session().request(method, url, data=payload)
            except aiohttp.ClientConnectorError:
                if attempt >= self._retries:
                    raise
                wait = _backoff(attempt)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # A pooled connection the upstream closed as we reused it (its idle limit): the
                # request most likely never reached it, so it goes again at once, once, even
                # with UPSTREAM_MAX_RETRIES=0. A new connection closed on us is another matter:
                # the upstream had the whole request and may have processed (and billed) it.
                if not connection.reused or stale_retried:
                    log.warning(
                        "upstream closed a %s connection without answering %s %s",
                        "reused" if connection.reused else "new",
                        method,
                        url.removeprefix(self.base_url),
                    )
                    if stale_retried:  # sent twice: once on a kept-alive connection it closed
                        raise errors.UpstreamClosed(
                            "The upstream closed the connection without answering, twice: once "
                            "a kept-alive one (the request was sent again on a new one, as "
                            "such a close usually comes before the request is read), then the "
                            "new one. It may have processed the request; it was not sent a "
                            "third time."
                        ) from None
                    raise errors.UpstreamClosed() from None
                stale_retried = True
                continue
            else:
                if response.status not in RETRY_STATUSES or attempt >= self._retries:
                    return response
                wait = _retry_wait(response, attempt)
                if wait is None:
                    return response
                response.release()
            await asyncio.sleep(wait)
            attempt += 1

    @asynccontextmanager
    async def _send(
        self, path: str, payload: bytes | None, model: str | None, *, method: str = "POST"
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        self._check_configured()
        url = f"{self.base_url}/{path}"
        try:
            response = await self._open(method, url, payload)
            try:
                if response.status >= 400:
                    raw = await response.read()
                    log.info(
                        "upstream status %d upstream_request_id=%s",
                        response.status,
                        response.headers.get("x-request-id"),
                    )
                    try:
                        body = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        body = None
                    retry_after = response.headers.get("retry-after")
                    raise map_status(
                        response.status, body, retry_after=retry_after, model=model, path=path
                    )
                yield response
            finally:
                response.release()
        except TimeoutError:
            raise errors.UpstreamTimeout() from None
        except aiohttp.ClientConnectorError:
            raise errors.UpstreamUnavailable() from None
        except aiohttp.ClientError:
            raise errors.StreamInterrupted() from None

    async def _json(
        self, path: str, body: dict[str, Any] | None, model: str | None, *, method: str = "POST"
    ) -> dict[str, Any]:
        """A typed call's answer as a dict; a body that is not a JSON object is the upstream's
        fault, and the message says so."""
        payload = orjson.dumps(body) if body is not None else None
        async with self._send(path, payload, model, method=method) as response:
            raw = await response.read()
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise _not_the_api(response, path, "a JSON object")
        return answer

    # ---- the wire relay for the /v1 gateway ------------------------------------------------

    async def forward_json(self, path: str, payload: bytes, model: str | None) -> bytes:
        """POST an OpenAI-shaped JSON body; return the upstream's JSON bytes untouched."""
        async with self._send(path, payload, model) as response:
            content = await response.read()
        if content.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] != b"{":  # a BOM is still JSON
            raise _not_the_api(response, path, "a JSON object", empty=not content.strip())
        _check_answer(path, content)
        return content

    async def forward_stream(
        self, path: str, payload: bytes, model: str | None
    ) -> AsyncIterator[bytes]:
        """POST a streaming request; yield the SSE bytes as they arrive."""
        async with self._send(path, payload, model) as response:
            # Some servers label a good event stream text/plain: only what is surely not one.
            if response.content_type in ("application/json", "text/html"):
                raise _not_the_api(response, path, "an event stream")
            async for chunk in response.content.iter_any():
                yield chunk


class _Connection:
    """Whether a request went out on a pooled keep-alive connection (_NotingConnector)."""

    __slots__ = ("reused",)

    def __init__(self) -> None:
        self.reused = False


# The attempt under way in this task: aiohttp asks its connector in the request's own task.
_ATTEMPT: contextvars.ContextVar[_Connection | None] = contextvars.ContextVar(
    "upstream_attempt", default=None
)


class _NotingConnector(aiohttp.TCPConnector):
    """aiohttp's connector, noting on the attempt under way whether the connection it hands
    out served a request before (aiohttp's trace signals tell it too, for some 20 µs of CPU
    per request: the price of every signal of every request)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._served: weakref.WeakSet[Any] = weakref.WeakSet()

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:  # noqa: ASYNC109 (aiohttp's)
        connection = await super().connect(req, traces, timeout)
        attempt, protocol = _ATTEMPT.get(), connection.protocol
        if attempt is not None and protocol is not None:
            attempt.reused = protocol in self._served
            self._served.add(protocol)
        return connection


def _not_the_api(
    response: aiohttp.ClientResponse, path: str, wanted: str, *, empty: bool = False
) -> errors.UpstreamError:
    """A 200 whose body is not what the API sends: most often a base URL that points at a web
    page (a dashboard, a login portal) instead of the API, or a server that ignores stream."""
    kind = response.content_type or "no content type"
    got = "an empty body" if empty else kind
    return errors.UpstreamError(
        f"The upstream answered /{path} with {got}, not {wanted}: check that OPENAI_BASE_URL "
        "is the API's address (usually ending in /v1) and that the server supports this call."
    )


# The list every answer of an endpoint has (its results); a 200 without it is no answer.
ANSWER_LISTS = {"chat/completions": "choices", "completions": "choices"}
# Answers up to this size are parsed whole (a chat answer in microseconds); larger ones (a
# big batch of embeddings takes milliseconds to parse) are checked for their shape only.
PARSED_UP_TO = 1 << 20


def _check_answer(path: str, content: bytes) -> None:
    """Refuse a 200 whose JSON is cut short or lacks the endpoint's results list, as the
    upstream's fault, saying which."""
    key = ANSWER_LISTS.get(path, "data")
    body = content.strip(b"\xef\xbb\xbf \t\r\n")
    if len(body) <= PARSED_UP_TO:
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            whole = False
            reason = f"{exc}"
        else:
            whole, reason = True, ""
            if isinstance(answer, dict) and isinstance(answer.get(key), list):
                return
    else:
        answer, reason = None, ""
        whole = body.endswith(b"}")
        if whole and re.search(rb'"%s"\s*:\s*\[' % key.encode(), body):
            return
    if not whole:
        raise errors.UpstreamError(
            f"The upstream answered /{path} with a body that is not valid JSON ({len(content)} "
            f"bytes, cut short or garbled{': ' + reason if reason else ''})."
        )
    message = _error_fields(answer)[0]  # a server that sends its errors with a 200
    said = f" (it said: {message})" if message else ""
    raise errors.UpstreamError(
        f"The upstream answered /{path} without the {key!r} list every answer has{said}."
    )


def _retry_wait(response: aiohttp.ClientResponse, attempt: int) -> float | None:
    """Seconds to wait before trying again: the upstream's Retry-After when it gives one (None
    if that is longer than MAX_RETRY_WAIT: the client had better hear it), else a backoff."""
    header = response.headers.get("retry-after")
    try:
        asked = float(header) if header else None
    except ValueError:
        asked = None
    if asked is not None:
        return asked if asked <= MAX_RETRY_WAIT else None
    return _backoff(attempt)


def _backoff(attempt: int) -> float:
    return min(0.5 * 2**attempt, MAX_RETRY_WAIT) * (0.75 + random.random() / 2)


def _list(answer: dict[str, Any], key: str) -> list[Any]:
    items = answer.get(key)
    if not isinstance(items, list):
        raise errors.UpstreamError(f"The upstream's answer has no {key!r} list.")
    return items


# OpenAI's reasoning models (o1, o3-mini, o4-mini, gpt-5, gpt-5.1-codex...), also under a
# router's prefix (openai/o3): they take max_completion_tokens and refuse max_tokens.
REASONING_MODELS = re.compile(r"(?:.*/)?(?:o[1-9]|gpt-[5-9])(?:[-.:].*)?", re.IGNORECASE)


def cap_param_for(model: str | None, default: str = "max_tokens") -> str:
    """The parameter that caps a chat reply of `model`, decided by its name (a host other
    than api.openai.com, Azure's for one, serves reasoning models too): `default` unless
    `model` is one of OpenAI's reasoning models."""
    if model and REASONING_MODELS.fullmatch(model):
        return "max_completion_tokens"
    return default


def _basic_auth(url: str) -> str | None:
    """The Basic Authorization value for a URL's user:password@, as httpx would send it."""
    parts = urlsplit(url)
    if parts.username is None:
        return None
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


# The typed request's fields sent as they are when set (a call from the dashboard, or one
# that fell back here from another backend: nothing it asked for is dropped on the way).
SAMPLING_FIELDS = ("n", "top_p", "seed", "presence_penalty", "frequency_penalty")
CHAT_FIELDS = (*SAMPLING_FIELDS, "logprobs", "top_logprobs", "response_format", "tools",
               "tool_choice")  # fmt: skip
COMPLETION_FIELDS = (*SAMPLING_FIELDS, "best_of", "logprobs")


def _sampling(request: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(request, n) for n in names if getattr(request, n) is not None}


def _piece(
    choice: dict[str, Any],
    chat: bool,
    calls: dict[int, dict[int, dict[str, Any]]],
    usage: Usage | None,
) -> StreamChunk | None:
    """One choice of a streamed event as a chunk (None if it carries nothing yet)."""
    index = choice.get("index") or 0
    reason = choice.get("finish_reason")
    logprobs = choice.get("logprobs")
    if chat:
        delta = choice.get("delta") or {}
        text = delta.get("content") or ""
        logprobs = logprobs.get("content") if isinstance(logprobs, dict) else None
        for piece in delta.get("tool_calls") or []:
            if not isinstance(piece, dict):
                continue
            call = calls.setdefault(index, {}).setdefault(
                piece.get("index") or 0, {"id": "", "name": "", "arguments": []}
            )
            call["id"] = piece.get("id") or call["id"]
            function = piece.get("function") or {}
            call["name"] = function.get("name") or call["name"]
            call["arguments"].append(function.get("arguments") or "")
    else:
        text = choice.get("text") or ""
    whole = None
    if reason and calls.get(index):
        whole = [
            {"index": i, "id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": "".join(c["arguments"])}}
            for i, c in sorted(calls.pop(index).items())
        ]  # fmt: skip
    if not (text or reason or usage or whole or logprobs):
        return None
    return StreamChunk(
        text=text, finish_reason=reason, usage=usage, index=index, logprobs=logprobs,
        tool_calls=whole,
    )  # fmt: skip
