"""The provider registry: one module per kind of backend, built from its spec."""

from __future__ import annotations

from core.backends import Backend, from_settings, load_backends
from core.config import Settings
from core.providers.base import Provider


def build_provider(settings: Settings, backend: Backend | None = None) -> Provider:
    """The provider for one backend (default: the one the variables describe). Each kind's
    module is imported only when used: the OpenAI-only path never loads llama.cpp."""
    backend = backend or from_settings(settings)[0]
    if backend.kind == "local":
        from core.providers.local import LocalProvider

        return LocalProvider(settings, backend)
    if backend.kind == "anthropic":
        from core.providers.anthropic import AnthropicProvider

        return AnthropicProvider(settings, backend)
    if backend.kind == "huggingface":
        from core.providers.huggingface import HuggingFaceProvider

        return HuggingFaceProvider(settings, backend)
    from core.providers.openai import OpenAIProvider

    return OpenAIProvider(settings, backend)


def configured_backends(settings: Settings, *, warn: bool = True) -> list[Backend]:
    """BACKENDS_FILE's backends, or the one the variables describe."""
    if settings.backends_file is not None:
        return load_backends(settings.backends_file, warn=warn)
    return from_settings(settings)
