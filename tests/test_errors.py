"""Every upstream failure becomes a typed, readable error with a request id (over real HTTP)."""

from __future__ import annotations

import asyncio

import pytest

from core import errors
from core.service import Service
from tests.conftest import ACCESS_KEY, UPSTREAM_KEY, app_settings, free_port


def chat(service: Service, model: str, **extra) -> str:
    async def run() -> str:
        text = ""
        request = {"messages": [{"role": "user", "content": "hello there"}], "model": model}
        async for chunk in service.chat_stream({**request, **extra}):
            text += chunk.text
        return text

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("model", "error", "words"),
    [
        ("error-401", errors.UpstreamAuthError, "OPENAI_API_KEY"),
        ("error-403", errors.UpstreamForbidden, "not allowed to use this model"),
        ("no-such-model", errors.ModelNotFound, "no-such-model"),
        ("error-429", errors.RateLimited, "rate limiting"),
        ("error-500", errors.UpstreamError, "500"),
        ("error-503", errors.UpstreamError, "503"),
        ("error-400", errors.UpstreamRejected, "temperature"),
        ("cut-stream", errors.StreamInterrupted, "cut off"),
        ("error-stream", errors.StreamInterrupted, "error"),
    ],
)
def test_upstream_failures_are_mapped(service: Service, model: str, error, words: str) -> None:
    with pytest.raises(error) as info:
        chat(service, model)
    message = str(info.value)
    assert words in message
    assert info.value.request_id and info.value.request_id.startswith("req_")
    assert f"(request id: {info.value.request_id})" in message
    assert UPSTREAM_KEY not in message and ACCESS_KEY not in message


def test_rate_limit_carries_retry_after(service: Service) -> None:
    with pytest.raises(errors.RateLimited) as info:
        chat(service, "error-429")
    assert info.value.retry_after == 1.0


def test_timeout_is_mapped(upstream) -> None:
    service = Service(app_settings(upstream, REQUEST_TIMEOUT="1"))
    with pytest.raises(errors.UpstreamTimeout) as info:
        chat(service, "slow-3")
    assert "REQUEST_TIMEOUT" in str(info.value)


def test_connection_refused_is_mapped(upstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    service = Service(app_settings(upstream, OPENAI_BASE_URL=dead))
    with pytest.raises(errors.UpstreamUnavailable) as info:
        chat(service, "gpt-4.1-mini")
    assert "OPENAI_BASE_URL" in str(info.value)
    assert asyncio.run(service.health())["reachable"] is False


def test_validation_happens_before_the_upstream(service: Service, upstream) -> None:
    upstream.reset()
    with pytest.raises(errors.InvalidRequest) as info:
        chat(service, "gpt-4.1-mini", temperature=5)
    assert "temperature" in str(info.value)
    assert upstream.requests == []


def test_missing_key_gives_a_clear_message_not_a_crash() -> None:
    from core.config import load_settings

    service = Service(load_settings(environ={"PROVIDER": "openai"}, env_file=None))
    with pytest.raises(errors.NotConfigured) as info:
        chat(service, "gpt-4.1-mini")
    assert "OPENAI_API_KEY" in str(info.value)
    health = asyncio.run(service.health())
    assert health["reachable"] is False and health["status"] == "degraded"


def test_upstream_request_errors_are_logged_with_the_request_id(service: Service) -> None:
    from tests.conftest import logged

    with pytest.raises(errors.ModelNotFound) as info:
        chat(service, "no-such-model")
    assert f"request_id={info.value.request_id} user=system source=core function=chat" in logged()


@pytest.mark.parametrize(
    ("status", "body", "error", "words", "code"),
    [
        (422, {"detail": [{"loc": ["body", "n"], "msg": "too big"}]}, errors.UpstreamRejected,
         "body.n: too big", None),
        (400, {"error": {"message": "bad", "code": 400, "type": "invalid"}},
         errors.UpstreamRejected, "bad", "400"),
        (413, {"error": "Payload Too Large"}, errors.UpstreamTooLarge, "Payload Too Large",
         "request_too_large"),
        (502, "not json", errors.UpstreamError, "status 502", None),
    ],
)  # fmt: skip
def test_error_bodies_of_other_servers_keep_their_reason(status, body, error, words, code) -> None:
    """FastAPI's detail lists (vLLM, llama.cpp's server), numeric codes, bare strings."""
    from core.providers.openai import map_status

    mapped = map_status(status, body, model="m", path="chat/completions")
    assert isinstance(mapped, error) and words in str(mapped)
    assert mapped.code == code and mapped.status == error.status


def test_a_web_page_where_the_api_should_be_is_the_upstreams_fault(running_app, client) -> None:
    """A base URL that points at a web page answers 200 with HTML: every path says so and
    what to check, instead of relaying the page or calling the stream "cut off"."""
    import httpx
    from gradio_client.exceptions import AppError

    auth = {"authorization": f"Bearer {ACCESS_KEY}"}
    hi = [{"role": "user", "content": "hi"}]
    calls = [
        ("chat/completions", {"model": "html-page", "messages": hi}),
        ("chat/completions", {"model": "html-page", "messages": hi, "stream": True}),
        ("completions", {"model": "html-page", "prompt": "hi"}),
        ("completions", {"model": "html-page", "prompt": "hi", "stream": True}),
        ("embeddings", {"model": "html-page", "input": "hi"}),
    ]
    for path, body in calls:
        answer = httpx.post(f"{running_app.url}/v1/{path}", headers=auth, json=body)
        assert answer.status_code == 502, (path, body)
        message = answer.json()["error"]["message"]
        assert "text/html" in message and "OPENAI_BASE_URL" in message, message
        assert "Welcome to the portal" not in answer.text
    with pytest.raises(AppError, match=r"text/html.*OPENAI_BASE_URL"):
        client.predict(messages=hi, model="html-page", api_name="/chat")
    with pytest.raises(AppError, match="text/html"):
        client.predict(texts=["hi"], model="html-page", api_name="/embeddings")


AUTH = {"authorization": f"Bearer {ACCESS_KEY}"}
HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("model", "status", "kind", "code", "param", "words"),
    [
        ("error-429-quota", 429, "insufficient_quota", "insufficient_quota", None,
         "exceeded your current quota"),
        ("error-429-quota-type", 429, "insufficient_quota", "insufficient_quota", None,
         "exceeded your current quota"),
        ("error-429", 429, "requests", "rate_limit_exceeded", None, "Rate limit reached"),
        ("error-400-context", 400, "invalid_request_error", "context_length_exceeded",
         "messages", "maximum context length is 8192"),
        ("error-500-code", 502, "server_error", "internal_x", None, "status 500: Internal"),
        ("error-404-param", 404, "invalid_request_error", "model_not_found", "model",
         "The model does not exist."),
        ("error-403-type", 403, "org_verification", "unverified_organization", None,
         "must be verified"),
    ],
)  # fmt: skip
def test_upstream_errors_keep_their_fields_over_v1(
    running_app, model, status, kind, code, param, words
) -> None:
    """What a client acts on comes through as the upstream said it: type, code, param, the
    message (a 5xx says its status), with our request id; out of quota, over the context and
    rate limited stay apart."""
    import httpx

    for path, body in [
        ("chat/completions", {"model": model, "messages": HI}),
        ("chat/completions", {"model": model, "messages": HI, "stream": True}),
        ("embeddings", {"model": model, "input": "hi"}),
    ]:
        answer = httpx.post(f"{running_app.url}/v1/{path}", headers=AUTH, json=body)
        assert answer.status_code == status, (path, body, answer.text)
        error = answer.json()["error"]
        assert (error["type"], error["code"], error["param"]) == (kind, code, param), error
        assert words in error["message"]
        assert f"(request id: {answer.headers['x-request-id']})" in error["message"]
        assert UPSTREAM_KEY not in answer.text


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("malformed-cut", "not valid JSON"),
        ("malformed-empty", "without the"),
        ("malformed-nolist", "without the"),
    ],
)
def test_a_malformed_answer_is_the_upstreams_fault(running_app, model: str, words: str) -> None:
    """A 200 whose JSON is cut short, empty, or lacks its results list is not relayed: a 502
    that says what was wrong."""
    import httpx

    for path, body, key in [
        ("chat/completions", {"model": model, "messages": HI}, "choices"),
        ("completions", {"model": model, "prompt": "hi"}, "choices"),
        ("embeddings", {"model": model, "input": "hi"}, "data"),
        ("images/generations", {"model": model, "prompt": "a cat"}, "data"),
    ]:
        answer = httpx.post(f"{running_app.url}/v1/{path}", headers=AUTH, json=body)
        assert answer.status_code == 502, (path, answer.text)
        message = answer.json()["error"]["message"]
        assert f"The upstream answered /{path}" in message and words in message, message
        if words == "without the":
            assert f"'{key}' list" in message
        assert "on our side" not in message


@pytest.mark.parametrize(
    ("content", "fine"),
    [
        (b'{"choices": []}', True),
        (b'\xef\xbb\xbf {"choices": [{"index": 0}]}\n', True),
        (b'{"id": "x", "choices": [', False),
        (b'{"choices": {}}', False),
        (b'{"error": {"message": "busy"}}', False),
    ],
)
def test_the_answer_check_reads_small_answers_whole(content: bytes, fine: bool) -> None:
    from core.providers.openai import _check_answer

    if fine:
        _check_answer("chat/completions", content)
    else:
        with pytest.raises(errors.UpstreamError, match="/chat/completions"):
            _check_answer("chat/completions", content)


def test_the_answer_check_of_a_large_answer_is_its_shape(monkeypatch) -> None:
    """Past PARSED_UP_TO (a big batch of embeddings) it is not parsed, only looked at."""
    from core.providers import openai as provider

    monkeypatch.setattr(provider, "PARSED_UP_TO", 10)
    provider._check_answer("embeddings", b'{"object": "list", "data": [{"embedding": [1]}]}')
    with pytest.raises(errors.UpstreamError, match="not valid JSON"):
        provider._check_answer("embeddings", b'{"object": "list", "data": [{"embedding": [1]')
    with pytest.raises(errors.UpstreamError, match="'data' list"):
        provider._check_answer("embeddings", b'{"object": "list", "model": "m"}')
