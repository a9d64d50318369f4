"""One HTTP behaviour toward the upstream on every path: idle timeouts, never a limit on a
whole answer, and retries made only before the first byte of an answer (over real HTTP)."""

from __future__ import annotations

import asyncio
import time

import pytest

from core import errors
from core.service import Service
from tests.conftest import app_settings
from tests.upstream import FakeUpstream


def chat(service: Service, model: str, words: str = "hello there") -> str:
    async def run() -> str:
        text = ""
        request = {"messages": [{"role": "user", "content": words}], "model": model}
        async for chunk in service.chat_stream(request):
            text += chunk.text
        return text

    return asyncio.run(run())


def test_a_long_healthy_stream_is_not_cut_by_request_timeout(upstream: FakeUpstream) -> None:
    """REQUEST_TIMEOUT=1 and a reply whose words come 0.3 s apart for about 4 s: it arrives
    whole, since the timeout is for silence, not for the whole answer."""
    service = Service(app_settings(upstream, REQUEST_TIMEOUT="1"))
    words = " ".join(f"w{i}" for i in range(12))
    started = time.monotonic()
    assert chat(service, "drip-0.3", words) == f"Echo: {words}"
    assert time.monotonic() - started > 2  # it really took longer than the timeout


def test_silence_longer_than_request_timeout_is_a_timeout(upstream: FakeUpstream) -> None:
    service = Service(app_settings(upstream, REQUEST_TIMEOUT="1"))
    with pytest.raises(errors.UpstreamTimeout):
        chat(service, "drip-1.6", "a b c")


@pytest.mark.parametrize(("model", "retries", "calls"), [("error-503", 2, 3), ("error-429", 1, 2)])
def test_retryable_statuses_are_retried_up_to_the_setting(
    upstream: FakeUpstream, model: str, retries: int, calls: int
) -> None:
    service = Service(app_settings(upstream, UPSTREAM_MAX_RETRIES=str(retries)))
    upstream.reset()
    with pytest.raises((errors.UpstreamError, errors.RateLimited)):
        chat(service, model)
    assert len([r for r in upstream.requests if r["path"] == "/v1/chat/completions"]) == calls


@pytest.mark.parametrize("function", ["chat", "embeddings", "images"])
def test_no_retry_when_the_setting_is_zero(upstream: FakeUpstream, function: str) -> None:
    service = Service(app_settings(upstream, UPSTREAM_MAX_RETRIES="0"))
    upstream.reset()
    with pytest.raises(errors.ServiceError):
        if function == "chat":
            chat(service, "error-500")
        elif function == "embeddings":
            asyncio.run(service.embeddings({"texts": ["x"], "model": "error-500"}))
        else:
            asyncio.run(service.generate_images({"prompt": "x", "model": "error-500"}))
    assert len(upstream.requests) == 1


class ClosesFirstConnection:
    """An upstream that, like a server at its keep-alive limit, closes the first connection
    right after reading a request, then answers on the next one."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n")
             if line.lower().startswith(b"content-length")),
            0,
        )  # fmt: skip
        await reader.readexactly(length)
        if self.connections > 1:
            body = (
                b'{"object":"list","model":"m","data":[{"object":"embedding","index":0,'
                b'"embedding":[0.5,0.5]}],"usage":{"prompt_tokens":1,"total_tokens":1}}'
            )
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()


def test_a_connection_closed_before_any_answer_is_retried_once() -> None:
    """With UPSTREAM_MAX_RETRIES=0 too: nothing of the answer had arrived, so trying again on
    a fresh connection cannot send anything twice."""
    upstream = ClosesFirstConnection()

    async def run() -> list[list[float]]:
        server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        from core.config import load_settings

        settings = load_settings(
            environ={
                "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
                "OPENAI_API_KEY": "sk-test-0123456789abcdef0123",
                "UPSTREAM_MAX_RETRIES": "0",
            },
            env_file=None,
        )
        service = Service(settings)
        try:
            result = await service.embeddings({"texts": ["x"], "model": "m"})
        finally:
            await service.aclose()
            server.close()
        return result.vectors

    assert asyncio.run(run()) == [[0.5, 0.5]]
    assert upstream.connections == 2
