"""OpenAI and any OpenAI-compatible server, through the official SDK (AsyncOpenAI)."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import openai
import orjson

from core import errors
from core.config import Settings, public_url
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
# Keyless servers (Ollama, llama.cpp, vLLM) still need some api_key for the SDK.
PLACEHOLDER_KEY = "not-needed"


def map_status(
    status: int, body: object, *, retry_after: str | None = None, model: str | None = None
) -> errors.ServiceError:
    """Translate an upstream HTTP error into the service's error tree (never echoing keys)."""
    if status in (401, 403):
        # OpenAI's 401 message quotes part of the key: never pass it on.
        return errors.UpstreamAuthError()
    if status == 404:
        return errors.ModelNotFound(
            f"The upstream has no model {model!r}, or this key has no access to it. "
            "Pick one from the Models tab."
            if model
            else None
        )
    if status == 429:
        try:
            seconds = float(retry_after) if retry_after else None
        except ValueError:
            seconds = None
        return errors.RateLimited(retry_after=seconds)
    if status >= 500:
        return errors.UpstreamError(f"The upstream failed with status {status}.")
    return errors.UpstreamRejected(f"The upstream rejected the request: {_message(body)}")


def map_error(exc: Exception, *, model: str | None = None) -> errors.ServiceError:
    """Translate an SDK exception into the service's error tree."""
    if isinstance(exc, openai.APITimeoutError):
        return errors.UpstreamTimeout()
    if isinstance(exc, openai.APIConnectionError):
        return errors.UpstreamUnavailable()
    if isinstance(exc, openai.APIStatusError):
        retry_after = exc.response.headers.get("retry-after")
        return map_status(exc.status_code, exc.body, retry_after=retry_after, model=model)
    if isinstance(exc, openai.APIError):
        # An error event inside a stream arrives as a plain APIError.
        return errors.StreamInterrupted(f"The upstream reported an error: {_message(exc.body)}")
    return errors.UpstreamError()


def _message(body: object) -> str:
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"][:500]
    return "no details"


def _sdk_usage(raw: Any) -> Usage | None:
    """Usage from an SDK response's typed usage object."""
    return usage_of(raw.model_dump() if raw is not None else None)


class OpenAIProvider:
    """The OpenAI-compatible backend: one AsyncOpenAI client shared by every call.

    The /v1 gateway's calls skip the SDK and pass the bytes through (forward_*): they are
    already in OpenAI's shape, so parsing and re-serialising them would only add latency.
    They use aiohttp, which costs about a millisecond less per request than the SDK's client.
    """

    name = "openai"
    supports_images = True
    supports_embeddings = True
    supports_passthrough = True

    def __init__(self, settings: Settings) -> None:
        # Credentials in the URL never go further than this: every request sends them as a
        # header (aiohttp refuses a URL with them next to an Authorization header).
        url = settings.openai_base_url or OPENAI_URL
        self.base_url = public_url(url)
        self.configured = (
            settings.openai_api_key is not None or settings.openai_base_url is not None
        )
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        self.default_models = {
            "chat": settings.chat_model or DEFAULT_MODELS["chat"],
            "completion": settings.completion_model or DEFAULT_MODELS["completion"],
            "image": settings.image_model or DEFAULT_MODELS["image"],
            "embedding": settings.embedding_model or DEFAULT_MODELS["embedding"],
        }
        # api.openai.com wants max_completion_tokens; compatible servers know max_tokens.
        self._tokens_param = (
            "max_completion_tokens" if "api.openai.com" in self.base_url else "max_tokens"
        )
        basic = _basic_auth(url)
        self._headers = {
            "Authorization": basic or f"Bearer {key or PLACEHOLDER_KEY}",
            "Content-Type": "application/json",
            # Raw bytes are relayed as they are: they must not arrive compressed.
            "Accept-Encoding": "identity",
        }
        self._timeout = aiohttp.ClientTimeout(total=settings.request_timeout, connect=10.0)
        self._http: aiohttp.ClientSession | None = None  # made in the serving event loop
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self._sdk_options = {
            "api_key": key or PLACEHOLDER_KEY,
            "base_url": self.base_url,
            "timeout": settings.request_timeout,
            "max_retries": settings.upstream_max_retries,
            # The SDK's own Bearer header gives way to its default_headers.
            "default_headers": {"Authorization": basic} if basic else None,
        }
        self._sdk: tuple[asyncio.AbstractEventLoop, openai.AsyncOpenAI] | None = None

    @property
    def _client(self) -> openai.AsyncOpenAI:
        """The SDK client of the running event loop (its connections belong to one loop;
        scripts may call asyncio.run more than once)."""
        loop = asyncio.get_running_loop()
        if self._sdk is None or self._sdk[0] is not loop:
            self._sdk = (loop, openai.AsyncOpenAI(**self._sdk_options))
        return self._sdk[1]

    def describe(self) -> str:
        return f"OpenAI-compatible at {self.base_url}"

    def _check_configured(self) -> None:
        if not self.configured:
            raise errors.NotConfigured(
                "No upstream key found - set OPENAI_API_KEY (or OPENAI_BASE_URL for a keyless "
                "server such as Ollama), or PROVIDER=local for the embedded model."
            )

    async def _call(self, fn: Callable[..., Any], model: str | None, /, **kwargs: Any) -> Any:
        self._check_configured()
        try:
            return await fn(**kwargs)
        except openai.APIError as exc:
            log.info("upstream error %s upstream_request_id=%s", type(exc).__name__, _rid(exc))
            raise map_error(exc, model=model) from None

    async def _stream(
        self, path: str, body: dict[str, Any], model: str | None, text_of: Callable[[dict], Any]
    ) -> AsyncIterator[StreamChunk]:
        """Stream over the raw connection, reading each event with orjson: the SDK's typed
        chunk objects cost more CPU than the rest of the relay put together."""
        finished = False
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
                    reason = choices[0].get("finish_reason")
                    text = text_of(choices[0]) or ""
                    if text or reason or usage:
                        yield StreamChunk(text=text, finish_reason=reason, usage=usage)
        if not finished:
            raise errors.StreamInterrupted()

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [m.model_dump() for m in request.messages],
            "temperature": request.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.max_tokens:
            body[self._tokens_param] = request.max_tokens
        if request.stop:
            body["stop"] = request.stop
        async with aclosing(
            self._stream("chat/completions", body, request.model, _delta_text)
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    async def completion_stream(self, request: CompletionRequest) -> AsyncIterator[StreamChunk]:
        body: dict[str, Any] = {
            "model": request.model,
            "prompt": request.prompt,
            "temperature": request.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.max_tokens:
            body["max_tokens"] = request.max_tokens
        if request.stop:
            body["stop"] = request.stop
        async with aclosing(
            self._stream("completions", body, request.model, _choice_text)
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    async def generate_images(self, request: ImageRequest) -> ImageResult:
        model = request.model or self.default_models["image"]
        kwargs: dict[str, Any] = {"model": model, "prompt": request.prompt, "n": request.n}
        if request.size != "auto":
            kwargs["size"] = request.size
        if request.quality != "auto":
            kwargs["quality"] = request.quality
        if not model.startswith("gpt-image"):
            # gpt-image models always answer b64_json; other servers must be asked for it.
            kwargs["response_format"] = "b64_json"
        result = await self._call(self._client.images.generate, model, **kwargs)
        images, revised = [], []
        for item in result.data or []:
            if not item.b64_json:
                raise errors.UpstreamError(
                    "The upstream returned image URLs instead of image data."
                )
            images.append(base64.b64decode(item.b64_json))
            revised.append(item.revised_prompt)
        if not images:
            raise errors.UpstreamError("The upstream returned no images.")
        return ImageResult(
            model=model, images=images, revised_prompts=revised, usage=_sdk_usage(result.usage)
        )

    async def embeddings(self, request: EmbeddingRequest) -> EmbeddingResult:
        kwargs: dict[str, Any] = {
            "model": request.model,
            "input": request.texts,
            "encoding_format": "float",
        }
        if request.dimensions:
            kwargs["dimensions"] = request.dimensions
        result = await self._call(self._client.embeddings.create, request.model, **kwargs)
        vectors = [item.embedding for item in sorted(result.data, key=lambda d: d.index)]
        if len(vectors) != len(request.texts):
            raise errors.UpstreamError("The upstream returned the wrong number of vectors.")
        usage = _sdk_usage(result.usage) or Usage()
        return EmbeddingResult(
            model=result.model or request.model or "",
            dimensions=len(vectors[0]) if vectors else 0,
            vectors=vectors,
            usage=usage,
        )

    async def list_models(self) -> list[ModelInfo]:
        page = await self._call(self._client.models.list, None)
        models = [
            ModelInfo(
                id=m.id, owned_by=m.owned_by or "", created=m.created, kinds=guess_kinds(m.id)
            )
            async for m in page
        ]
        return sorted(models, key=lambda m: m.id)

    async def ping(self) -> bool:
        if not self.configured:
            return False
        try:
            await self._client.with_options(timeout=3, max_retries=0).models.list()
        except openai.APIError:
            return False
        return True

    async def aclose(self) -> None:
        if self._sdk is not None:
            await self._sdk[1].close()
        if self._http is not None:
            await self._http.close()

    # ---- passthrough for the /v1 gateway ---------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._http is None or self._http.closed or self._http_loop is not loop:
            # A session belongs to one event loop; scripts and tests may run several.
            connector = aiohttp.TCPConnector(limit=1000, ttl_dns_cache=300)
            self._http = aiohttp.ClientSession(
                headers=self._headers, timeout=self._timeout, connector=connector
            )
            self._http_loop = loop
        return self._http

    @asynccontextmanager
    async def _send(
        self, path: str, payload: bytes, model: str | None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        self._check_configured()
        url = f"{self.base_url}/{path}"
        try:
            async with self._session().post(url, data=payload) as response:
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
                    raise map_status(response.status, body, retry_after=retry_after, model=model)
                yield response
        except TimeoutError:
            raise errors.UpstreamTimeout() from None
        except aiohttp.ClientConnectorError:
            raise errors.UpstreamUnavailable() from None
        except aiohttp.ClientError:
            raise errors.StreamInterrupted() from None

    async def forward_json(self, path: str, payload: bytes, model: str | None) -> bytes:
        """POST an OpenAI-shaped JSON body; return the upstream's JSON bytes untouched."""
        async with self._send(path, payload, model) as response:
            return await response.read()

    async def forward_stream(
        self, path: str, payload: bytes, model: str | None
    ) -> AsyncIterator[bytes]:
        """POST a streaming request; yield the SSE bytes as they arrive."""
        async with self._send(path, payload, model) as response:
            async for chunk in response.content.iter_any():
                yield chunk


def _basic_auth(url: str) -> str | None:
    """The Basic Authorization value for a URL's user:password@, as httpx would send it."""
    parts = urlsplit(url)
    if parts.username is None:
        return None
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def _delta_text(choice: dict) -> str | None:
    return (choice.get("delta") or {}).get("content")


def _choice_text(choice: dict) -> str | None:
    return choice.get("text")


def _rid(exc: openai.APIError) -> str | None:
    return getattr(exc, "request_id", None)
