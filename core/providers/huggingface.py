"""Hugging Face's Inference Providers, through `huggingface_hub`'s AsyncInferenceClient.

- Chat (streaming) goes to the router's OpenAI-compatible endpoint, {base_url}/v1/chat/completions,
  with the model as the Hub names it ("meta-llama/Llama-3.1-8B-Instruct", or "...:provider").
- Embeddings are feature extraction on HF Inference:
  {base_url}/hf-inference/models/{model}/pipeline/feature-extraction.
- Images are text-to-image on HF Inference: {base_url}/hf-inference/models/{model}.
The client is given these URLs itself, so it never asks the Hub which provider serves a model
(no call leaves for anywhere but base_url). The key is a Hugging Face token (hf_...).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx2
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError

from core import errors
from core.backends import DEFAULT_URLS, Backend
from core.config import Settings, public_url
from core.providers.base import TypedOnly
from core.providers.openai import map_status
from core.schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResult,
    ImageRequest,
    ImageResult,
    ModelInfo,
    StreamChunk,
    Usage,
    guess_kinds,
)

log = logging.getLogger(__name__)

HONOURS = {
    "chat": frozenset({
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "stop", "seed", "presence_penalty", "frequency_penalty", "stream", "stream_options",
        "tools", "tool_choice", "response_format",
    }),
    "embedding": frozenset({"model", "input", "encoding_format", "dimensions"}),
    "image": frozenset({"model", "prompt", "n", "size", "response_format"}),
}  # fmt: skip


class HuggingFaceProvider(TypedOnly):
    """Chat, embeddings and images on Hugging Face (no /completions)."""

    functions = frozenset({"chat", "embedding", "image"})
    honours = HONOURS
    kind_label = "Hugging Face"
    key_hint = " (a Hugging Face token, hf_...)"

    def __init__(self, settings: Settings, backend: Backend) -> None:
        spec = backend.spec
        self.name = spec.name
        url = spec.base_url or DEFAULT_URLS["huggingface"]
        self.base_url = public_url(url)
        self._url = url
        self.api_key = backend.api_key
        self._key_env = spec.api_key_env
        self.default_models = dict(spec.defaults)
        self._timeout = spec.timeout or settings.request_timeout
        token = backend.api_key.get_secret_value() if backend.api_key else None
        # `token=False` would send no key at all; a missing one is refused before a call.
        self._chat = AsyncInferenceClient(
            base_url=f"{url}/v1", api_key=token, timeout=self._timeout
        )
        self._tasks = AsyncInferenceClient(api_key=token, timeout=self._timeout)
        self._token = token

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        self._check_configured()
        fields = request.model_fields_set
        kwargs: dict[str, Any] = {
            "messages": [m.model_dump(exclude_none=True) for m in request.messages],
            "model": request.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_tokens,
            "stop": request.stop or None,
            "temperature": request.temperature if "temperature" in fields else None,
            "top_p": request.top_p,
            "seed": request.seed,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
            "tools": request.tools,
            "tool_choice": request.tool_choice,
            "response_format": request.response_format,
        }
        calls: dict[int, dict[str, Any]] = {}  # tool calls arrive in pieces, by index
        finished = False
        async with _mapped(request.model, "chat/completions"):
            stream = await self._chat.chat_completion(
                **{k: v for k, v in kwargs.items() if v is not None}
            )
            async for output in stream:
                usage = _usage(getattr(output, "usage", None))
                choices = output.choices or []
                if not choices:
                    if usage:
                        finished = True
                        yield StreamChunk(usage=usage)
                    continue
                choice = choices[0]
                delta = choice.delta
                for piece in getattr(delta, "tool_calls", None) or []:
                    call = calls.setdefault(
                        piece.index or 0, {"id": "", "name": "", "arguments": []}
                    )
                    call["id"] = piece.id or call["id"]
                    if piece.function is not None:
                        call["name"] = piece.function.name or call["name"]
                        call["arguments"].append(piece.function.arguments or "")
                reason = choice.finish_reason
                whole = None
                if reason and calls:
                    whole = [_whole_call(i, c) for i, c in sorted(calls.items())]
                    calls = {}
                text = getattr(delta, "content", None) or ""
                if reason:
                    finished = True
                if text or reason or usage or whole:
                    yield StreamChunk(
                        text=text, finish_reason=reason, usage=usage, tool_calls=whole
                    )
        if not finished:
            raise errors.StreamInterrupted()

    async def completion_stream(self, request: CompletionRequest) -> AsyncIterator[StreamChunk]:
        raise errors.Unsupported(f"The {self.name} backend (Hugging Face) has no /completions.")
        yield StreamChunk()  # pragma: no cover (makes this an async generator)

    async def embeddings(self, request: EmbeddingRequest) -> EmbeddingResult:
        self._check_configured()
        if request.tokenized:
            raise errors.InvalidRequest(
                "Hugging Face's feature extraction takes texts, not token ids.", param="input"
            )
        url = f"{self._url}/hf-inference/models/{request.model}/pipeline/feature-extraction"
        async with _mapped(request.model, "embeddings"):
            array = await self._tasks.feature_extraction(
                list(request.texts), model=url, dimensions=request.dimensions
            )
        vectors = [[float(x) for x in row] for row in array.tolist()]
        if len(vectors) != len(request.texts) or any(
            isinstance(v, list) for r in vectors for v in r
        ):
            raise errors.UpstreamError(
                f"The {self.name} backend returned {len(vectors)} vectors for "
                f"{len(request.texts)} texts: is {request.model} a sentence-embedding model?"
            )
        # Feature extraction reports no usage: about four characters a token.
        tokens = sum(len(t) for t in request.texts if isinstance(t, str)) // 4
        return EmbeddingResult(
            model=request.model or "",
            dimensions=len(vectors[0]) if vectors else 0,
            vectors=vectors,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )

    async def generate_images(self, request: ImageRequest) -> ImageResult:
        self._check_configured()
        if request.quality not in ("auto", "standard"):
            raise errors.InvalidRequest(
                "Hugging Face's text-to-image models take no quality setting.", param="quality"
            )
        width = height = None
        if request.size != "auto":
            width, height = (int(x) for x in request.size.split("x"))
        url = f"{self._url}/hf-inference/models/{request.model}"
        images = []
        async with _mapped(request.model, "images/generations"):
            for _ in range(request.n):  # one picture a call
                picture = await self._tasks.text_to_image(
                    request.prompt, model=url, width=width, height=height
                )
                images.append(await asyncio.to_thread(_png, picture))
        return ImageResult(
            model=request.model or "", images=images, revised_prompts=[None] * len(images)
        )

    async def list_models(self) -> list[ModelInfo]:
        self._check_configured()
        async with _mapped(None, "models"), httpx2.AsyncClient(timeout=self._timeout) as http:
            response = await http.get(f"{self._url}/v1/models", headers=self._headers())
        if response.status_code >= 400:
            raise map_status(response.status_code, _json(response), path="models")
        data = _json(response)
        items = data.get("data") if isinstance(data, dict) else None
        return [
            ModelInfo(id=m["id"], owned_by=str(m.get("owned_by") or "huggingface"),
                      kinds=guess_kinds(m["id"]))
            for m in items or []
            if isinstance(m, dict) and isinstance(m.get("id"), str)
        ]  # fmt: skip

    async def ping(self) -> bool:
        if self.api_key is None:
            return False
        try:
            async with httpx2.AsyncClient(timeout=3) as http:
                response = await http.get(f"{self._url}/v1/models", headers=self._headers())
        except httpx2.HTTPError:
            return False
        return response.status_code < 400

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    async def aclose(self) -> None:
        return None


class _mapped:
    """The client's failures as the service's errors (what it said, kept; no token)."""

    def __init__(self, model: str | None, path: str) -> None:
        self.model, self.path = model, path

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, errors.ServiceError):
            return False
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            response = exc.response
            retry_after = response.headers.get("retry-after")
            raise map_status(
                response.status_code, _json(response), retry_after=retry_after,
                model=self.model, path=self.path,
            ) from None  # fmt: skip
        if isinstance(exc, InferenceTimeoutError | httpx2.TimeoutException | TimeoutError):
            raise errors.UpstreamTimeout() from None
        if isinstance(exc, httpx2.HTTPError):
            raise errors.UpstreamUnavailable() from None
        if isinstance(exc, ValueError | json.JSONDecodeError):
            raise errors.UpstreamError(
                f"The Hugging Face backend sent an unreadable answer: {exc}"
            ) from None
        return False


def _whole_call(index: int, call: dict[str, Any]) -> dict[str, Any]:
    arguments = "".join(call["arguments"]) or "{}"
    function = {"name": call["name"], "arguments": arguments}
    return {"index": index, "id": call["id"], "type": "function", "function": function}


def _json(response: Any) -> Any:
    try:
        return response.json()
    except (ValueError, httpx2.ResponseNotRead):
        return None


def _usage(value: Any) -> Usage | None:
    if value is None:
        return None
    prompt = getattr(value, "prompt_tokens", 0) or 0
    completion = getattr(value, "completion_tokens", 0) or 0
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _png(picture: Any) -> bytes:
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()
