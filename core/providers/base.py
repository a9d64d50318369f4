"""The small protocol every backend implements, with capability flags."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

from pydantic import SecretStr

from core import errors
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
    # The endpoints (core.endpoints names) this backend serves; the service refuses the rest
    # by name before reserving anything.
    functions: frozenset[str]
    # The request fields, as OpenAI's clients send them, this backend honours, per endpoint;
    # the service refuses any other field by name. None: the body goes upstream byte for byte
    # (an OpenAI-compatible server reads every field itself).
    honours: Mapping[str, frozenset[str]] | None
    # Takes OpenAI-shaped request bytes as they are (the /v1 gateway then relays the
    # upstream's bytes back); False: the gateway builds answers from the typed calls below.
    supports_passthrough: bool
    default_models: dict[str, str]  # endpoint name (core.endpoints) -> model id, if served
    # What a person using this backend should know first, in Markdown (None: nothing): the
    # embedded demo model says what it is and how to point the app at a real one.
    notice: str | None

    def cap_param_for(self, model: str | None) -> str:
        """The parameter that caps a chat reply of `model` upstream: OpenAI's API wants
        max_completion_tokens (its reasoning models take nothing else, on any host);
        compatible servers know max_tokens."""
        ...

    def tokenizer(self, model: str | None) -> Callable[[str], int] | None:
        """How `model` counts a text's tokens, when this backend has its tokenizer at hand
        (the embedded model's own); None: core.tokens counts (OpenAI's, or UTF-8 bytes)."""
        ...

    def count_prompt(self, request: ChatRequest) -> int | None:
        """A chat's prompt as the model will read it, counted (the embedded model renders
        its chat template: a default system prompt, role markers); None: core.tokens'
        estimator counts it."""
        ...

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

    async def forward_json(self, path: str, payload: bytes, model: str | None) -> bytes:
        """POST an OpenAI-shaped body to `path`; the upstream's JSON answer, untouched."""
        ...

    def forward_stream(self, path: str, payload: bytes, model: str | None) -> AsyncIterator[bytes]:
        """POST a streaming request to `path`; the upstream's SSE bytes as they arrive."""
        ...

    async def aclose(self) -> None: ...


class TypedOnly:
    """What a backend that builds its own answers (Anthropic, Hugging Face) shares: no OpenAI
    bytes to pass through, and a key it cannot work without (named by its api_key_env)."""

    supports_passthrough = False  # the gateway builds OpenAI's answers from the typed calls
    notice = None
    name: str
    kind_label: str  # "Anthropic", "Hugging Face"
    base_url: str  # where it sends calls, without user or query (safe to show)
    key_hint = ""  # what the key is, when it needs saying
    api_key: SecretStr | None
    _key_env: str | None

    def cap_param_for(self, model: str | None) -> str:
        return "max_tokens"  # the typed calls name their own

    def tokenizer(self, model: str | None) -> Callable[[str], int] | None:
        return None

    def count_prompt(self, request: ChatRequest) -> int | None:
        return None

    def describe(self) -> str:
        return f"{self.kind_label} backend {self.name} at {self.base_url}"

    def _check_configured(self) -> None:
        if self.api_key is None:
            raise errors.NotConfigured(
                f"The {self.name} backend has no key: set {self._key_env or 'its api_key_env'}"
                f"{self.key_hint} in the environment."
            )

    async def forward_json(self, path: str, payload: bytes, model: str | None) -> bytes:
        raise errors.Unsupported(f"The {self.kind_label} backend takes typed calls only.")

    async def forward_stream(
        self, path: str, payload: bytes, model: str | None
    ) -> AsyncIterator[bytes]:
        raise errors.Unsupported(f"The {self.kind_label} backend takes typed calls only.")
        yield b""  # pragma: no cover (makes this an async generator)
