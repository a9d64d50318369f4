"""OpenAI's response shapes: errors, and the answers the gateway builds from typed results.

Requests are read by core/endpoints.py (each endpoint's field adapter); the service validates.
"""

from __future__ import annotations

import base64
import re
import struct
import time
from typing import Any

import orjson

from core import errors
from core.schemas import EmbeddingResult, ModelInfo, StreamChunk, Usage

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
}


def error_body(
    message: str, *, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def service_error_body(
    exc: errors.ServiceError, params: dict[str, str] | None = None
) -> dict[str, Any]:
    """OpenAI's error shape; `params` renames the service's field names to the client's."""
    message, param = str(exc), exc.param
    if params and param in params:
        # "Invalid input: texts.1: ..." -> "Invalid input: input.1: ..."
        message = re.sub(rf"\b{re.escape(param)}(?=[.:])", params[param], message)
        param = params[param]
    body = error_body(message, status=exc.status, param=param, code=exc.code)
    if exc.error_type:
        body["error"]["type"] = exc.error_type  # the upstream's own, when it gave one
    return body


# ---- responses built here (the embedded backend, which has no OpenAI bytes to pass on) -------


def _usage(usage: Usage | None) -> dict[str, int]:
    usage = usage or Usage()
    total = usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": total,
    }


class Completion:
    """Builds chat.completion(.chunk) and text_completion objects from service chunks."""

    def __init__(self, function: str, model: str, request_id: str) -> None:
        self.chat = function == "chat"
        self.model = model
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id.removeprefix("req_")
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"

    def _choice(self, text: str | None, finish: str | None, *, stream: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        key = "delta" if stream else "message"
        message = {"role": "assistant", "content": text} if text is not None or not stream else {}
        return {"index": 0, key: message, "logprobs": None, "finish_reason": finish}

    def _envelope(self, choices: list[Any], *, stream: bool, **extra: Any) -> dict[str, Any]:
        kind = self.object + ".chunk" if stream and self.chat else self.object
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}  # fmt: skip

    def event(self, chunk: StreamChunk) -> bytes:
        choice = self._choice(chunk.text if chunk.text else None, chunk.finish_reason, stream=True)
        return sse(self._envelope([choice], stream=True))

    def usage_event(self, usage: Usage | None) -> bytes:
        return sse(self._envelope([], stream=True, usage=_usage(usage)))

    def whole(self, text: str, finish: str | None, usage: Usage | None) -> bytes:
        choice = self._choice(text, finish or "stop", stream=False)
        return orjson.dumps(self._envelope([choice], stream=False, usage=_usage(usage)))


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def embeddings_body(result: EmbeddingResult, *, encoding: str | None) -> bytes:
    def encode(vector: list[float]) -> Any:
        if encoding == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    data = [
        {"object": "embedding", "index": i, "embedding": encode(v)}
        for i, v in enumerate(result.vectors)
    ]
    usage = {"prompt_tokens": result.usage.prompt_tokens, "total_tokens": result.usage.total_tokens}
    return orjson.dumps({"object": "list", "data": data, "model": result.model, "usage": usage})


def _model(m: ModelInfo) -> dict[str, Any]:
    return {"id": m.id, "object": "model", "created": m.created or 0, "owned_by": m.owned_by}


def models_body(models: list[ModelInfo]) -> bytes:
    return orjson.dumps({"object": "list", "data": [_model(m) for m in models]})


def model_body(model: ModelInfo) -> bytes:
    return orjson.dumps(_model(model))
