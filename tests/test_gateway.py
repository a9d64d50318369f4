"""The OpenAI-compatible /v1 API and /metrics, through the official openai SDK over real HTTP.

The app is served once for this module, on its own database, so the users and quotas made here
do not leak into other tests. The upstream is the real local server of tests/upstream.py.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import openai
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.context import Core
from tests.conftest import ACCESS_KEY, UPSTREAM_KEY, Served, app_settings, serve
from tests.upstream import FakeUpstream, embed

T = TypeVar("T")
CHAT_MODEL = "gpt-4.1-mini"
COMPLETION_MODEL = "gpt-3.5-turbo-instruct"
EMBEDDING_MODEL = "text-embedding-3-small"
HELLO = [{"role": "user", "content": "one two three four five"}]
PNG = b"\x89PNG\r\n\x1a\n"
V1_ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/images/generations"),
    ("GET", "/v1/models"),
]


@dataclass
class Gateway:
    """The served app, its core (users, ledger) and SDK clients made for it."""

    url: str
    core: Core
    clients: list[openai.OpenAI] = field(default_factory=list)

    def sdk(self, key: str = ACCESS_KEY) -> openai.OpenAI:
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)
        self.clients.append(client)
        return client

    def user(self, role: str = "user", **limits: Any) -> tuple[str, str]:
        """A new user with its own key: (name, key)."""
        name = f"gw-{role}-{uuid.uuid4().hex[:8]}"
        _, key = self.core.users.add(name, role=role, **limits)  # type: ignore[arg-type]
        return name, key

    def rows(self, name: str) -> pd.DataFrame:
        return self.core.ledger.rows(users=[name])

    def settled_rows(self, name: str, count: int) -> pd.DataFrame:
        """The user's ledger rows once `count` of them exist and none is pending any more."""

        def settled() -> pd.DataFrame | None:
            rows = self.rows(name)
            done = len(rows) >= count and not (rows["status"] == "pending").any()
            return rows if done else None

        return eventually(settled)

    def metrics(self, key: str | None = ACCESS_KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(self.url + "/metrics", headers=headers, timeout=10)


def eventually(check: Callable[[], T | None], timeout: float = 15.0) -> T:
    """Poll `check` until it returns something truthy (a bound on waiting, not on speed)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    from ui.server import create_app

    data_dir = tmp_path_factory.mktemp("gateway-data")
    # Many deliberate wrong keys here, from one address: keep the lockout out of the way.
    app = create_app(app_settings(upstream, DATA_DIR=str(data_dir), LOGIN_MAX_FAILURES="1000"))
    served: Served = serve(app)
    gateway = Gateway(url=served.url, core=app.state.core)
    yield gateway
    for client in gateway.clients:
        client.close()
    served.stop()


@pytest.fixture(scope="module")
def owner(gateway: Gateway) -> openai.OpenAI:
    """The SDK with the owner's ACCESS_KEY."""
    return gateway.sdk()


@pytest.fixture(scope="module")
def direct(upstream: FakeUpstream) -> Iterator[openai.OpenAI]:
    """The SDK straight on the upstream: what the gateway's answers are compared with."""
    client = openai.OpenAI(base_url=upstream.url, api_key=upstream.api_key, max_retries=0)
    yield client
    client.close()


def bearer(key: str = ACCESS_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def words(n: int, marker: str) -> str:
    return " ".join(f"{marker}{i}" for i in range(n))


def upstream_request(upstream: FakeUpstream, marker: str) -> dict[str, Any]:
    """The upstream's record of the one request whose body contains `marker`."""

    def find() -> dict[str, Any] | None:
        found = [r for r in upstream.requests if marker in json.dumps(r["json"])]
        assert len(found) <= 1
        return found[0] if found else None

    return eventually(find)


def sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The payloads of the `data:` lines of an SSE stream, as they arrive."""
    for line in lines:
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` in a Prometheus text exposition."""
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    return sum(v for lab, v in samples(text, name) if labels.items() <= lab.items())


def in_flight(gateway: Gateway, function: str = "chat") -> float:
    return sample(gateway.metrics().text, "dashboard_in_flight_requests", function=function)


# ---- every endpoint through the SDK ------------------------------------------------------


def test_chat_completion(owner: openai.OpenAI, direct: openai.OpenAI) -> None:
    reply = owner.chat.completions.create(model=CHAT_MODEL, messages=HELLO)
    assert reply.object == "chat.completion"
    assert reply.model == CHAT_MODEL
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "Echo: one two three four five"
    assert reply.choices[0].finish_reason == "stop"
    expected = direct.chat.completions.create(model=CHAT_MODEL, messages=HELLO).usage
    assert reply.usage is not None and expected is not None
    assert reply.usage.model_dump() == expected.model_dump()


def test_chat_passes_the_clients_fields_upstream(
    owner: openai.OpenAI, upstream: FakeUpstream
) -> None:
    marker = uuid.uuid4().hex
    reply = owner.chat.completions.create(
        model="gpt-4o",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": f"hello {marker} world"}]},
        ],
        temperature=0.2,
        max_tokens=3,
        stop=["END"],
        user="someone",
        seed=7,
    )
    assert reply.choices[0].message.content == f"Echo: hello {marker}"
    assert reply.choices[0].finish_reason == "length"
    body = upstream_request(upstream, marker)["json"]
    assert body["model"] == "gpt-4o"
    assert body["temperature"] == 0.2
    assert body["max_tokens"] == 3
    assert body["stop"] == ["END"]
    # Fields the service does not know are passed on as the client sent them.
    assert body["user"] == "someone" and body["seed"] == 7
    assert body["messages"][1]["content"] == [{"type": "text", "text": f"hello {marker} world"}]


def test_chat_stream_with_usage(owner: openai.OpenAI, direct: openai.OpenAI) -> None:
    stream = owner.chat.completions.create(
        model=CHAT_MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 5
    assert "".join(texts) == "Echo: one two three four five"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # One usage chunk, the last, with no choices; its numbers are the upstream's.
    *content, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.choices and c.usage is None for c in content)
    expected = direct.chat.completions.create(model=CHAT_MODEL, messages=HELLO).usage
    assert expected is not None
    assert last.usage.model_dump() == expected.model_dump()


def test_chat_stream_without_usage_sends_no_usage_chunk(
    owner: openai.OpenAI, upstream: FakeUpstream
) -> None:
    marker = uuid.uuid4().hex
    messages = [{"role": "user", "content": f"one two {marker}"}]
    chunks = list(owner.chat.completions.create(model=CHAT_MODEL, messages=messages, stream=True))
    assert len(chunks) >= 4
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == f"Echo: one two {marker}"
    # The service still asked the upstream for usage, for the ledger.
    body = upstream_request(upstream, marker)["json"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_completions_stream_and_not(owner: openai.OpenAI, direct: openai.OpenAI) -> None:
    whole = owner.completions.create(model=COMPLETION_MODEL, prompt="alpha beta gamma")
    assert whole.object == "text_completion"
    assert whole.choices[0].text == " completion of: alpha beta gamma"
    expected = direct.completions.create(model=COMPLETION_MODEL, prompt="alpha beta gamma")
    assert whole.usage is not None and expected.usage is not None
    assert whole.usage.model_dump() == expected.usage.model_dump()

    chunks = list(
        owner.completions.create(
            model=COMPLETION_MODEL,
            prompt="alpha beta gamma",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, last = chunks
    assert len(content) >= 4
    assert "".join(c.choices[0].text for c in content) == " completion of: alpha beta gamma"
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == expected.usage.model_dump()

    plain = list(owner.completions.create(model=COMPLETION_MODEL, prompt="delta", stream=True))
    assert plain and all(c.choices and c.usage is None for c in plain)


def test_embeddings_with_the_sdk_default_base64(
    owner: openai.OpenAI, upstream: FakeUpstream
) -> None:
    marker = uuid.uuid4().hex
    texts = [f"the cat sat {marker}", "stock markets fell"]
    result = owner.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    # The SDK asked for base64 and decoded it: the upstream's vectors, as floats.
    assert upstream_request(upstream, marker)["json"]["encoding_format"] == "base64"
    assert result.model == EMBEDDING_MODEL
    assert [d.index for d in result.data] == [0, 1]
    for item, text in zip(result.data, texts, strict=True):
        assert item.embedding == pytest.approx(embed(text), abs=1e-6)
    assert result.usage.prompt_tokens == result.usage.total_tokens == 7


def test_embeddings_as_floats_with_dimensions(owner: openai.OpenAI) -> None:
    result = owner.embeddings.create(
        model=EMBEDDING_MODEL, input="hello there", encoding_format="float", dimensions=16
    )
    [item] = result.data
    assert len(item.embedding) == 16
    assert item.embedding == pytest.approx(embed("hello there", 16), abs=1e-6)


def test_dall_e_sizes_and_qualities_pass_through(owner: openai.OpenAI, upstream) -> None:
    result = owner.images.generate(
        model="dall-e-3", prompt="a fox", size="1792x1024", quality="hd", response_format="url"
    )
    assert len(result.data) == 1
    sent = [r["json"] for r in upstream.requests if r["path"] == "/v1/images/generations"][-1]
    assert (sent["model"], sent["size"], sent["quality"]) == ("dall-e-3", "1792x1024", "hd")
    assert sent["response_format"] == "url"  # the client's choice, passed on as it was


def test_images_are_base64_pngs(owner: openai.OpenAI) -> None:
    result = owner.images.generate(model="gpt-image-1", prompt="a lighthouse", n=2, size="auto")
    assert len(result.data) == 2
    images = [base64.b64decode(item.b64_json or "") for item in result.data]
    assert all(image.startswith(PNG) for image in images)
    assert images[0] != images[1]


def test_models_list(owner: openai.OpenAI) -> None:
    models = list(owner.models.list())
    ids = {m.id for m in models}
    assert {CHAT_MODEL, COMPLETION_MODEL, EMBEDDING_MODEL, "gpt-image-1"} <= ids
    assert all(m.object == "model" and m.owned_by for m in models)
    assert owner.models.list().data[0].model_dump().keys() >= {"id", "object", "created"}


def test_raw_stream_is_server_sent_events_ending_with_done(gateway: Gateway) -> None:
    body = {"model": CHAT_MODEL, "messages": HELLO, "stream": True}
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, headers=bearer(), timeout=30
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["choices"] for line in lines[:-1])


def test_stream_is_passed_on_while_the_upstream_is_still_sending(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    """The first chunk reaches the client before the upstream has finished its reply."""
    marker = uuid.uuid4().hex[:8]
    messages = [{"role": "user", "content": words(300, marker)}]  # ~300 writes, 10 ms apart
    body = {"model": CHAT_MODEL, "messages": messages, "stream": True}
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, headers=bearer(), timeout=30
    ) as response:
        events = sse_data(response.iter_lines())
        first_text = ""
        while not first_text:
            chunk = json.loads(next(events))
            first_text = chunk["choices"][0]["delta"].get("content") or ""
        # Here the client holds the reply's first words; the upstream is still streaming.
        record = upstream_request(upstream, marker)
        assert not record["completed"] and not record["ended"]
        rest = list(events)
    assert first_text == "Echo: "
    assert rest[-1] == "[DONE]"
    assert eventually(lambda: record["ended"]) and record["completed"]


# ---- authentication ----------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), V1_ROUTES)
def test_no_key_is_401_in_openais_shape(
    gateway: Gateway, upstream: FakeUpstream, method: str, path: str
) -> None:
    before = len(upstream.requests)
    for headers in ({}, {"Authorization": "Basic " + ACCESS_KEY}, {"Authorization": "Bearer"}):
        response = httpx.request(
            method, gateway.url + path, json={"model": CHAT_MODEL}, headers=headers
        )
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key"
        assert error["type"] == "authentication_error"
        assert "Authorization: Bearer" in error["message"]
    assert len(upstream.requests) == before


def test_a_wrong_key_is_401(gateway: Gateway) -> None:
    for key in ("wrong-key", ACCESS_KEY + "x", "dk_1_not-the-real-key"):
        with pytest.raises(openai.AuthenticationError) as info:
            gateway.sdk(key).models.list()
        assert info.value.status_code == 401
        assert info.value.code == "invalid_api_key"
        assert isinstance(info.value.body, dict) and info.value.body["message"]
        assert key not in info.value.message


def test_user_keys_disabled_and_rotated(gateway: Gateway) -> None:
    name, key = gateway.user()
    client = gateway.sdk(key)
    assert client.chat.completions.create(model=CHAT_MODEL, messages=HELLO).choices

    gateway.core.users.set_disabled(name, True)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=CHAT_MODEL, messages=HELLO)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    gateway.core.users.set_disabled(name, False)
    assert client.embeddings.create(model=EMBEDDING_MODEL, input="back again").data

    _, new_key = gateway.core.users.rotate(name)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=CHAT_MODEL, messages=HELLO)
    fresh = gateway.sdk(new_key)
    assert fresh.chat.completions.create(model=CHAT_MODEL, messages=HELLO).choices
    # The calls are the user's own in the ledger.
    rows = gateway.settled_rows(name, 3)
    assert set(rows["source"]) == {"v1"}
    assert list(rows["function"]) == ["chat", "embedding", "chat"]


def test_the_owner_key_works(gateway: Gateway) -> None:
    reply = gateway.sdk(ACCESS_KEY).chat.completions.create(model=CHAT_MODEL, messages=HELLO)
    assert reply.choices[0].message.content == "Echo: one two three four five"
    rows = gateway.settled_rows("owner", 1)
    assert rows.iloc[-1]["source"] == "v1"


def test_a_gradio_session_alone_does_not_open_v1(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as browser:
        login = browser.post("/login", data={"username": "tester", "password": ACCESS_KEY})
        assert login.status_code == 200
        assert browser.cookies  # the session cookie
        assert browser.get("/config").status_code == 200  # it opens Gradio...
        for method, path in V1_ROUTES:  # ...but not the API
            response = browser.request(method, path, json={"model": CHAT_MODEL})
            assert response.status_code == 401, path
            assert response.json()["error"]["code"] == "invalid_api_key"


def test_a_bearer_key_alone_does_not_open_gradio(gateway: Gateway) -> None:
    headers = bearer(ACCESS_KEY)
    assert httpx.get(gateway.url + "/config", headers=headers).status_code == 401
    response = httpx.post(
        gateway.url + "/gradio_api/call/chat", json={"data": [HELLO]}, headers=headers
    )
    assert response.status_code == 401
    assert httpx.get(gateway.url + "/gradio_api/info", headers=headers).status_code == 401


# ---- quotas and the ledger ---------------------------------------------------------------


def test_requests_per_minute_quota_is_a_429_with_retry_after(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    name, key = gateway.user(rpm=2)
    client = gateway.sdk(key)
    client.chat.completions.create(model=CHAT_MODEL, messages=HELLO)
    client.embeddings.create(model=EMBEDDING_MODEL, input="one")
    before = len(upstream.requests)

    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages=HELLO)
    error = info.value
    assert error.status_code == 429
    assert error.code == "quota_exceeded"
    assert 0 < int(error.response.headers["retry-after"]) <= 60
    assert "2 requests per minute" in error.message
    assert f"Try again in {error.response.headers['retry-after']} s" in error.message
    assert "request id: req_" in error.message

    # A stream is refused the same way, as a plain 429 before any event.
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, stream=True)
    assert len(upstream.requests) == before  # refused calls never reach the upstream

    rows = gateway.settled_rows(name, 4)
    assert list(rows["status"]) == ["ok", "ok", "refused", "refused"]
    assert set(rows["source"]) == {"v1"}
    assert list(rows["function"]) == ["chat", "embedding", "chat", "chat"]
    assert rows.iloc[2]["request_id"] in error.message


def test_daily_token_quota_is_a_429(gateway: Gateway) -> None:
    name, key = gateway.user(daily_tokens=5)
    with pytest.raises(openai.RateLimitError) as info:
        gateway.sdk(key).completions.create(model=COMPLETION_MODEL, prompt=words(40, "w"))
    assert "daily quota of 5 tokens" in info.value.message
    # More than the whole day's quota: it never fits, so no Retry-After says it will.
    assert "at any time" in info.value.message
    assert info.value.code == "insufficient_quota"
    assert "retry-after" not in info.value.response.headers
    [row] = gateway.settled_rows(name, 1).to_dict("records")
    assert (row["status"], row["source"], row["function"]) == ("refused", "v1", "completion")


def test_ledger_rows_of_v1_calls_have_the_upstreams_tokens(
    gateway: Gateway, direct: openai.OpenAI
) -> None:
    name, key = gateway.user()
    client = gateway.sdk(key)
    chat = client.chat.completions.create(model="gpt-4o", messages=HELLO)
    list(client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, stream=True))
    list(client.completions.create(model=COMPLETION_MODEL, prompt="alpha beta", stream=True))
    client.embeddings.create(model=EMBEDDING_MODEL, input=["one two three"])
    client.images.generate(model="gpt-image-1", prompt="a red apple", n=2)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="error-500", messages=HELLO)

    rows = gateway.settled_rows(name, 6).to_dict("records")
    assert [r["source"] for r in rows] == ["v1"] * 6
    assert [(r["function"], r["model"]) for r in rows] == [
        ("chat", "gpt-4o"),
        ("chat", CHAT_MODEL),
        ("completion", COMPLETION_MODEL),
        ("embedding", EMBEDDING_MODEL),
        ("image", "gpt-image-1"),
        ("chat", "error-500"),
    ]
    assert [r["status"] for r in rows] == ["ok"] * 5 + ["UpstreamError"]
    usage = chat.usage
    assert usage is not None
    tokens = [(r["prompt_tokens"], r["completion_tokens"]) for r in rows]
    expected_completion = direct.completions.create(model=COMPLETION_MODEL, prompt="alpha beta")
    assert expected_completion.usage is not None
    assert tokens[:5] == [
        (usage.prompt_tokens, usage.completion_tokens),
        # A stream without include_usage is still counted with the upstream's own numbers.
        (usage.prompt_tokens, usage.completion_tokens),
        (expected_completion.usage.prompt_tokens, expected_completion.usage.completion_tokens),
        (3, 0),
        (3, 32),  # images report input_tokens and output_tokens
    ]
    assert all(r["request_id"].startswith("req_") for r in rows)
    assert len({r["request_id"] for r in rows}) == 6


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "error", "status", "words_"),
    [
        ("error-400", openai.BadRequestError, 400, "Invalid value for 'temperature'"),
        ("no-such-model", openai.NotFoundError, 404, "no-such-model"),
        ("error-429", openai.RateLimitError, 429, "rate limiting"),
        ("error-500", openai.InternalServerError, 502, "status 500"),
        ("error-503", openai.InternalServerError, 502, "status 503"),
        # The upstream refusing *our* key is the server's fault, not a 401 for the client.
        ("error-401", openai.InternalServerError, 502, "OPENAI_API_KEY"),
    ],
)
def test_upstream_errors_map_to_openai_errors(
    owner: openai.OpenAI, model: str, error: type[openai.APIStatusError], status: int, words_: str
) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: owner.chat.completions.create(model=model, messages=HELLO),
        lambda: owner.chat.completions.create(model=model, messages=HELLO, stream=True),
        lambda: owner.completions.create(model=model, prompt="cat"),
        lambda: owner.embeddings.create(model=model, input="cat"),
        lambda: owner.images.generate(model=model, prompt="cat"),
    ]
    for call in calls:
        with pytest.raises(error) as info:
            call()
        exc = info.value
        assert exc.status_code == status
        assert words_ in exc.message
        assert "request id: req_" in exc.message
        assert isinstance(exc.body, dict) and set(exc.body) == {"message", "type", "param", "code"}
        assert UPSTREAM_KEY not in exc.response.text
        if status == 429:
            assert exc.response.headers["retry-after"] == "1"  # the upstream's own
    if model == "no-such-model":
        assert exc.code == "model_not_found"


@pytest.mark.parametrize(
    ("model", "words_"),
    [("cut-stream", "cut off"), ("error-stream", "The server had an error")],
)
def test_a_stream_failing_midway_raises_in_the_sdk(
    gateway: Gateway, model: str, words_: str
) -> None:
    name, key = gateway.user()
    stream = gateway.sdk(key).chat.completions.create(model=model, messages=HELLO, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert not isinstance(info.value, openai.APIStatusError)  # status 200 was already sent
    assert words_ in info.value.message
    assert "request id: req_" in info.value.message
    assert "".join(received).startswith("Echo:")  # what came before the failure got through
    [row] = gateway.settled_rows(name, 1).to_dict("records")
    assert row["status"] == "StreamInterrupted" and row["source"] == "v1"


def test_a_stream_failing_midway_ends_with_an_error_event(gateway: Gateway) -> None:
    body = {"model": "cut-stream", "messages": HELLO, "stream": True}
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, headers=bearer(), timeout=30
    ) as response:
        assert response.status_code == 200
        payloads = list(sse_data(response.iter_lines()))
    assert "[DONE]" not in payloads
    error = json.loads(payloads[-1])["error"]
    assert error["type"] == "server_error" and "cut off" in error["message"]


# ---- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "words_"),
    [
        (b"{nope", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'[{"model": "gpt-4.1-mini"}]', "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_400(
    gateway: Gateway, upstream: FakeUpstream, content: bytes, words_: str
) -> None:
    before = len(upstream.requests)
    for path in ("/v1/chat/completions", "/v1/embeddings"):
        response = httpx.post(
            gateway.url + path,
            content=content,
            headers={**bearer(), "Content-Type": "application/json"},
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert words_ in error["message"]
    assert len(upstream.requests) == before


def test_a_bad_field_is_400_naming_it(owner: openai.OpenAI, upstream: FakeUpstream) -> None:
    before = len(upstream.requests)
    with pytest.raises(openai.BadRequestError) as info:
        owner.chat.completions.create(model=CHAT_MODEL, messages=HELLO, temperature=5)
    assert info.value.status_code == 400
    assert info.value.param == "temperature"
    assert "temperature" in info.value.message
    assert "request id: req_" in info.value.message

    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: owner.chat.completions.create(model=CHAT_MODEL, messages=[]), "messages"),
        (
            lambda: owner.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "robot", "content": "hi"}]
            ),
            "messages",
        ),
        (lambda: owner.chat.completions.create(model="bad model!", messages=HELLO), "model"),
        (
            lambda: owner.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=0),
            "max_tokens",
        ),
        (
            lambda: owner.chat.completions.create(
                model=CHAT_MODEL, messages=HELLO, max_completion_tokens=0
            ),
            "max_completion_tokens",
        ),
        (lambda: owner.completions.create(model=COMPLETION_MODEL, prompt=[[1.5]]), "prompt"),  # type: ignore[list-item]
        (lambda: owner.images.generate(model="gpt-image-1", prompt="cat", n=11), "n"),
        (
            lambda: owner.images.generate(model="gpt-image-1", prompt="cat", size="2x2"),  # type: ignore[arg-type]
            "size",
        ),
    ]
    for call, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.param == param
        assert param in info.value.message
    assert len(upstream.requests) == before  # bad input never reaches the upstream


def test_missing_messages_is_400_naming_them(gateway: Gateway) -> None:
    response = httpx.post(
        gateway.url + "/v1/chat/completions", json={"model": CHAT_MODEL}, headers=bearer()
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages"
    assert "messages" in error["message"]
    assert error["type"] == "invalid_request_error"


def test_bad_embedding_input_is_400_naming_the_field(owner: openai.OpenAI) -> None:
    for bad in ([], ["fine", ""], [[-1]]):
        with pytest.raises(openai.BadRequestError) as info:
            owner.embeddings.create(model=EMBEDDING_MODEL, input=bad)
        assert info.value.param == "input"
        assert "input" in info.value.message


def test_bad_stream_options_is_400(gateway: Gateway) -> None:
    body = {"model": CHAT_MODEL, "messages": HELLO, "stream": True, "stream_options": "yes"}
    response = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=bearer())
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream_options"


# ---- a client that leaves ----------------------------------------------------------------


def test_a_client_that_disconnects_cancels_the_upstream_call(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    name, key = gateway.user()
    marker = uuid.uuid4().hex[:8]
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": words(300, marker)}],  # ~3 s of writes
        "stream": True,
    }
    with (
        httpx.Client(timeout=30) as http,
        http.stream(
            "POST", gateway.url + "/v1/chat/completions", json=body, headers=bearer(key)
        ) as response,
    ):
        assert response.status_code == 200
        received = list(itertools.islice(sse_data(response.iter_lines()), 2))
    assert len(received) == 2  # then the connection is closed, mid-reply

    # The upstream saw its response end before the whole reply was sent...
    record = upstream_request(upstream, marker)
    assert eventually(lambda: record["ended"])
    assert not record["completed"]
    # ...and the call is settled as cancelled, counted, and no longer in flight.
    [row] = gateway.settled_rows(name, 1).to_dict("records")
    assert row["status"] == "cancelled" and row["source"] == "v1"
    assert eventually(lambda: in_flight(gateway) == 0)
    text = gateway.metrics().text
    assert sample(text, "dashboard_requests_total", status="cancelled", source="v1") >= 1


# ---- /metrics ----------------------------------------------------------------------------


def test_metrics_need_an_admin_key(gateway: Gateway) -> None:
    _, user_key = gateway.user()
    _, admin_key = gateway.user(role="admin")
    for key in (None, "wrong", user_key):
        response = gateway.metrics(key)
        assert response.status_code == 401
        assert "admin key" in response.json()["error"]["message"]
    for key in (ACCESS_KEY, admin_key):
        response = gateway.metrics(key)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")


def test_metrics_count_requests_latency_tokens_and_errors(
    gateway: Gateway, owner: openai.OpenAI
) -> None:
    before = gateway.metrics().text
    labels = {"function": "chat", "model": CHAT_MODEL}
    reply = owner.chat.completions.create(model=CHAT_MODEL, messages=HELLO)
    with pytest.raises(openai.NotFoundError):
        owner.chat.completions.create(model="no-such-model", messages=HELLO)
    after = gateway.metrics().text
    usage = reply.usage
    assert usage is not None

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert 'dashboard_requests_total{function="chat",model="gpt-4.1-mini",' in after
    assert delta("dashboard_requests_total", **labels, source="v1", status="ok") == 1
    assert delta("dashboard_request_duration_seconds_count", function="chat", source="v1") == 2
    assert samples(after, "dashboard_request_duration_seconds_bucket")
    assert delta("dashboard_tokens_total", **labels, kind="prompt") == usage.prompt_tokens
    assert delta("dashboard_tokens_total", **labels, kind="completion") == usage.completion_tokens
    # A model the backend does not list is counted, under "other" (labels stay bounded).
    errors = {"function": "chat", "model": "other", "error": "ModelNotFound"}
    assert delta("dashboard_errors_total", **errors) == 1
    assert samples(after, "dashboard_in_flight_requests")
    assert ACCESS_KEY not in after and UPSTREAM_KEY not in after


def test_metrics_show_calls_in_flight(gateway: Gateway, owner: openai.OpenAI) -> None:
    assert eventually(lambda: in_flight(gateway) == 0)
    # The upstream takes 2 s before it answers: the call is in flight meanwhile.
    call = threading.Thread(
        target=lambda: owner.chat.completions.create(model="slow-2.0", messages=HELLO)
    )
    call.start()
    try:
        assert eventually(lambda: in_flight(gateway) == 1)
    finally:
        call.join(timeout=30)
    assert eventually(lambda: in_flight(gateway) == 0)


def test_metrics_public(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    from ui.server import create_app

    data_dir = tmp_path_factory.mktemp("metrics-public-data")
    settings = app_settings(upstream, DATA_DIR=str(data_dir), METRICS_PUBLIC="true")
    served = serve(create_app(settings))
    try:
        response = httpx.get(served.url + "/metrics")
        assert response.status_code == 200
        assert "dashboard_in_flight_requests" in response.text
        # Only the metrics are public: the API still wants a key.
        assert httpx.get(served.url + "/v1/models").status_code == 401
    finally:
        served.stop()


def test_every_v1_answer_names_its_request_id(owner: openai.OpenAI) -> None:
    sdk = owner
    reply = sdk.chat.completions.with_raw_response.create(
        model="gpt-4.1-mini", messages=[{"role": "user", "content": "id please"}]
    )
    request_id = reply.headers["x-request-id"]
    assert request_id.startswith("req_")
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(
            model="gpt-4.1-mini", messages=[{"role": "user", "content": "x"}], temperature=9
        )
    # The same id the error message quotes (and the log and the ledger carry).
    assert bad.value.request_id and f"(request id: {bad.value.request_id})" in str(bad.value)
