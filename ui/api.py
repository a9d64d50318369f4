"""The named API endpoints (gr.api): typed, documented, stateless; for gradio_client scripts.

No `from __future__ import annotations` here: Gradio reads these hints at runtime to build
the API schema.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import gradio as gr

from core import conversations as conversations_
from core import reports
from core.context import Core
from core.errors import Forbidden, ServiceError
from core.schemas import StreamChunk
from edge.files import FileRegistry
from ui.common import LLM_GROUP, save_images, signed_in, to_gr_error

# Each value sent to a client is a message Gradio processes and the client polls for: send
# the text so far at most this often (and always the first piece and the last).
STREAM_EVERY = 0.03


async def text_so_far(chunks: AsyncIterator[StreamChunk]) -> AsyncIterator[str]:
    """The reply so far, as it grows, at most every STREAM_EVERY seconds."""
    text, shown, last = "", -1, 0.0
    async with aclosing(chunks):
        async for chunk in chunks:
            if chunk.text:
                text += chunk.text
                now = time.monotonic()
                if now - last >= STREAM_EVERY:
                    yield text
                    shown, last = len(text), now
    if shown != len(text):
        yield text


# What a Gradio Chatbot adds to a message that OpenAI's API does not take.
GRADIO_ONLY = ("metadata", "options")


def _openai_message(message: Any) -> Any:
    """A message as OpenAI takes it: a Gradio chat-history dict loses its display fields."""
    if isinstance(message, dict):
        return {k: v for k, v in message.items() if k not in GRADIO_ONLY}
    return message


def register(core: Core, files: FileRegistry) -> None:
    """Add the named endpoints (/chat, /completion, ..., /usage, /users) to the current Blocks."""
    service = core.service

    def who(request: gr.Request) -> dict[str, Any]:
        return {"caller": signed_in(core, request), "source": "api"}

    async def chat(
        messages: list[dict[str, Any]],
        model: str = "",
        temperature: float = 0.7,
        max_tokens: int = 0,
        stop: list[str] | None = None,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> AsyncIterator[str]:
        """Chat with a model; streams the reply.

        messages: OpenAI-style list, e.g. [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}]; content may be a list of parts, as /v1 takes it,
        and Gradio's own chat-history dicts work too. model: empty for the server's default.
        temperature: 0 to 2. max_tokens: 0 lets the model decide. stop: up to 4 strings.
        Each streamed value is the reply so far; predict() returns the whole reply.
        """
        body = {
            "messages": [_openai_message(m) for m in messages or []],
            "model": model or None,
            "temperature": temperature,
            "max_tokens": max_tokens or None,
            "stop": stop or [],
        }
        try:
            async for text in text_so_far(service.chat_stream(body, **who(request))):
                yield text
        except ServiceError as exc:
            raise to_gr_error(exc) from None

    async def completion(
        prompt: str,
        model: str = "",
        temperature: float = 0.7,
        max_tokens: int = 0,
        stop: list[str] | None = None,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> AsyncIterator[str]:
        """Complete a prompt with a completions model; streams the text.

        Each streamed value is the completion so far; predict() returns all of it.
        """
        body = {
            "prompt": prompt,
            "model": model or None,
            "temperature": temperature,
            "max_tokens": max_tokens or None,
            "stop": stop or [],
        }
        try:
            async for text in text_so_far(service.completion_stream(body, **who(request))):
                yield text
        except ServiceError as exc:
            raise to_gr_error(exc) from None

    async def generate_image(
        prompt: str,
        model: str = "",
        size: str = "auto",
        quality: str = "auto",
        n: int = 1,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> list[gr.FileData]:
        """Generate n (1 to 10) images; returns PNG files the client downloads.

        size: auto, 1024x1024, 1536x1024 or 1024x1536. quality: auto, low, medium or high.
        """
        body = {
            "prompt": prompt,
            "model": model or None,
            "size": size,
            "quality": quality,
            "n": n,
        }
        try:
            result = await service.generate_images(body, **who(request))
        except ServiceError as exc:
            raise to_gr_error(exc) from None
        return [
            gr.FileData(path=p, mime_type="image/png").model_dump()
            for p in save_images(files, result.images, user=request.username)
        ]

    async def embeddings(
        texts: list[str],
        model: str = "",
        dimensions: int = 0,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Embed up to 2,048 texts; returns model, dimensions, vectors (one per text), usage.

        dimensions: 0 for the model's own size (only some models can shorten vectors).
        """
        body = {"texts": texts, "model": model or None, "dimensions": dimensions or None}
        try:
            result = await service.embeddings(body, **who(request))
        except ServiceError as exc:
            raise to_gr_error(exc) from None
        return result.model_dump()

    async def models(request: gr.Request = None) -> list[dict[str, Any]]:  # type: ignore[assignment]
        """The backend's models: id, owned_by, created (unix time), kind and kinds."""
        try:
            listed = await service.list_models(**who(request))
        except ServiceError as exc:
            raise to_gr_error(exc) from None
        return [{**m.model_dump(), "kind": m.kind} for m in listed]

    async def usage(
        start: str = "",
        end: str = "",
        user: str = "",
        model: str = "",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Usage aggregates: totals, daily (per day and model), by_user, by_function.

        start/end: YYYY-MM-DD (UTC, inclusive; empty for no bound). Admins see everyone and may
        filter by user; other users see only their own usage.
        """
        try:  # off the event loop: the ledger is read
            rows = await asyncio.to_thread(
                reports.usage_rows,
                core.ledger, who(request)["caller"], start=start, end=end, user=user, model=model,
            )  # fmt: skip
        except ServiceError as exc:
            raise to_gr_error(exc) from None
        return reports.usage_report(rows)

    async def users(request: gr.Request = None) -> list[dict[str, Any]]:  # type: ignore[assignment]
        """Admins only: the users, their role, status and limits (never keys)."""
        if not who(request)["caller"].is_admin:
            raise to_gr_error(Forbidden("Only admins may list users."))
        return [
            {
                "name": u.name,
                "role": u.role,
                "disabled": u.disabled,
                "daily_tokens": u.daily_tokens,
                "rpm": u.rpm,
                "created": u.created_at.isoformat(),
            }
            for u in await asyncio.to_thread(core.users.list)
        ]

    store = core.conversations

    def mine(request: gr.Request) -> str:
        return who(request)["caller"].name

    def conversations(
        search: str = "",
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> list[dict[str, Any]]:
        """Your saved chats, newest first: id, title, model, messages (count), updated_at.

        search: words in a title or message (empty for all).
        """
        return [c.model_dump(mode="json") for c in store.list(mine(request), search=search)]

    def conversation(
        id: str,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """One of your chats as JSON: title, model, settings, and OpenAI messages (the system
        prompt first), each reply with its token usage. The Chat tab's Import reads it back."""
        try:
            return conversations_.export_json(store.get(mine(request), id))
        except ServiceError as exc:
            raise to_gr_error(exc) from None

    def conversation_markdown(
        id: str,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> str:
        """One of your chats as Markdown, to read or paste elsewhere."""
        try:
            return conversations_.export_markdown(store.get(mine(request), id))
        except ServiceError as exc:
            raise to_gr_error(exc) from None

    def delete_conversation(
        id: str,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> str:
        """Delete one of your chats; returns its id."""
        try:
            store.delete(mine(request), id)
        except ServiceError as exc:
            raise to_gr_error(exc) from None
        return id

    for fn in (chat, completion, generate_image, embeddings):
        gr.api(fn, api_name=fn.__name__, concurrency_id=LLM_GROUP)
    for fn in (models, usage, users, conversations, conversation, conversation_markdown,
               delete_conversation):  # fmt: skip
        gr.api(fn, api_name=fn.__name__)
