"""A local fake of Anthropic's Messages API: the SSE event sequence, tool use, errors.

It answers as the real API does, as far as the product reads it: the key (x-api-key, or a
bearer token as the SDK sends it),
`message_start` / `content_block_start` / `content_block_delta` (text_delta and
input_json_delta) / `content_block_stop` / `message_delta` (stop_reason, usage) /
`message_stop`, `ping` events, error bodies `{"type": "error", "error": {"type", "message"}}`
with the statuses Anthropic uses (400, 401, 404, 429, 500, 529), and GET /v1/models.

Models that fail on purpose: claude-error-<status> fails with that status; claude-cut-stream
sends an `error` event after its first words; claude-overloaded-early sends one (overloaded)
right after message_start, before any text.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.background import BackgroundServer

MODELS = ["claude-sonnet-4-5", "claude-haiku-4-5"]
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def error(status: int, message: str) -> JSONResponse:
    body = {
        "type": "error",
        "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message},
    }
    headers = {"retry-after": "1"} if status == 429 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(
        b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text"
    )


def _sse(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


class FakeAnthropic(BackgroundServer):
    name = "fake Anthropic"

    def __init__(self, api_key: str = "sk-ant-test-key-0123456789") -> None:
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        super().__init__(
            Starlette(
                routes=[
                    Route("/v1/messages", self.messages, methods=["POST"]),
                    Route("/v1/models", self.models, methods=["GET"]),
                ]
            )
        )

    # ---- the API ---------------------------------------------------------------------------

    def _refused(self, request: Request) -> JSONResponse | None:
        # The SDK sends the key as a bearer token; the raw API also takes x-api-key.
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if self.api_key not in (request.headers.get("x-api-key"), bearer):
            return error(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return error(400, "anthropic-version: header is required")
        return None

    async def models(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        data = [
            {"type": "model", "id": m, "display_name": m, "created_at": "2025-09-29T00:00:00Z"}
            for m in MODELS
        ]
        return JSONResponse(
            {"data": data, "has_more": False, "first_id": MODELS[0], "last_id": MODELS[-1]}
        )

    async def messages(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        body = json.loads(await request.body())
        self.requests.append(body)
        model = body.get("model")
        if isinstance(model, str) and model.startswith("claude-error-"):
            status = int(model.rsplit("-", 1)[1])
            return error(status, f"Fake failure {status}")
        if model not in [*MODELS, "claude-cut-stream", "claude-overloaded-early"]:
            return error(404, f"model: {model}")
        if not isinstance(body.get("max_tokens"), int):
            return error(400, "max_tokens: Field required")
        if body.get("temperature") is not None and not 0 <= body["temperature"] <= 1:
            return error(400, "temperature: must be between 0 and 1")
        events = list(self._reply(body))
        if not body.get("stream"):
            return JSONResponse(self._whole(events))
        if model == "claude-overloaded-early":  # a 200, then an error before any text
            return StreamingResponse(self._overloaded(events), media_type="text/event-stream")
        return StreamingResponse(
            self._stream(events, model == "claude-cut-stream"), media_type="text/event-stream"
        )

    async def _overloaded(self, steps: list[Any]) -> Any:
        async for event in self._stream(steps, False):
            yield event
            break  # message_start only
        overloaded = {"type": "overloaded_error", "message": "Overloaded"}
        yield _sse("error", {"type": "error", "error": overloaded})

    def _reply(self, body: dict[str, Any]) -> Any:
        """The reply as (kind, payload) steps: text words, then perhaps a tool call."""
        turns = body["messages"]
        last = turns[-1]
        results = [
            b
            for b in last.get("content") or []
            if isinstance(b, dict) and b.get("type") == "tool_result"
        ]
        images = sum(
            1
            for t in turns
            if isinstance(t.get("content"), list)
            for b in t["content"]
            if b.get("type") == "image"
        )
        if results:
            text = "Tool said: " + "; ".join(str(r.get("content")) for r in results)
        else:
            text = "Claude echo: " + _text(last.get("content"))
        if body.get("system"):
            text += f" [system: {body['system']}]"
        if images:
            text += f" [images: {images}]"
        words = text.split(" ")
        stops = body.get("stop_sequences") or []
        stop_reason, stop_sequence = "end_turn", None
        cap = body["max_tokens"]
        kept = []
        for word in words:
            if word in stops:
                stop_reason, stop_sequence = "stop_sequence", word
                break
            if len(kept) >= cap:
                stop_reason = "max_tokens"
                break
            kept.append(word)
        yield ("text", kept)
        tools = body.get("tools") or []
        choice = body.get("tool_choice") or {}
        if tools and not results and choice.get("type") != "none" and stop_reason == "end_turn":
            wanted = choice.get("name") if choice.get("type") == "tool" else tools[0]["name"]
            arguments = json.dumps({"city": "Paris", "unit": "celsius"})
            yield ("tool", {"id": "toolu_01A", "name": wanted, "json": arguments})
            stop_reason = "tool_use"
        prompt = sum(len(_text(t.get("content")).split()) for t in turns) + len(
            str(body.get("system") or "").split()
        )
        yield (
            "end",
            {
                "stop_reason": stop_reason,
                "stop_sequence": stop_sequence,
                "input": prompt,
                "output": len(kept),
            },
        )

    async def _stream(self, steps: list[Any], cut: bool) -> Any:
        end = steps[-1][1]
        start = {
            "type": "message_start",
            "message": {
                "id": "msg_01",
                "type": "message",
                "role": "assistant",
                "model": "claude",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": end["input"], "output_tokens": 1},
            },
        }
        yield _sse("message_start", start)
        yield _sse("ping", {"type": "ping"})
        for index, (kind, payload) in enumerate(steps[:-1]):
            if kind == "text":
                yield _sse(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
                for i, word in enumerate(payload):
                    piece = word if i == 0 else " " + word
                    yield _sse(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "text_delta", "text": piece},
                        },
                    )
                    if cut:
                        yield _sse(
                            "error",
                            {
                                "type": "error",
                                "error": {"type": "overloaded_error", "message": "Overloaded"},
                            },
                        )
                        return
                yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
            else:
                yield _sse(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {
                            "type": "tool_use",
                            "id": payload["id"],
                            "name": payload["name"],
                            "input": {},
                        },
                    },
                )
                whole = payload["json"]
                for piece in (whole[: len(whole) // 2], whole[len(whole) // 2 :]):
                    yield _sse(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": piece},
                        },
                    )
                yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
        yield _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": end["stop_reason"], "stop_sequence": end["stop_sequence"]},
                "usage": {"output_tokens": end["output"]},
            },
        )
        yield _sse("message_stop", {"type": "message_stop"})

    def _whole(self, steps: list[Any]) -> dict[str, Any]:
        end = steps[-1][1]
        content: list[dict[str, Any]] = []
        for kind, payload in steps[:-1]:
            if kind == "text":
                content.append({"type": "text", "text": " ".join(payload)})
            else:
                content.append(
                    {
                        "type": "tool_use",
                        "id": payload["id"],
                        "name": payload["name"],
                        "input": json.loads(payload["json"]),
                    }
                )
        return {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude",
            "content": content,
            "stop_reason": end["stop_reason"],
            "stop_sequence": end["stop_sequence"],
            "usage": {"input_tokens": end["input"], "output_tokens": end["output"]},
        }
