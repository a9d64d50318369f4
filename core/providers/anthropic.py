"""Anthropic's Messages API, through the official `anthropic` SDK, in OpenAI's shapes.

A chat request (OpenAI's fields) becomes a Messages request: system and developer messages
become `system`, images become image blocks, assistant tool calls become `tool_use` blocks
and tool messages `tool_result` blocks; tools and tool_choice are translated too. The
streamed events come back as the service's chunks: text, whole tool calls (their
`input_json_delta` pieces put together), the finish reason and the usage. What has no
equivalent (n > 1, logprobs, seed, response_format...) is refused by name (HONOURS).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import anthropic

from core import errors
from core.backends import DEFAULT_URLS, Backend
from core.config import Settings, public_url
from core.providers.base import TypedOnly
from core.providers.openai import map_status
from core.schemas import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResult,
    ImageRequest,
    ImageResult,
    ModelInfo,
    StreamChunk,
    Usage,
)

log = logging.getLogger(__name__)

# The Messages API needs a reply cap; this one when the caller names none.
DEFAULT_MAX_TOKENS = 4096
HONOURS = {
    "chat": frozenset({
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "stop", "stream", "stream_options", "tools", "tool_choice", "n",
    }),
}  # fmt: skip
FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}
DATA_URL = re.compile(r"^data:(image/(?:png|jpeg|gif|webp));base64,(.+)$", re.DOTALL)


class AnthropicProvider(TypedOnly):
    """Claude models; chat only (embeddings and images are refused by name)."""

    functions = frozenset({"chat"})
    honours = HONOURS
    kind_label = "Anthropic"

    def __init__(self, settings: Settings, backend: Backend) -> None:
        spec = backend.spec
        self.name = spec.name
        self.base_url = public_url(spec.base_url or DEFAULT_URLS["anthropic"])
        self.api_key = backend.api_key
        self._key_env = spec.api_key_env
        self.default_models = dict(spec.defaults)
        retries = spec.max_retries
        self._client = anthropic.AsyncAnthropic(
            api_key=backend.api_key.get_secret_value() if backend.api_key else "missing",
            base_url=spec.base_url or DEFAULT_URLS["anthropic"],
            timeout=spec.timeout or settings.request_timeout,
            max_retries=settings.upstream_max_retries if retries is None else retries,
        )

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        params = to_messages_request(request)
        self._check_configured()
        reader = ReplyReader()
        sent = False
        try:
            stream = await self._client.messages.create(**params, stream=True)
            async with stream:
                async for event in stream:
                    for chunk in reader.read(event.model_dump()):
                        sent = True
                        yield chunk
        except anthropic.APIStatusError as exc:
            error = _status_error(exc, request.model)
            if sent:  # the reply was under way: it was cut, whatever the cause
                raise errors.StreamInterrupted(
                    f"Anthropic reported an error: {error.message}"
                ) from None
            raise error from None
        except anthropic.APITimeoutError:
            raise errors.UpstreamTimeout() from None
        except anthropic.APIConnectionError:
            raise errors.UpstreamUnavailable() from None
        if not reader.stopped:
            raise errors.StreamInterrupted()

    async def completion_stream(self, request: CompletionRequest) -> AsyncIterator[StreamChunk]:
        raise errors.Unsupported(f"The {self.name} backend (Anthropic) has no /completions.")
        yield StreamChunk()  # pragma: no cover (makes this an async generator)

    async def generate_images(self, request: ImageRequest) -> ImageResult:
        raise errors.Unsupported(f"The {self.name} backend (Anthropic) has no image model.")

    async def embeddings(self, request: EmbeddingRequest) -> EmbeddingResult:
        raise errors.Unsupported(f"The {self.name} backend (Anthropic) has no embeddings.")

    async def list_models(self) -> list[ModelInfo]:
        self._check_configured()
        try:
            page = await self._client.models.list(limit=1000)
        except anthropic.APIStatusError as exc:
            raise _status_error(exc, None) from None
        except anthropic.APIConnectionError:
            raise errors.UpstreamUnavailable() from None
        return [
            ModelInfo(
                id=m.id,
                owned_by="anthropic",
                created=int(m.created_at.timestamp()) if m.created_at else None,
                kinds=["chat"],
            )
            for m in page.data
        ]

    async def ping(self) -> bool:
        if self.api_key is None:
            return False
        try:
            await self._client.with_options(timeout=3, max_retries=0).models.list(limit=1)
        except anthropic.APIError:
            return False
        return True

    async def aclose(self) -> None:
        await self._client.close()


# An error event inside a stream comes with the stream's 200: its type says what it was.
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


def _status_error(exc: anthropic.APIStatusError, model: str | None) -> errors.ServiceError:
    """Anthropic's error ({"type": "error", "error": {"type", "message"}}) as ours; 529
    (overloaded) is a 5xx like any other: a fallback may take the call. An error event in a
    stream arrives with the stream's 200: its type gives the status."""
    status = exc.status_code
    if status < 400:
        inner = exc.body.get("error") if isinstance(exc.body, dict) else None
        kind = inner.get("type") if isinstance(inner, dict) else None
        status = ERROR_STATUS.get(kind, 500) if isinstance(kind, str) else 500
    retry_after = exc.response.headers.get("retry-after") if exc.response is not None else None
    return map_status(status, exc.body, retry_after=retry_after, model=model, path="messages")


# ---- OpenAI's request -> a Messages request ------------------------------------------------


def to_messages_request(request: ChatRequest) -> dict[str, Any]:
    """The Messages API's parameters for an OpenAI chat request; InvalidRequest names the
    field that has no equivalent."""
    if request.n not in (None, 1):
        raise errors.InvalidRequest(
            "Anthropic's models make one reply per call: n must be 1.", param="n"
        )
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        if message.role in ("system", "developer"):
            if turns:
                raise errors.InvalidRequest(
                    "Anthropic's models take system (and developer) messages only before the "
                    "conversation, as one system prompt.",
                    param=f"messages.{i}.role",
                )
            system.append(_plain_text(message, i))
            continue
        role, blocks = _blocks(message, i)
        if turns and turns[-1]["role"] == role:  # Anthropic's turns alternate: join them
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise errors.InvalidRequest(
            "Anthropic's models need a user message besides the system prompt.", param="messages"
        )
    params: dict[str, Any] = {
        "model": request.model,
        "messages": turns,
        "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
    }
    if system:
        params["system"] = "\n\n".join(system)
    if request.stop:
        if any(not stop.strip() for stop in request.stop):
            raise errors.InvalidRequest(
                "Anthropic's models refuse an empty or blank stop sequence.", param="stop"
            )
        params["stop_sequences"] = request.stop
    extra: dict[str, Any] = {}
    if "temperature" in request.model_fields_set:
        if request.temperature > 1:
            raise errors.InvalidRequest(
                f"Anthropic's models take a temperature from 0 to 1 (not {request.temperature:g}).",
                param="temperature",
            )
        extra["temperature"] = request.temperature
    if request.top_p is not None:
        extra["top_p"] = request.top_p
    if extra:  # still in the Messages API, no longer named by the SDK's signature
        params["extra_body"] = extra
    if request.tools:
        params["tools"] = [_tool(tool, i) for i, tool in enumerate(request.tools)]
    if request.tool_choice is not None:
        params["tool_choice"] = _tool_choice(request.tool_choice)
    return params


def _plain_text(message: ChatMessage, i: int) -> str:
    if isinstance(message.content, list) and message.has_media():
        raise errors.InvalidRequest(
            "A system message takes text only.", param=f"messages.{i}.content"
        )
    return message.text()


def _blocks(message: ChatMessage, i: int) -> tuple[str, list[dict[str, Any]]]:
    """(role, content blocks) of one OpenAI message; a field with no equivalent is refused."""
    where = f"messages.{i}"
    extra = message.model_extra or {}
    for name in ("name", "refusal", "audio", "function_call", *extra):
        value = extra[name] if name in extra else getattr(message, name, None)
        if value not in (None, "", [], {}):  # an empty echo of a reply's field says nothing
            raise errors.InvalidRequest(
                f"Anthropic's models have no equivalent of a message's {name!r}.",
                param=f"{where}.{name}",
            )
    if message.role == "tool":
        if not message.tool_call_id:
            raise errors.InvalidRequest("A tool message needs its tool_call_id.", param=where)
        if isinstance(message.content, list):
            content: Any = [_part(p.model_dump(exclude_none=True), f"{where}.content.{j}")
                            for j, p in enumerate(message.content)]  # fmt: skip
        else:
            content = message.content or ""
        result = {"type": "tool_result", "tool_use_id": message.tool_call_id, "content": content}
        return "user", [result]
    if message.role == "function":
        raise errors.InvalidRequest(
            "Function messages (the old function calling) have no Anthropic equivalent: send "
            "tool messages.",
            param=f"{where}.role",
        )
    blocks: list[dict[str, Any]] = []
    if isinstance(message.content, str):
        if message.content:
            blocks.append({"type": "text", "text": message.content})
    else:
        for j, part in enumerate(message.content or []):
            block = _part(part.model_dump(exclude_none=True), f"{where}.content.{j}")
            if block.get("type") != "text" or block["text"]:  # an empty text part says nothing
                blocks.append(block)
    if message.role == "assistant":
        for j, call in enumerate(message.tool_calls or []):
            blocks.append(_tool_use(call, f"{where}.tool_calls.{j}"))
    if not blocks:
        raise errors.InvalidRequest(
            "Anthropic's models refuse an empty message: give it text, an image or tool calls.",
            param=f"{where}.content",
        )
    return ("assistant" if message.role == "assistant" else "user"), blocks


def _part(part: dict[str, Any], where: str) -> dict[str, Any]:
    kind = part.get("type")
    known = {"text": {"type", "text"}, "refusal": {"type", "refusal"},
             "image_url": {"type", "image_url"}}.get(kind, {"type"})  # fmt: skip
    for name in part:
        if name not in known:
            raise errors.InvalidRequest(
                f"Anthropic's models have no equivalent of a part's {name!r}.",
                param=f"{where}.{name}",
            )
    if kind in ("text", "refusal"):
        return {"type": "text", "text": part.get("text") or part.get("refusal") or ""}
    if kind == "image_url":
        image = part.get("image_url")
        if isinstance(image, dict) and image.get("detail") not in (None, "auto"):
            raise errors.InvalidRequest(
                "Anthropic's models take no image detail setting (only auto).",
                param=f"{where}.image_url.detail",
            )
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise errors.InvalidRequest("An image_url part needs a url.", param=where)
        if found := DATA_URL.match(url):
            source = {"type": "base64", "media_type": found[1], "data": found[2]}
        elif url.startswith(("https://", "http://")):
            source = {"type": "url", "url": url}
        else:
            raise errors.InvalidRequest(
                "An image must be a PNG, JPEG, GIF or WebP data: URL or an http(s) URL.",
                param=where,
            )
        return {"type": "image", "source": source}
    raise errors.InvalidRequest(
        f"Anthropic's models take text and images, not {kind!r} parts.", param=where
    )


def _tool_use(call: dict[str, Any], where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise errors.InvalidRequest("A tool call needs a function name.", param=where)
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except (TypeError, json.JSONDecodeError):
        raise errors.InvalidRequest(
            "A tool call's arguments must be a JSON object.", param=f"{where}.function.arguments"
        ) from None
    if not isinstance(arguments, dict):
        raise errors.InvalidRequest(
            "A tool call's arguments must be a JSON object.", param=f"{where}.function.arguments"
        )
    return {"type": "tool_use", "id": str(call.get("id") or ""), "name": function["name"],
            "input": arguments}  # fmt: skip


def _tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    if tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise errors.InvalidRequest(
            "Anthropic's models take function tools only.", param=f"tools.{i}.type"
        )
    function = tool["function"]
    if not isinstance(function.get("name"), str):
        raise errors.InvalidRequest("A tool needs a name.", param=f"tools.{i}.function.name")
    for name in function:
        if name not in ("name", "description", "parameters"):
            raise errors.InvalidRequest(
                f"Anthropic's tools have no equivalent of a function's {name!r}.",
                param=f"tools.{i}.function.{name}",
            )
    out = {
        "name": function["name"],
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    return out


def _tool_choice(choice: Any) -> dict[str, Any]:
    if choice in ("auto", "none"):
        return {"type": choice}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        return {"type": "tool", "name": choice["function"]["name"]}
    raise errors.InvalidRequest(
        'tool_choice must be "none", "auto", "required" or a function by name.',
        param="tool_choice",
    )


# ---- the streamed events -> the service's chunks ---------------------------------------------


class ReplyReader:
    """Reads a Messages stream's events (as dicts) into chunks: text as it comes, each tool
    call once whole, the finish reason and usage at the end (message_stop)."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish: str | None = None
        self.stopped = False
        self._tools: dict[int, dict[str, Any]] = {}  # block index -> the call being written
        self._calls = 0

    def read(self, event: dict[str, Any]) -> list[StreamChunk]:
        kind = event.get("type")
        if kind == "message_start":
            usage = (event.get("message") or {}).get("usage") or {}
            self.prompt_tokens = _input_tokens(usage)
            self.completion_tokens = usage.get("output_tokens") or 0
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                tool = {"id": block.get("id") or "", "name": block.get("name") or "", "json": []}
                self._tools[event.get("index", 0)] = tool
            elif block.get("type") == "text" and block.get("text"):
                return [StreamChunk(text=block["text"])]
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                return [StreamChunk(text=delta["text"])]
            if delta.get("type") == "input_json_delta":
                tool = self._tools.get(event.get("index", 0))
                if tool is not None:
                    tool["json"].append(delta.get("partial_json") or "")
        elif kind == "content_block_stop":
            tool = self._tools.pop(event.get("index", 0), None)
            if tool is not None:
                call = {
                    "index": self._calls,
                    "id": tool["id"],
                    "type": "function",
                    "function": {"name": tool["name"], "arguments": "".join(tool["json"]) or "{}"},
                }
                self._calls += 1
                return [StreamChunk(tool_calls=[call])]
        elif kind == "message_delta":
            reason = (event.get("delta") or {}).get("stop_reason")
            if reason:
                self.finish = FINISH.get(reason, "stop")
            usage = event.get("usage") or {}
            self.completion_tokens = usage.get("output_tokens") or self.completion_tokens
            self.prompt_tokens = _input_tokens(usage) or self.prompt_tokens
        elif kind == "message_stop":
            self.stopped = True
            usage = Usage(
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                total_tokens=self.prompt_tokens + self.completion_tokens,
            )
            return [StreamChunk(finish_reason=self.finish or "stop", usage=usage)]
        return []


def _input_tokens(usage: dict[str, Any]) -> int:
    """Every input token billed: fresh, written to the cache and read from it."""
    keys = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    return sum(usage.get(k) or 0 for k in keys)
