"""One HTTP behaviour toward the upstream on every path: idle timeouts, never a limit on a
whole answer, and retries made only before the first byte of an answer (over real HTTP)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from core import errors
from core.endpoints import ENDPOINTS
from core.service import Service
from tests.conftest import app_settings
from tests.upstream import DroppingUpstream, FakeUpstream


def chat(service: Service, model: str, words: str = "hello there", **extra: object) -> str:
    async def run() -> str:
        text = ""
        request = {"messages": [{"role": "user", "content": words}], "model": model, **extra}
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


HI = [{"role": "user", "content": "hi"}]


async def call(service: Service, form: str) -> str:
    """One call as `form` makes it: the /v1 relay (JSON or a stream), or a typed call."""
    body: dict = {"model": "gpt-4.1-mini", "messages": HI}
    fields = ENDPOINTS["chat"].fields(body)
    if form == "v1":
        return (await service.forward_json("chat", fields, body)).decode()
    if form == "v1-stream":
        body = {**body, "stream": True}
        pieces = service.forward_stream("chat", fields, body)
        return b"".join([piece async for piece in pieces]).decode()
    if form == "typed-stream":
        return "".join([chunk.text async for chunk in service.chat_stream(fields)])
    result = await service.embeddings({"texts": ["x"], "model": "text-embedding-3-small"})
    return str(result.vectors)


def calls(service: Service, form: str, times: int = 1) -> list[str]:
    """`times` calls one after the other, on one event loop (so on one connection pool)."""

    async def run() -> list[str]:
        try:
            return [await call(service, form) for _ in range(times)]
        finally:
            await service.aclose()

    return asyncio.run(run())


@pytest.mark.parametrize("retries", ["0", "2"])
@pytest.mark.parametrize("form", ["v1", "v1-stream", "typed-stream", "typed-embeddings"])
def test_a_new_connection_closed_without_an_answer_is_not_sent_again(
    retries: str, form: str
) -> None:
    """The upstream read the whole request on a connection made for it, then closed it: it
    may have done and billed the work, so the request is not sent again (whatever
    UPSTREAM_MAX_RETRIES says), and the error says what happened."""
    with DroppingUpstream(lambda connection, request: True) as up:
        service = Service(app_settings(up, UPSTREAM_MAX_RETRIES=retries))
        with pytest.raises(errors.UpstreamClosed) as info:
            calls(service, form)
    assert len(up.requests) == 1
    assert info.value.status == 502
    message = str(info.value)
    assert "closed the connection without answering" in message and "cut off" not in message
    assert info.value.request_id and info.value.request_id in message


def test_the_client_hears_a_502_and_the_upstream_one_request(tmp_path) -> None:
    """Over the /v1 gateway, with the default UPSTREAM_MAX_RETRIES=2: stream and not."""
    from tests.conftest import ACCESS_KEY, serve
    from ui.server import create_app

    with DroppingUpstream(lambda connection, request: True) as up:
        settings = app_settings(up, UPSTREAM_MAX_RETRIES="2", DATA_DIR=str(tmp_path))
        served = serve(create_app(settings))
        try:
            for stream in (False, True):
                before = len(up.requests)
                answer = httpx.post(
                    f"{served.url}/v1/chat/completions",
                    headers={"authorization": f"Bearer {ACCESS_KEY}"},
                    json={"model": "gpt-4.1-mini", "messages": HI, "stream": stream},
                    timeout=30,
                )
                assert answer.status_code == 502, (stream, answer.text)
                error = answer.json()["error"]
                assert "closed the connection without answering" in error["message"]
                assert answer.headers["x-request-id"] in error["message"]
                assert len(up.requests) == before + 1
        finally:
            served.stop()


@pytest.mark.parametrize("form", ["v1", "v1-stream", "typed-stream", "typed-embeddings"])
def test_a_reused_connection_the_upstream_closed_is_retried_once_on_a_new_one(form: str) -> None:
    """A server at its keep-alive limit closes an idle connection just as it is reused (about
    one call in 40): the call goes again on a new connection, even with UPSTREAM_MAX_RETRIES=0,
    and succeeds; a second drop, on that new connection, is not retried."""
    # The first connection answers its first request and drops its second.
    with DroppingUpstream(lambda connection, request: connection == 1 and request == 2) as up:
        service = Service(app_settings(up, UPSTREAM_MAX_RETRIES="0"))

        first, second = calls(service, form, 2)
    assert first == second and ("Hi" in first or "0.5" in first)
    assert [(r["connection"], r["dropped"]) for r in up.requests] == [
        (1, False),
        (1, True),
        (2, False),
    ]

    # Stale, then the new connection drops too: one retry only, and the error says so.
    with DroppingUpstream(lambda connection, request: request == 2 or connection > 1) as up:
        service = Service(app_settings(up, UPSTREAM_MAX_RETRIES="2"))

        with pytest.raises(errors.UpstreamClosed):
            calls(service, form, 2)
    assert len(up.requests) == 3


def test_a_reasoning_models_cap_is_max_completion_tokens_on_any_host() -> None:
    """OpenAI's reasoning models refuse max_tokens on Azure OpenAI as on OpenAI (the fake
    refuses it too): the cap goes by the model's name, not the host (here not OpenAI's)."""
    with FakeUpstream(models=["o3-mini", "gpt-5-mini", "gpt-4.1-mini"]) as up:
        service = Service(app_settings(up))
        for model, param in [
            ("o3-mini", "max_completion_tokens"),
            ("gpt-5-mini", "max_completion_tokens"),
            ("gpt-4.1-mini", "max_tokens"),  # a compatible server's model: what they all know
        ]:
            up.reset()
            assert chat(service, model, "one two three four", max_tokens=3) == "Echo: one two"
            sent = up.requests[0]["json"]
            caps = {k: v for k, v in sent.items() if k in ("max_tokens", "max_completion_tokens")}
            assert caps == {param: 3}, sent


def test_a_reasoning_models_quota_cap_over_v1_is_max_completion_tokens(tmp_path) -> None:
    """A user whose quota caps the reply, calling an OpenAI reasoning model that is not on
    api.openai.com (Azure OpenAI's, say): the cap must go as max_completion_tokens."""
    import openai

    from tests.conftest import serve
    from ui.server import create_app

    with FakeUpstream(models=["o3-mini"]) as up:
        app = create_app(app_settings(up, DATA_DIR=str(tmp_path)))
        served = serve(app)
        try:
            _, key = app.state.core.users.add("reasoning-capped", daily_tokens=2_000)
            sdk = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
            answer = sdk.chat.completions.create(model="o3-mini", messages=HI)
            assert answer.choices[0].message.content == "Echo: hi"
            sent = [r for r in up.requests if r["path"] == "/v1/chat/completions"][-1]["json"]
            assert "max_completion_tokens" in sent and "max_tokens" not in sent, sent
        finally:
            served.stop()
