"""The Gradio API through gradio_client over real HTTP: every endpoint, twice, streaming, errors."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from starlette.routing import Mount

from tests.conftest import ACCESS_KEY
from tests.upstream import FakeUpstream

HELLO = [{"role": "user", "content": "one two three four five"}]
ENDPOINTS = {
    "/chat",
    "/completion",
    "/generate_image",
    "/embeddings",
    "/models",
    "/conversations",
    "/conversation",
    "/conversation_markdown",
    "/delete_conversation",
    "/usage",
    "/users",
}


def test_the_api_lists_exactly_the_named_endpoints(client: Client) -> None:
    info = client.view_api(print_info=False, return_format="dict")
    assert set(info["named_endpoints"]) == ENDPOINTS
    # UI-only events (the tabs' buttons, page load) are not offered to clients.
    assert info["unnamed_endpoints"] == {}


def test_chat_twice_on_the_same_client(client: Client) -> None:
    for word in ("first", "second"):
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "earlier question"},
            {"role": "assistant", "content": "earlier answer"},
            {"role": "user", "content": f"the {word} call"},
        ]
        assert client.predict(messages=messages, api_name="/chat") == f"Echo: the {word} call"


def test_chat_streams_in_several_chunks(client: Client) -> None:
    # The upstream sends a word every 10 ms; the API sends the text so far every 30 ms.
    words = " ".join(f"w{i}" for i in range(20))
    job = client.submit(messages=[{"role": "user", "content": words}], api_name="/chat")
    outputs = list(job)
    assert len(outputs) >= 3
    assert outputs[-1] == f"Echo: {words}"
    # Each value is the reply so far: it only grows.
    assert all(b.startswith(a) for a, b in itertools.pairwise(outputs))


def test_chat_passes_settings_upstream(client: Client, upstream: FakeUpstream) -> None:
    upstream.reset()
    reply = client.predict(
        messages=HELLO,
        model="gpt-4o",
        temperature=0.2,
        max_tokens=3,
        stop=["END"],
        api_name="/chat",
    )
    assert reply == "Echo: one two"
    body = upstream.requests[-1]["json"]
    assert body["model"] == "gpt-4o"
    assert body["temperature"] == 0.2
    assert body["max_tokens"] == 3
    assert body["stop"] == ["END"]
    assert body["stream"] is True


def test_completion_twice_and_streaming(client: Client) -> None:
    assert (
        client.predict(prompt="alpha beta", api_name="/completion") == " completion of: alpha beta"
    )
    prompt = " ".join(f"p{i}" for i in range(20))
    outputs = list(client.submit(prompt=prompt, api_name="/completion"))
    assert len(outputs) >= 3 and outputs[-1] == f" completion of: {prompt}"


def test_generate_image_returns_files_the_client_can_open(client: Client) -> None:
    for n in (2, 1):
        paths = client.predict(
            prompt="a lighthouse", n=n, size="1024x1024", api_name="/generate_image"
        )
        assert len(paths) == n
        for path in paths:
            assert Path(path).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_embeddings_twice(client: Client) -> None:
    for texts in (["the cat sat", "the cat sat down", "stock markets fell"], ["hello"]):
        result = client.predict(texts=texts, dimensions=16, api_name="/embeddings")
        assert result["model"] == "text-embedding-3-small"
        assert result["dimensions"] == 16
        assert len(result["vectors"]) == len(texts)
        assert all(len(v) == 16 for v in result["vectors"])
        assert result["usage"]["total_tokens"] > 0


def test_models_twice(client: Client) -> None:
    for _ in range(2):
        models = client.predict(api_name="/models")
        by_id = {m["id"]: m for m in models}
        assert by_id["gpt-4.1-mini"]["kind"] == "chat"
        assert by_id["text-embedding-3-small"]["kind"] == "embedding"
        assert by_id["gpt-image-1"]["kind"] == "image"
        assert by_id["whisper-1"]["kind"] == "audio"
        assert set(by_id["gpt-4o"]) >= {"id", "owned_by", "created", "kind"}


@pytest.mark.parametrize(
    ("kwargs", "api_name", "words"),
    [
        ({"messages": HELLO, "temperature": 3}, "/chat", "temperature"),
        ({"messages": []}, "/chat", "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "/chat", "role"),
        ({"prompt": "x", "temperature": -1}, "/completion", "temperature"),
        ({"prompt": "cat", "n": 11}, "/generate_image", "n"),
        ({"prompt": "cat", "size": "2x2"}, "/generate_image", "size"),
        ({"texts": ["a"] * 2049}, "/embeddings", "texts"),
        ({"messages": HELLO, "model": "no-such-model"}, "/chat", "no-such-model"),
        ({"messages": HELLO, "model": "error-429"}, "/chat", "rate limiting"),
        ({"prompt": "cat", "model": "error-500"}, "/generate_image", "500"),
    ],
)
def test_bad_input_and_upstream_errors_give_clear_messages(client, kwargs, api_name, words):
    with pytest.raises(AppError) as info:
        client.predict(**kwargs, api_name=api_name)
    message = str(info.value)
    assert words in message
    assert "request id: req_" in message
    assert "Traceback" not in message
    # And the server keeps serving the same client.
    assert client.predict(messages=HELLO, api_name="/chat").startswith("Echo:")


def test_twenty_chats_run_at_once(client: Client, upstream: FakeUpstream) -> None:
    """Against a slow upstream (2 s, slack for client-side stagger), twenty calls overlap."""
    upstream.reset()
    messages = [{"role": "user", "content": "in parallel"}]
    with ThreadPoolExecutor(max_workers=20) as pool:
        jobs = [
            pool.submit(client.predict, messages=messages, model="slow-2.0", api_name="/chat")
            for _ in range(20)
        ]
        replies = [job.result(timeout=120) for job in jobs]
    assert replies == ["Echo: in parallel"] * 20
    assert upstream.max_in_flight == 20


def test_gradio_monitoring_is_off_and_keeps_no_per_event_analytics(running_app, client) -> None:
    """The app has its own metrics and Usage tab. Gradio's /monitoring is off, and its queue
    keeps one analytics record instead of rebuilding a DataFrame of 10,000 after every event."""
    for _ in range(3):
        client.predict(api_name="/models")
    with httpx.Client(base_url=running_app.url) as http:
        assert http.post("/login", data={"username": "tester", "password": ACCESS_KEY}).is_success
        assert http.get("/monitoring/summary").status_code == 403
    mount = next(r for r in running_app.server.config.app.dashboard.routes if isinstance(r, Mount))
    queue = mount.app.get_blocks()._queue
    assert len(queue.event_analytics) <= 1
    assert queue.cached_event_analytics_summary == {"functions": {}}


def test_chat_takes_openai_content_parts_and_gradio_history(client: Client) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello parts"}]}]
    assert client.predict(messages=parts, api_name="/chat") == "Echo: hello parts"
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}], "metadata": None,
         "options": None},
        {"role": "assistant", "content": [{"type": "text", "text": "Echo: hi"}], "metadata": {}},
        {"role": "user", "content": "and again", "metadata": None},
    ]  # fmt: skip
    assert client.predict(messages=history, api_name="/chat") == "Echo: and again"
