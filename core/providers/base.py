"""The small protocol every backend implements, with capability flags."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from core.schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResult,
    ImageRequest,
    ImageResult,
    ModelInfo,
    StreamChunk,
)


class Provider(Protocol):
    """A backend. Requests arrive validated, with `model` already filled in by the service."""

    name: str  # "openai" or "local"
    supports_images: bool
    supports_embeddings: bool
    default_models: dict[str, str]  # function ("chat", "completion", ...) -> model id

    def describe(self) -> str:
        """A short, secret-free description for the header line and /health."""
        ...

    def chat_stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]: ...

    def completion_stream(self, request: CompletionRequest) -> AsyncIterator[StreamChunk]: ...

    async def generate_images(self, request: ImageRequest) -> ImageResult: ...

    async def embeddings(self, request: EmbeddingRequest) -> EmbeddingResult: ...

    async def list_models(self) -> list[ModelInfo]: ...

    async def ping(self) -> bool:
        """True when the backend answers (used by /health; must be cheap)."""
        ...

    async def aclose(self) -> None: ...
