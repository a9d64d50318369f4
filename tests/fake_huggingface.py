"""A local fake of the Hugging Face endpoints the product uses (the Inference Providers router):

- POST /v1/chat/completions: OpenAI-compatible chat, streamed as the router streams it
  (its chunks carry tool calls in pieces, and a usage chunk when asked);
- GET /v1/models: the router's model list;
- POST /hf-inference/models/{model}/pipeline/feature-extraction: {"inputs": [...]} -> vectors;
- POST /hf-inference/models/{model}: text-to-image, {"inputs": prompt, "parameters": {...}}
  -> PNG bytes.
Errors come in Hugging Face's shape, {"error": "..."}; hf-error-<status> models fail so.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.background import BackgroundServer
from tests.upstream import embed, tiny_png

CHAT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
EMBEDDING_MODEL = "BAAI/bge-small-en-v1.5"
IMAGE_MODEL = "black-forest-labs/FLUX.1-schnell"
MODELS = [CHAT_MODEL, EMBEDDING_MODEL, IMAGE_MODEL]


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class FakeHuggingFace(BackgroundServer):
    name = "fake Hugging Face"

    def __init__(self, token: str = "hf_test_token_0123456789abcdef") -> None:
        self.token = token
        self.requests: list[dict[str, Any]] = []
        super().__init__(
            Starlette(
                routes=[
                    Route("/v1/chat/completions", self.chat, methods=["POST"]),
                    Route("/v1/models", self.models, methods=["GET"]),
                    Route(
                        "/hf-inference/models/{model:path}/pipeline/feature-extraction",
                        self.features,
                        methods=["POST"],
                    ),
                    Route("/hf-inference/models/{model:path}", self.image, methods=["POST"]),
                ]
            )
        )

    def _refused(self, request: Request) -> JSONResponse | None:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return error(401, "Invalid credentials in Authorization header")
        return None

    async def _body(self, request: Request, path: str) -> dict[str, Any]:
        body = json.loads(await request.body())
        self.requests.append({"path": path, "json": body})
        return body

    async def models(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        data = [{"id": m, "object": "model", "owned_by": m.split("/")[0]} for m in MODELS]
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        body = await self._body(request, "/v1/chat/completions")
        model = body.get("model", "")
        if model.startswith("hf-error-"):
            status = int(model.rsplit("-", 1)[1])
            return error(status, f"Fake failure {status}")
        if model != CHAT_MODEL:
            return error(404, f"Model {model} is not supported by any provider you have enabled.")
        last = body["messages"][-1]
        content = last.get("content")
        text = (
            content
            if isinstance(content, str)
            else " ".join(p.get("text", "") for p in content or [] if p.get("type") == "text")
        )
        words = f"HF echo: {text}".split(" ")[: body.get("max_tokens") or 1000]

        def chunk(delta: dict[str, Any], reason: str | None = None) -> str:
            data = {"id": "hf-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}  # fmt: skip
            return f"data: {json.dumps(data)}\n\n"

        def events() -> Any:
            for i, word in enumerate(words):
                yield chunk({"role": "assistant", "content": word if i == 0 else " " + word})
            reason = "stop"
            if body.get("tools"):
                name = body["tools"][0]["function"]["name"]
                start = {"name": name, "arguments": '{"ci'}  # the arguments come in pieces
                yield chunk({"tool_calls": [{"index": 0, "id": "call_hf1", "type": "function",
                                             "function": start}]})  # fmt: skip
                rest = {"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}
                yield chunk({"tool_calls": [rest]})
                reason = "tool_calls"
            yield chunk({}, reason)
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": len(text.split()), "completion_tokens": len(words),
                         "total_tokens": len(text.split()) + len(words)}  # fmt: skip
                data = {"id": "hf-1", "object": "chat.completion.chunk", "created": 1,
                        "model": model, "choices": [], "usage": usage}  # fmt: skip
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def features(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        model = request.path_params["model"]
        body = await self._body(
            request, f"/hf-inference/models/{model}/pipeline/feature-extraction"
        )
        if model != EMBEDDING_MODEL:
            return error(404, f"Model {model} does not exist")
        inputs = body.get("inputs")
        texts = [inputs] if isinstance(inputs, str) else inputs
        size = (body.get("parameters") or {}).get("dimensions") or body.get("dimensions") or 8
        return JSONResponse([embed(t, size) for t in texts])

    async def image(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        model = request.path_params["model"]
        body = await self._body(request, f"/hf-inference/models/{model}")
        if model != IMAGE_MODEL:
            return error(404, f"Model {model} does not exist")
        return Response(tiny_png(body.get("inputs", "")), media_type="image/png")
