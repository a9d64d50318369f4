"""The service's functions as one table: what each one takes, where it goes, how it streams.

The service, the /v1 gateway, the ledger and the metrics loop over ENDPOINTS instead of
repeating "chat", "embedding"... in if-chains. Adding an endpoint: a request model in
schemas.py, a row here, and its provider method (and, for the embedded backend's own answers,
a shape in gateway/shapes.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core import tokens
from core.schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    FunctionRequest,
    ImageRequest,
)

Fields = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Endpoint:
    name: str  # the function's name in the ledger, the metrics and the provider's defaults
    request: type[FunctionRequest]  # what the service validates
    path: str  # OpenAI's path, under /v1 for clients and under the base URL upstream
    fields: Fields  # an OpenAI request body -> the request model's fields
    # What its prompt costs at most, in its model's tokens (core.tokens: its estimator).
    prompt: Callable[[Any, tokens.Count], int]
    streams: bool = False  # takes stream=true and answers with server-sent events
    generates: bool = False  # a reply whose length max_tokens bounds (and the quota holds)
    # The request model's field names that OpenAI's clients know by another name.
    renamed: Callable[[dict[str, Any]], dict[str, str]] = field(default=lambda body: {})
    # What a backend that does not serve it says ({backend}: its name), and how to get it.
    unavailable: str = (
        "The {backend} backend does not serve /{path}: set OPENAI_BASE_URL to a server that does."
    )


def _stop(value: Any) -> Any:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


# Every name a reply's length goes by upstream: the hold is sized from the largest one sent,
# and a quota cap rewrites each of them (llama.cpp's server also reads n_predict).
REPLY_LIMITS = ("max_completion_tokens", "max_tokens", "n_predict")


SAMPLING = ("temperature", "n", "top_p", "seed", "presence_penalty", "frequency_penalty",
            "stream", "stream_options")  # fmt: skip
CHAT_EXTRAS = ("logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
               "parallel_tool_calls")  # fmt: skip
COMPLETION_EXTRAS = ("best_of", "logprobs")


def _copied(body: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {name: body[name] for name in names if body.get(name) is not None}


def _common(body: dict[str, Any]) -> dict[str, Any]:
    return {"model": body.get("model") or None, **_copied(body, SAMPLING)}


def _reply_limit(body: dict[str, Any]) -> Any:
    """The largest reply length the client asked for, under whichever names it used."""
    values = [body.get(name) for name in REPLY_LIMITS if body.get(name) is not None]
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(numbers) != len(values):
        return next(v for v in values if v not in numbers)  # validation names what is wrong
    return max(numbers) if numbers else None


def chat_fields(body: dict[str, Any]) -> dict[str, Any]:
    messages = body.get("messages")
    max_tokens = _reply_limit(body)
    return {**_common(body), "messages": messages, "max_tokens": max_tokens,
            "stop": _stop(body.get("stop")), **_copied(body, CHAT_EXTRAS)}  # fmt: skip


def completion_fields(body: dict[str, Any]) -> dict[str, Any]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    return {**_common(body), "prompt": prompt, "max_tokens": _reply_limit(body),
            "stop": _stop(body.get("stop")), **_copied(body, COMPLETION_EXTRAS)}  # fmt: skip


def embedding_fields(body: dict[str, Any]) -> dict[str, Any]:
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    elif isinstance(texts, list) and texts and all(isinstance(t, int) for t in texts):
        texts = [texts]  # one prompt as token ids
    return {"model": body.get("model") or None, "texts": texts,
            "dimensions": body.get("dimensions"),
            **_copied(body, ("encoding_format",))}  # fmt: skip


def image_fields(body: dict[str, Any]) -> dict[str, Any]:
    fields = {"model": body.get("model") or None, "prompt": body.get("prompt")}
    for name in ("size", "quality", "n"):
        if body.get(name) is not None:
            fields[name] = body[name]
    return fields


def _chat_renamed(body: dict[str, Any]) -> dict[str, str]:
    if body.get("max_completion_tokens") is None:
        return {}
    return {"max_tokens": "max_completion_tokens"}


ENDPOINTS: dict[str, Endpoint] = {
    e.name: e
    for e in (
        Endpoint(
            "chat",
            ChatRequest,
            "chat/completions",
            chat_fields,
            tokens.chat_prompt,
            streams=True,
            generates=True,
            renamed=_chat_renamed,
        ),
        Endpoint(
            "completion",
            CompletionRequest,
            "completions",
            completion_fields,
            tokens.completion_prompt,
            streams=True,
            generates=True,
        ),
        Endpoint(
            "embedding",
            EmbeddingRequest,
            "embeddings",
            embedding_fields,
            tokens.embedding_prompt,
            renamed=lambda body: {"texts": "input"},
        ),
        Endpoint(
            "image",
            ImageRequest,
            "images/generations",
            image_fields,
            tokens.image_prompt,
            unavailable=(
                "The {backend} backend has no image model. To generate images, set "
                "OPENAI_API_KEY (and IMAGE_MODEL), or OPENAI_BASE_URL to a server that serves "
                "/v1/images/generations."
            ),
        ),
    )
}
