"""The provider registry: settings in, one backend out."""

from __future__ import annotations

from core.config import Settings
from core.providers.base import Provider


def build_provider(settings: Settings) -> Provider:
    """Pick the backend named by PROVIDER (auto: OpenAI-compatible if configured, else local)."""
    if settings.active_provider == "local":
        # Imported here so the OpenAI-only path never loads llama.cpp.
        from core.providers.local import LocalProvider

        return LocalProvider(settings)
    from core.providers.openai import OpenAIProvider

    return OpenAIProvider(settings)
