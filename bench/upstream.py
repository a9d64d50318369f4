"""A minimal OpenAI-compatible upstream with a fixed latency, for benchmarks (not tests).

    .venv/bin/python bench/upstream.py --port 9100 --latency-ms 20

Raw ASGI with canned bytes, so the upstream itself costs as little CPU as possible and the
figures show the gateway's overhead, not this server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import uvicorn

WORDS = ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "again"]


def _completion(model: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(WORDS)},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 12, "total_tokens": 24},
        }
    ).encode()


def _chunk(model: str, delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def make_app(latency: float):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"].endswith("/models"):
            model = {"id": "bench-model", "object": "model", "created": 0, "owned_by": "bench"}
            payload = json.dumps({"object": "list", "data": [model]}).encode()
            await _respond(send, payload, b"application/json")
            return
        request = json.loads(body or b"{}")
        model = request.get("model", "bench-model")
        await asyncio.sleep(latency)
        if not request.get("stream"):
            await _respond(send, _completion(model), b"application/json")
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        events = [_chunk(model, {"role": "assistant", "content": ""})]
        events += [_chunk(model, {"content": w + " "}) for w in WORDS]
        events.append(_chunk(model, {}, finish="stop"))
        if (request.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 12, "completion_tokens": 12, "total_tokens": 24}
            events.append(_chunk(model, {}, usage=usage))
        events.append(b"data: [DONE]\n\n")
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


async def _respond(send, payload: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.latency_ms / 1000),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
