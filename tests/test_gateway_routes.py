"""The /v1 surface as OpenAI's: unknown routes and methods in its error shape, one model."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import ACCESS_KEY, Served, logged

AUTH = {"authorization": f"Bearer {ACCESS_KEY}"}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v1/responses", 404),
        ("GET", "/v1/files", 404),
        ("POST", "/v1/audio/speech", 404),
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/embeddings", 405),
        ("OPTIONS", "/v1/chat/completions", 405),
        ("GET", "/v1", 404),
    ],
)
def test_unknown_routes_and_methods_answer_in_openais_shape(
    running_app: Served, method: str, path: str, status: int
) -> None:
    answer = httpx.request(method, running_app.url + path, headers=AUTH, json={})
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert f"{method} {path}" in error["message"]


def test_one_model_can_be_retrieved(running_app: Served) -> None:
    sdk = openai.OpenAI(base_url=running_app.url + "/v1", api_key=ACCESS_KEY, max_retries=0)
    model = sdk.models.retrieve("gpt-4.1-mini")
    assert model.id == "gpt-4.1-mini" and model.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        sdk.models.retrieve("no-such/model")
    assert info.value.code == "model_not_found"


@pytest.fixture(scope="module")
def tight(upstream, tmp_path_factory):
    """An app that serves two model calls at once."""
    from tests.conftest import app_settings, serve
    from ui.server import create_app

    data_dir = tmp_path_factory.mktemp("tight-data")
    app = create_app(app_settings(upstream, DATA_DIR=str(data_dir), MAX_CONCURRENCY="2"))
    served = serve(app)
    yield served, app
    served.server.should_exit = served.server.force_exit = True
    served.thread.join(timeout=10)


def test_max_concurrency_bounds_the_v1_path_too(tight, upstream) -> None:
    import concurrent.futures

    served, _ = tight
    sdk = openai.OpenAI(base_url=served.url + "/v1", api_key=ACCESS_KEY, max_retries=0)
    upstream.wait_idle()  # the high-water mark counts this test's calls only
    upstream.reset()

    def call(_: int) -> str:
        hi = [{"role": "user", "content": "hi"}]
        reply = sdk.chat.completions.create(model="slow-0.5", messages=hi)
        return reply.choices[0].message.content or ""

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        replies = list(pool.map(call, range(6)))
    assert replies == ["Echo: hi"] * 6  # all served, the rest waited their turn
    assert upstream.max_in_flight == 2


def test_a_client_that_leaves_a_non_streaming_call_cancels_it(tight, upstream) -> None:
    import time

    served, app = tight
    upstream.reset()
    body = {"model": "slow-3", "messages": [{"role": "user", "content": "hi"}]}
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/chat/completions", headers=AUTH, json=body, timeout=0.5)
    ledger = app.state.core.ledger
    # The call ends (cancelled) long before the upstream's 3 s answer would have come.
    while time.monotonic() - started < 2.5:
        rows = ledger.rows(users=["owner"])
        if len(rows) and rows.iloc[-1]["status"] == "cancelled":
            break
        time.sleep(0.1)
    assert rows.iloc[-1]["status"] == "cancelled"
    assert time.monotonic() - started < 2.5


def test_one_vector_per_token_is_the_upstreams_fault(running_app: Served) -> None:
    sdk = openai.OpenAI(base_url=running_app.url + "/v1", api_key=ACCESS_KEY, max_retries=0)
    for encoding in ("float", "base64"):
        with pytest.raises(openai.APIStatusError) as info:
            sdk.embeddings.create(
                model="embed-per-token", input="two words", encoding_format=encoding
            )
        assert info.value.status_code == 502
        assert "one vector per token" in info.value.message


def test_an_unexpected_failure_is_a_500_in_openais_shape_and_the_server_keeps_serving(
    tight, monkeypatch
) -> None:
    served, app = tight
    service = app.state.core.service

    async def broken(**_: object) -> None:
        raise RuntimeError("internal detail sk-should-not-leak")

    monkeypatch.setattr(service, "list_models", broken)
    before = len(logged())
    answer = httpx.get(served.url + "/v1/models", headers=AUTH)
    assert answer.status_code == 500
    error = answer.json()["error"]
    assert error["type"] == "server_error"
    assert "sk-should-not-leak" not in answer.text and "Traceback" not in answer.text
    assert "GET /v1/models failed" in logged()[before:]
    monkeypatch.undo()
    assert httpx.get(served.url + "/v1/models", headers=AUTH).status_code == 200
