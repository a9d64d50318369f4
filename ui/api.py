"""The named API endpoints (gr.api): typed, documented, stateless; for gradio_client scripts.

No `from __future__ import annotations` here: Gradio reads these hints at runtime to build
the API schema.
"""

from collections.abc import AsyncIterator
from typing import Any

import gradio as gr

from core.errors import ServiceError
from core.service import Service
from ui.common import LLM_GROUP, save_images, to_gr_error


def register(service: Service) -> None:
    """Add /chat, /completion, /generate_image, /embeddings and /models to the current Blocks."""

    async def chat(
        messages: list[dict[str, str]],
        model: str = "",
        temperature: float = 0.7,
        max_tokens: int = 0,
        stop: list[str] | None = None,
    ) -> AsyncIterator[str]:
        """Chat with a model; streams the reply.

        messages: OpenAI-style list, e.g. [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}]. model: empty for the server's default.
        temperature: 0 to 2. max_tokens: 0 lets the model decide. stop: up to 4 strings.
        Each streamed value is the reply so far; predict() returns the whole reply.
        """
        request = {
            "messages": messages,
            "model": model or None,
            "temperature": temperature,
            "max_tokens": max_tokens or None,
            "stop": stop or [],
        }
        reply = ""
        try:
            async for chunk in service.chat_stream(request):
                if chunk.text:
                    reply += chunk.text
                    yield reply
        except ServiceError as exc:
            raise to_gr_error(exc) from None
        if not reply:
            yield reply

    async def completion(
        prompt: str,
        model: str = "",
        temperature: float = 0.7,
        max_tokens: int = 0,
        stop: list[str] | None = None,
    ) -> AsyncIterator[str]:
        """Complete a prompt with a completions model; streams the text.

        Each streamed value is the completion so far; predict() returns all of it.
        """
        request = {
            "prompt": prompt,
            "model": model or None,
            "temperature": temperature,
            "max_tokens": max_tokens or None,
            "stop": stop or [],
        }
        text = ""
        try:
            async for chunk in service.completion_stream(request):
                if chunk.text:
                    text += chunk.text
                    yield text
        except ServiceError as exc:
            raise to_gr_error(exc) from None
        if not text:
            yield text

    async def generate_image(
        prompt: str,
        model: str = "",
        size: str = "auto",
        quality: str = "auto",
        n: int = 1,
    ) -> list[gr.FileData]:
        """Generate n (1 to 10) images; returns PNG files the client downloads.

        size: auto, 1024x1024, 1536x1024 or 1024x1536. quality: auto, low, medium or high.
        """
        request = {
            "prompt": prompt,
            "model": model or None,
            "size": size,
            "quality": quality,
            "n": n,
        }
        try:
            result = await service.generate_images(request)
        except ServiceError as exc:
            raise to_gr_error(exc) from None
        return [
            gr.FileData(path=p, mime_type="image/png").model_dump()
            for p in save_images(result.images)
        ]

    async def embeddings(texts: list[str], model: str = "", dimensions: int = 0) -> dict[str, Any]:
        """Embed up to 2,048 texts; returns model, dimensions, vectors (one per text), usage.

        dimensions: 0 for the model's own size (only some models can shorten vectors).
        """
        request = {"texts": texts, "model": model or None, "dimensions": dimensions or None}
        try:
            result = await service.embeddings(request)
        except ServiceError as exc:
            raise to_gr_error(exc) from None
        return result.model_dump()

    async def models() -> list[dict[str, Any]]:
        """The backend's models: id, owned_by, created (unix time), kind and kinds."""
        try:
            listed = await service.list_models()
        except ServiceError as exc:
            raise to_gr_error(exc) from None
        return [{**m.model_dump(), "kind": m.kind} for m in listed]

    for fn in (chat, completion, generate_image, embeddings):
        gr.api(fn, api_name=fn.__name__, concurrency_id=LLM_GROUP)
    gr.api(models, api_name="models")
