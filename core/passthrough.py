"""Reading just enough of OpenAI-shaped bytes to account for them, without re-serialising."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson

from core.schemas import Usage

log = logging.getLogger("core.passthrough")

_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
# A blank line ends an SSE event; a line ends in CRLF, LF or a lone CR (the spec's three).
_LINE_END = rb"(?:\r\n|\n|\r(?!\n))"
_BLANK_LINE = re.compile(_LINE_END + _LINE_END)
END_MARKER = b"[DONE]"


async def sse_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """Regroup raw bytes into whole SSE events (each ending in a blank line).

    One list per read from the upstream: the events that completed in it, passed on together
    rather than one send each.
    """
    buffer, carriage = b"", False
    async for chunk in chunks:
        buffer += chunk
        # Most servers end lines in LF alone: a CR, once seen, switches to the general search.
        carriage = carriage or b"\r" in chunk
        end_of = _event_end_any if carriage else _event_end
        events = []
        while (end := end_of(buffer)) is not None:
            events.append(buffer[:end])
            buffer = buffer[end:]
        if events:
            yield events
    if buffer.strip():
        yield [buffer]


def _event_end(buffer: bytes) -> int | None:
    i = buffer.find(b"\n\n")
    return i + 2 if i >= 0 else None


def _event_end_any(buffer: bytes) -> int | None:
    found = _BLANK_LINE.search(buffer)
    return found.end() if found else None


def is_done(event: bytes) -> bool:
    """The stream's end marker, in any valid SSE framing ("data: [DONE]", "data:[DONE]",
    CRLF line ends, a comment line before it)."""
    return END_MARKER in event and event_data(event) == END_MARKER


def event_data(event: bytes) -> bytes | None:
    """The data of one SSE event (its `data:` lines joined), or None for comments and the like."""
    lines = [line for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[5:].strip() for line in lines)


def usage_of(data: dict | None) -> Usage | None:
    """Usage from a parsed "usage" object. Chat, completions and embeddings say prompt and
    completion tokens; images say input and output tokens."""
    if not data or not isinstance(data, dict):
        return None
    prompt = _count(data.get("prompt_tokens") or data.get("input_tokens") or 0)
    completion = _count(data.get("completion_tokens") or data.get("output_tokens") or 0)
    total = _count(data.get("total_tokens") or 0)
    if prompt is None or completion is None or total is None:
        # Not a count (negative, fractional, text, past any real call): the upstream's usage
        # says nothing, and the service counts the call itself rather than settle on it.
        log.warning("the upstream's usage is not a count of tokens: %.200r", data)
        return None
    total = total or prompt + completion
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)


MAX_COUNT = 10**9  # tokens of one call, far past any model's context and replies


def _count(value: object) -> int | None:
    """A token count as an upstream may write it (7, or 7.0), or None if it is none."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT:
        return value
    return None


_BRACES = re.compile(rb"[{}]")


def usage_in(raw: bytes) -> Usage | None:
    """The last "usage" object in a JSON body or SSE event, parsed on its own."""
    at = raw.rfind(b'"usage"')
    if at < 0:
        return None
    start = raw.find(b"{", at)
    if start < 0 or raw[at + 7 : start].strip(b" :\t\r\n"):
        return None  # "usage": null
    depth = 0
    for brace in _BRACES.finditer(raw, start):  # only the braces, not every byte
        depth += 1 if brace[0] == b"{" else -1
        if depth == 0:
            try:
                return usage_of(orjson.loads(raw[start : brace.end()]))
            except orjson.JSONDecodeError:
                return None
    return None


def is_usage_only(event: bytes) -> bool:
    """The final chunk that carries only usage (choices == [])."""
    return _EMPTY_CHOICES.search(event) is not None


def error_in(event: bytes) -> str | None:
    """The message of an error event inside a stream, if this is one."""
    payload = event.strip().removeprefix(b"data:").strip()  # "data:" with a space or not
    if not payload.startswith(b'{"error"'):
        return None
    try:
        error = orjson.loads(payload)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "unreadable error event"
    return str(error.get("message", "unknown error"))[:300] if isinstance(error, dict) else None


# A JSON string (escapes and all), or one of the characters that give a JSON text its shape.
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\],:]', re.S)
_SPACE = b" \t\r\n"


def with_fields(raw: bytes, body: dict[str, Any], changes: dict[str, Any]) -> bytes:
    """The JSON object `raw` (parsed: `body`) with the top-level `changes` made, and every
    other byte as it came: whitespace, escapes, numbers no parser would keep (2**70) and
    fields no one here reads. A key it lacks is added at the front; a key it has (even
    several times) gets the new value in each place."""
    if not changes:
        return raw
    start = raw.find(b"{") + 1
    added = [k for k in changes if k not in body]
    head = b",".join(orjson.dumps(k) + b":" + orjson.dumps(changes[k]) for k in added)
    replaced = [k for k in changes if k in body]
    if not replaced:  # the usual case (stream_options, a cap): no need to read the rest
        comma = b"," if added and body else b""
        return raw[:start] + head + comma + raw[start:]
    pieces, at = [raw[:start], head, b"," if added else b""], start
    for key, (value_start, value_end) in _top_level_values(raw, start):
        if key in changes:
            pieces += [raw[at:value_start], orjson.dumps(changes[key])]
            at = value_end
    pieces.append(raw[at:])
    return b"".join(pieces)


def _top_level_values(raw: bytes, start: int) -> Iterator[tuple[str, tuple[int, int]]]:
    """Each member of the object opened just before `start`: its key, and where its value
    starts and ends (the whitespace around it left out)."""
    depth, key, value_start = 1, None, 0
    for token in _JSON_TOKENS.finditer(raw, start):
        char = raw[token.start()]
        if char == 0x22:  # a string: a key when one is expected at the top level
            if depth == 1 and key is None:
                key = orjson.loads(token.group())
        elif char in (0x7B, 0x5B):  # { [
            depth += 1
        elif char == 0x3A:  # :
            if depth == 1:
                value_start = token.end()
        elif char == 0x2C or char in (0x7D, 0x5D):  # , } ]
            if depth == 1 and key is not None:
                end = token.start()
                while raw[value_start] in _SPACE:
                    value_start += 1
                while raw[end - 1] in _SPACE:
                    end -= 1
                yield key, (value_start, end)
                key = None
            if char != 0x2C:
                depth -= 1
                if depth == 0:
                    return
