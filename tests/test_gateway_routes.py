"""The /v1 surface as OpenAI's: unknown routes and methods in its error shape, one model."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa

from core import db
from core.schemas import ModelInfo, StreamChunk
from tests.conftest import ACCESS_KEY, Served, logged
from tests.upstream import FakeUpstream

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


# ---- the wire: SSE framings, bytes as they came, reply text (LOG_CONTENT) ----------------------


class Wire:
    """Around the fake upstream's app: keeps each request body's bytes as they arrived, and
    rewrites its event streams' framing when asked (`reframe`: bytes -> bytes)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.bodies: list[bytes] = []
        self.reframe: Callable[[bytes], bytes] | None = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def recording() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(b"".join(chunks))
            return message

        streaming = False

        async def reframing(message: dict) -> None:
            nonlocal streaming
            if message["type"] == "http.response.start":
                kind = dict(message.get("headers", [])).get(b"content-type", b"")
                streaming = kind.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and streaming and self.reframe:
                message = {**message, "body": self.reframe(message.get("body", b""))}
            await send(message)

        await self.app(scope, recording, reframing)


@dataclass
class Wired:
    url: str
    core: Any
    wire: Wire

    def user(self, **limits: Any) -> tuple[str, dict[str, str]]:
        name = f"wire-{uuid.uuid4().hex[:8]}"
        _, key = self.core.users.add(name, **limits)
        return name, {"authorization": f"Bearer {key}"}

    def row(self, name: str) -> dict[str, Any]:
        """The user's one ledger row once settled, with the reply text it stored."""
        usage = db.usage.c
        query = sa.select(usage).where(usage.user == name)
        deadline = time.monotonic() + 15
        while True:
            self.core.ledger.flush()
            with self.core.ledger.engine.connect() as conn:
                rows = [r._asdict() for r in conn.execute(query)]
            if (rows and rows[-1]["status"] != "pending") or time.monotonic() > deadline:
                assert len(rows) == 1, rows
                return rows[0]
            time.sleep(0.05)


@pytest.fixture(scope="module")
def wired(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wired]:
    """The app in front of a fake upstream seen through a Wire, with LOG_CONTENT=true."""
    from tests.conftest import UPSTREAM_KEY, app_settings, serve
    from ui.server import create_app

    upstream = FakeUpstream(api_key=UPSTREAM_KEY)
    wire = Wire(upstream.app)
    upstream.app = wire
    upstream.start()
    data_dir = tmp_path_factory.mktemp("wire-data")
    app = create_app(app_settings(upstream, DATA_DIR=str(data_dir), LOG_CONTENT="true"))
    served = serve(app)
    yield Wired(url=served.url, core=app.state.core, wire=wire)
    served.server.should_exit = served.server.force_exit = True
    served.thread.join(timeout=10)
    upstream.stop()


FRAMINGS = {
    "as the fake sends it": lambda b: b,
    "no space after data:": lambda b: b.replace(b"data: ", b"data:"),
    "CRLF line ends": lambda b: b.replace(b"\n", b"\r\n"),
    "CR line ends, no space": lambda b: b.replace(b"data: ", b"data:").replace(b"\n", b"\r"),
}


@pytest.mark.parametrize("framing", list(FRAMINGS))
@pytest.mark.parametrize("include_usage", [True, False])
def test_a_passed_through_stream_ends_in_any_valid_sse_framing(
    wired: Wired, framing: str, include_usage: bool
) -> None:
    name, auth = wired.user()
    wired.wire.reframe = FRAMINGS[framing]
    body = {
        "model": "gpt-4.1-mini",
        "messages": [{"role": "user", "content": "one two three"}],
        "stream": True,
        "stream_options": {"include_usage": include_usage},
    }
    try:
        answer = httpx.post(wired.url + "/v1/chat/completions", headers=auth, json=body)
    finally:
        wired.wire.reframe = None
    assert answer.status_code == 200
    text = answer.text
    assert "error" not in text and "cut off" not in text
    assert text.rstrip().endswith("[DONE]")
    row = wired.row(name)
    assert row["status"] == "ok"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (3, 4)  # the upstream's count
    assert row["completion_text"] == "Echo: one two three"


def test_the_openai_sdk_reads_a_reframed_stream_whole(wired: Wired) -> None:
    _, auth = wired.user()
    sdk = openai.OpenAI(
        base_url=wired.url + "/v1", api_key=auth["authorization"][7:], max_retries=0
    )
    wired.wire.reframe = FRAMINGS["CRLF line ends"]
    try:
        stream = sdk.chat.completions.create(
            model="gpt-4.1-mini",
            messages=[{"role": "user", "content": "four five"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    finally:
        wired.wire.reframe = None
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Echo: four five"
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


# Odd whitespace, an escape, and an integer no 64-bit parser keeps, in a field nobody reads.
ODD_BODY = (
    b'{ "model" :"gpt-4.1-mini",\n\t"messages":[{"role":"user", "content":"caf\\u00e9 au lait"}]'
    b',  "x_vendor_option" : {"seed_of_seeds": 1180591620717411303424, "note": "\\/ok"}%s }'
)


def test_a_body_that_needs_no_change_goes_upstream_byte_for_byte(wired: Wired) -> None:
    name, auth = wired.user()
    sent = ODD_BODY % b""
    answer = httpx.post(wired.url + "/v1/chat/completions", headers=auth, content=sent)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "Echo: café au lait"
    assert wired.wire.bodies[-1] == sent
    # LOG_CONTENT keeps the reply of a call passed through, not streamed too.
    assert wired.row(name)["completion_text"] == "Echo: café au lait"


def test_a_changed_body_changes_only_what_the_service_must(wired: Wired) -> None:
    # A stream: usage is asked for upstream; the rest as the client wrote it.
    _, auth = wired.user()
    sent = ODD_BODY % b', "stream": true'
    answer = httpx.post(wired.url + "/v1/chat/completions", headers=auth, content=sent)
    assert answer.status_code == 200 and answer.text.rstrip().endswith("[DONE]")
    received = wired.wire.bodies[-1]
    assert received.replace(b'"stream_options":{"include_usage":true},', b"", 1) == sent
    # A quota that caps the reply: max_tokens changes, and nothing else.
    _, auth = wired.user(daily_tokens=400)
    sent = ODD_BODY % b',\n "max_tokens" : 100000 '
    answer = httpx.post(wired.url + "/v1/chat/completions", headers=auth, content=sent)
    assert answer.status_code == 200, answer.text
    received = wired.wire.bodies[-1]
    cap = json.loads(received)["max_tokens"]
    assert cap < 400
    assert received == sent.replace(b"100000", str(cap).encode())
    assert json.loads(received)["x_vendor_option"]["seed_of_seeds"] == 2**70  # still an int


# ---- answers the gateway builds: the usage the ledger records, never zeros -----------------------


class Unmetered:
    """A backend whose answers the gateway builds (like Anthropic's, Hugging Face's or the
    embedded one), that reports no usage."""

    name = "unmetered"
    functions = frozenset({"chat", "completion"})
    honours = None
    supports_passthrough = False
    notice = None

    def __init__(self) -> None:
        self.default_models = {"chat": "plain-1", "completion": "plain-1"}

    def cap_param_for(self, model: str | None) -> str:
        return "max_tokens"

    def tokenizer(self, model: str | None) -> None:
        return None

    def count_prompt(self, request: object) -> None:
        return None

    def describe(self) -> str:
        return "a backend that reports no usage"

    async def chat_stream(self, request: Any) -> AsyncIterator[StreamChunk]:
        for word in ("Hello", " there,", " my", " good", " friend"):
            yield StreamChunk(text=word)
        yield StreamChunk(finish_reason="stop")

    completion_stream = chat_stream

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(id="plain-1", kinds=["chat"])]

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        pass


@pytest.fixture(scope="module")
def unmetered(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wired]:
    from core.context import open_core
    from tests.conftest import app_settings, serve
    from ui.server import create_app

    settings = app_settings(upstream, DATA_DIR=str(tmp_path_factory.mktemp("unmetered")))
    app = create_app(settings, open_core(settings, Unmetered()))  # type: ignore[arg-type]
    served = serve(app)
    yield Wired(url=served.url, core=app.state.core, wire=Wire(None))
    served.server.should_exit = served.server.force_exit = True
    served.thread.join(timeout=10)


@pytest.mark.parametrize("stream", [False, True])
def test_a_backend_without_usage_gets_the_ledgers_count_not_zeros(
    unmetered: Wired, stream: bool
) -> None:
    name, auth = unmetered.user()
    sdk = openai.OpenAI(
        base_url=unmetered.url + "/v1", api_key=auth["authorization"][7:], max_retries=0
    )
    messages = [{"role": "user", "content": "Please say hello to my good friend over there"}]
    if stream:
        chunks = list(
            sdk.chat.completions.create(
                model="plain-1",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        usage = chunks[-1].usage
    else:
        usage = sdk.chat.completions.create(model="plain-1", messages=messages).usage
    row = unmetered.row(name)
    assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 0
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        row["prompt_tokens"],
        row["completion_tokens"],
    )
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# ---- paths -------------------------------------------------------------------------------------


def test_a_trailing_slash_is_the_same_call(running_app: Served) -> None:
    body = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "slash"}]}
    answer = httpx.post(running_app.url + "/v1/chat/completions/", headers=AUTH, json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "Echo: slash"
    listed = httpx.get(running_app.url + "/v1/models/", headers=AUTH)
    assert listed.status_code == 200 and listed.json()["object"] == "list"


def test_done_ends_a_passed_through_stream_though_the_upstream_keeps_it_open(
    running_app: Served,
) -> None:
    """An upstream that sends [DONE] and keeps the response open (20 s here): the client gets
    [DONE] at once, and the call is recorded, rather than both waiting for the upstream."""
    body = {"model": "done-then-hold", "messages": [{"role": "user", "content": "hi"}]}
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{running_app.url}/v1/chat/completions",
        headers=AUTH,
        json=body | {"stream": True},
        timeout=30,
    ) as answer:
        lines = [line for line in answer.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    assert time.monotonic() - started < 10  # not the upstream's 20 s


def test_usage_made_up_for_a_stream_that_begins_with_a_comment_is_in_its_own_id(
    running_app: Served,
) -> None:
    """An upstream that sends ": keep-alive" first and no usage: the usage chunk the gateway
    adds carries the stream's id and model (not blanks), and the comment is no reply text."""
    body = {"model": "comment-first", "messages": [{"role": "user", "content": "hi there"}]}
    with httpx.stream(
        "POST",
        f"{running_app.url}/v1/chat/completions",
        headers=AUTH,
        json=body | {"stream": True, "stream_options": {"include_usage": True}},
        timeout=30,
    ) as answer:
        data = [line[5:].strip() for line in answer.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert usage["id"] == chunks[0]["id"] and usage["id"].startswith("chatcmpl-")
    assert usage["model"] == "comment-first"
