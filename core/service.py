"""The facade the UI and the APIs call: validate -> provider -> record -> typed result."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from core import errors
from core.config import Settings
from core.providers import build_provider
from core.providers.base import Provider
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
    parse,
)

log = logging.getLogger("core.service")
RequestT = TypeVar("RequestT", bound=BaseModel)
MODELS_TTL = 60.0
PING_TTL = 15.0


def new_request_id() -> str:
    return "req_" + secrets.token_hex(8)


@dataclass
class Call:
    """One call through the service, as it will be logged (and later recorded)."""

    function: str
    request_id: str = field(default_factory=new_request_id)
    model: str | None = None
    started: float = field(default_factory=time.perf_counter)
    usage: Usage | None = None


class Service:
    """One instance per app; every method is safe to call concurrently."""

    def __init__(self, settings: Settings, provider: Provider | None = None) -> None:
        self.settings = settings
        self.provider = provider or build_provider(settings)
        self._secrets = [
            s.get_secret_value() for s in (settings.openai_api_key, settings.access_key) if s
        ]
        self._models: tuple[float, list[ModelInfo]] | None = None
        self._ping: tuple[float, bool] | None = None

    # ---- the functions -------------------------------------------------------------------

    async def chat_stream(
        self, request: ChatRequest | Mapping[str, Any]
    ) -> AsyncIterator[StreamChunk]:
        """Stream a chat reply; the last chunk carries the usage when the backend reports it."""
        call = Call("chat")
        async with self._track(call):
            req = self._prepare(ChatRequest, request, call)
            # aclosing: a consumer that leaves early stops the provider now, not at GC time.
            async with aclosing(self.provider.chat_stream(req)) as stream:
                async for chunk in stream:
                    call.usage = chunk.usage or call.usage
                    yield chunk

    async def completion_stream(
        self, request: CompletionRequest | Mapping[str, Any]
    ) -> AsyncIterator[StreamChunk]:
        """Stream a text completion of a prompt."""
        call = Call("completion")
        async with self._track(call):
            req = self._prepare(CompletionRequest, request, call)
            # aclosing: a consumer that leaves early stops the provider now, not at GC time.
            async with aclosing(self.provider.completion_stream(req)) as stream:
                async for chunk in stream:
                    call.usage = chunk.usage or call.usage
                    yield chunk

    async def generate_images(self, request: ImageRequest | Mapping[str, Any]) -> ImageResult:
        """Generate one or more images (PNG bytes)."""
        call = Call("image")
        async with self._track(call):
            req = self._prepare(ImageRequest, request, call)
            if not self.provider.supports_images:
                raise errors.Unsupported(
                    f"The {self.provider.name} backend has no image model. To generate images, "
                    "set OPENAI_API_KEY (and IMAGE_MODEL), or OPENAI_BASE_URL to a server "
                    "that serves /v1/images/generations."
                )
            return await self.provider.generate_images(req)

    async def embeddings(self, request: EmbeddingRequest | Mapping[str, Any]) -> EmbeddingResult:
        """Embed a list of texts, one vector per text."""
        call = Call("embedding")
        async with self._track(call):
            req = self._prepare(EmbeddingRequest, request, call)
            result = await self.provider.embeddings(req)
            call.usage = result.usage
            return result

    async def list_models(self, *, refresh: bool = False) -> list[ModelInfo]:
        """The backend's models, cached for a minute (refresh=True forces a new list)."""
        now = time.monotonic()
        if not refresh and self._models and now - self._models[0] < MODELS_TTL:
            return self._models[1]
        call = Call("models")
        async with self._track(call):
            models = await self.provider.list_models()
        self._models = (now, models)
        return models

    async def health(self) -> dict[str, Any]:
        """Secret-free status for /health: version, provider, and whether it answers."""
        now = time.monotonic()
        if self._ping is None or now - self._ping[0] > PING_TTL:
            self._ping = (now, await self.provider.ping())
        reachable = self._ping[1]
        return {
            "status": "ok" if reachable else "degraded",
            **self.settings.status(),
            "upstream": self.provider.describe(),
            "reachable": reachable,
        }

    def default_model(self, function: str) -> str:
        return self.provider.default_models[function]

    def describe(self) -> str:
        return self.provider.describe()

    async def aclose(self) -> None:
        await self.provider.aclose()

    # ---- the plumbing --------------------------------------------------------------------

    def _prepare(
        self, model: type[RequestT], request: RequestT | Mapping[str, Any], call: Call
    ) -> RequestT:
        req = request if isinstance(request, model) else parse(model, dict(request))  # type: ignore[arg-type]
        if getattr(req, "model", "x") is None:
            req = req.model_copy(update={"model": self.default_model(call.function)})
        call.model = getattr(req, "model", None)
        return req

    @asynccontextmanager
    async def _track(self, call: Call) -> AsyncIterator[Call]:
        """Log the outcome of a call, stamp errors with its request id, hide internal failures."""
        status = "ok"
        try:
            yield call
        except errors.ServiceError as exc:
            status = type(exc).__name__
            exc.request_id = call.request_id
            exc.message = self._scrub(exc.message)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        except Exception:
            status = "internal_error"
            log.exception("request_id=%s function=%s failed", call.request_id, call.function)
            raise errors.UpstreamError(
                "Something went wrong on our side.", request_id=call.request_id
            ) from None
        finally:
            usage = call.usage
            log.info(
                "request_id=%s function=%s provider=%s model=%s status=%s latency_ms=%.0f "
                "prompt_tokens=%s completion_tokens=%s",
                call.request_id,
                call.function,
                self.provider.name,
                call.model,
                status,
                (time.perf_counter() - call.started) * 1000,
                usage.prompt_tokens if usage else "-",
                usage.completion_tokens if usage else "-",
            )

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text
