"""Reading just enough of OpenAI-shaped bytes to account for them, without re-serialising."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import orjson

from core.schemas import Usage

_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
DONE = b"data: [DONE]"


async def sse_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """Regroup raw bytes into whole SSE events (each ending in a blank line).

    One list per read from the upstream: the events that completed in it, passed on together
    rather than one send each.
    """
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        events = []
        while (end := _event_end(buffer)) is not None:
            events.append(buffer[:end])
            buffer = buffer[end:]
        if events:
            yield events
    if buffer.strip():
        yield [buffer]


def _event_end(buffer: bytes) -> int | None:
    for separator in (b"\n\n", b"\r\n\r\n"):
        i = buffer.find(separator)
        if i >= 0:
            return i + len(separator)
    return None


def event_data(event: bytes) -> bytes | None:
    """The data of one SSE event (its `data:` lines joined), or None for comments and the like."""
    lines = [line for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[5:].strip() for line in lines)


def usage_of(data: dict | None) -> Usage | None:
    """Usage from a parsed "usage" object. Chat, completions and embeddings say prompt and
    completion tokens; images say input and output tokens."""
    if not data:
        return None
    prompt = int(data.get("prompt_tokens") or data.get("input_tokens") or 0)
    completion = int(data.get("completion_tokens") or data.get("output_tokens") or 0)
    total = int(data.get("total_tokens") or prompt + completion)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)


def usage_in(raw: bytes) -> Usage | None:
    """The last "usage" object in a JSON body or SSE event, parsed on its own."""
    at = raw.rfind(b'"usage"')
    if at < 0:
        return None
    start = raw.find(b"{", at)
    if start < 0 or raw[at + 7 : start].strip(b" :\t\r\n"):
        return None  # "usage": null
    depth = 0
    for end in range(start, len(raw)):
        depth += {123: 1, 125: -1}.get(raw[end], 0)  # { and }
        if depth == 0:
            try:
                return usage_of(orjson.loads(raw[start : end + 1]))
            except orjson.JSONDecodeError:
                return None
    return None


def is_usage_only(event: bytes) -> bool:
    """The final chunk that carries only usage (choices == [])."""
    return _EMPTY_CHOICES.search(event) is not None


def error_in(event: bytes) -> str | None:
    """The message of an error event inside a stream, if this is one."""
    payload = event.strip().removeprefix(b"data:").strip()
    if not payload.startswith(b'{"error"'):
        return None
    try:
        error = orjson.loads(payload)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "unreadable error event"
    return str(error.get("message", "unknown error"))[:300] if isinstance(error, dict) else None
