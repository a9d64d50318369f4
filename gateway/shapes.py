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
from core.schemas import EmbeddingResult, ImageResult, ModelInfo, StreamChunk, Usage

# Which build of the backend answered (OpenAI's system_fingerprint): this app's, for the
# embedded model, whose answers this module shapes.
# system_fingerprint, by the kind of backend that answered (OpenAI's schema wants the field;
# a backend without one of its own gets None, never another's).
FINGERPRINTS = {"local": "fp_embedded_llama_cpp"}
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
    """Builds chat.completion(.chunk) and text_completion objects from service chunks, with
    every field OpenAI's schema requires (refusal, logprobs, system_fingerprint)."""

    def __init__(
        self, function: str, model: str, request_id: str, *, backend_kind: str | None = "local"
    ) -> None:
        self.chat = function == "chat"
        self.model = model
        self.fingerprint = FINGERPRINTS.get(backend_kind or "")
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id.removeprefix("req_")
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"

    def _logprobs(self, logprobs: Any) -> Any:
        if logprobs is None or not self.chat:
            return logprobs  # completions: OpenAI's legacy shape, as the backend made it
        return {"content": logprobs, "refusal": None}

    def _choice(
        self,
        index: int,
        text: str | None,
        finish: str | None,
        *,
        stream: bool,
        logprobs: Any = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        logprobs = self._logprobs(logprobs)
        if not self.chat:
            return {
                "index": index,
                "text": text or "",
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        if stream:
            delta: dict[str, Any] = {}
            if text is not None:
                delta = {"role": "assistant", "content": text}
            if tool_calls:
                delta = {"role": "assistant", "tool_calls": tool_calls}
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if tool_calls:
            message["tool_calls"] = [
                {k: v for k, v in c.items() if k != "index"} for c in tool_calls
            ]
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}

    def _envelope(self, choices: list[Any], *, stream: bool, **extra: Any) -> dict[str, Any]:
        kind = self.object + ".chunk" if stream and self.chat else self.object
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
            **extra,
        }

    def event(self, chunk: StreamChunk) -> bytes:
        choice = self._choice(
            chunk.index,
            chunk.text if chunk.text else None,
            chunk.finish_reason,
            stream=True,
            logprobs=chunk.logprobs,
            tool_calls=chunk.tool_calls,
        )
        return sse(self._envelope([choice], stream=True))

    def usage_event(self, usage: Usage | None) -> bytes:
        return sse(self._envelope([], stream=True, usage=_usage(usage)))

    def whole(self, chunks: list[StreamChunk], usage: Usage | None) -> bytes:
        """The non-streaming answer: each choice's pieces put together."""
        choices: dict[int, dict[str, Any]] = {}
        for chunk in chunks:
            choice = choices.setdefault(
                chunk.index, {"text": [], "finish": None, "logprobs": None, "tool_calls": None}
            )
            choice["text"].append(chunk.text)
            choice["finish"] = chunk.finish_reason or choice["finish"]
            if chunk.tool_calls:  # a backend may send its calls one at a time (Anthropic's)
                choice["tool_calls"] = (choice["tool_calls"] or []) + chunk.tool_calls
            if chunk.logprobs is not None:
                choice["logprobs"] = _join_logprobs(choice["logprobs"], chunk.logprobs)
        built = []
        for index in sorted(choices) or [0]:
            c = choices.get(index) or {
                "text": [],
                "finish": None,
                "logprobs": None,
                "tool_calls": None,
            }
            text = "".join(c["text"])
            content = None if c["tool_calls"] and not text else text
            built.append(
                self._choice(
                    index,
                    content,
                    c["finish"] or "stop",
                    stream=False,
                    logprobs=c["logprobs"],
                    tool_calls=c["tool_calls"],
                )
            )
        return orjson.dumps(self._envelope(built, stream=False, usage=_usage(usage)))


def _join_logprobs(so_far: Any, more: Any) -> Any:
    """Chat logprobs are lists of tokens; the completions' legacy shape is a dict of lists."""
    if so_far is None:
        return more
    if isinstance(more, list):
        return so_far + more
    return {key: so_far[key] + more[key] for key in more}


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


def images_body(result: ImageResult) -> bytes:
    """OpenAI's images answer, the pictures as b64_json (with usage when the backend gave it)."""
    data = []
    for i, picture in enumerate(result.images):
        item: dict[str, Any] = {"b64_json": base64.b64encode(picture).decode()}
        revised = result.revised_prompts[i] if i < len(result.revised_prompts) else None
        if revised:
            item["revised_prompt"] = revised
        data.append(item)
    body: dict[str, Any] = {"created": int(time.time()), "data": data}
    if result.usage is not None:
        body["usage"] = {
            "input_tokens": result.usage.prompt_tokens,
            "output_tokens": result.usage.completion_tokens,
            "total_tokens": result.usage.total_tokens,
        }
    return orjson.dumps(body)


def _model(m: ModelInfo) -> dict[str, Any]:
    out = {"id": m.id, "object": "model", "created": m.created or 0, "owned_by": m.owned_by}
    if m.backend is not None:  # with several backends: which one serves it
        out["backend"] = m.backend
    return out


def models_body(models: list[ModelInfo]) -> bytes:
    return orjson.dumps({"object": "list", "data": [_model(m) for m in models]})


def model_body(model: ModelInfo) -> bytes:
    return orjson.dumps(_model(model))
