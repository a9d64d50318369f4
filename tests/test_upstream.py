"""Self-test of the fake OpenAI-compatible upstream, driven by the real openai SDK."""

from __future__ import annotations

import base64
import math
import threading
from collections.abc import Iterator

import openai
import pytest

from tests.upstream import FakeUpstream


@pytest.fixture(scope="module")
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream().start() as server:
        yield server


@pytest.fixture
def client(up: FakeUpstream) -> openai.OpenAI:
    up.reset()
    return openai.OpenAI(base_url=up.url, api_key=up.api_key, max_retries=0)


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.hypot(*a) / math.hypot(*b)


def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert "gpt-4.1-mini" in ids and "text-embedding-3-small" in ids and "error-429" in ids


def test_chat_non_streaming_records_request(client: openai.OpenAI, up: FakeUpstream) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4.1-mini",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there world"}]},
        ],
        max_tokens=3,
    )
    assert raw.headers["x-request-id"].startswith("req_up_")
    out = raw.parse()
    assert out.choices[0].message.content == "Echo: hello there"
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (5, 3)
    [req] = up.requests
    assert req["path"] == "/v1/chat/completions" and req["method"] == "POST"
    assert req["headers"]["authorization"] == f"Bearer {up.api_key}"
    assert req["json"]["max_tokens"] == 3


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "one two three four"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: one two three four"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_completions_streaming(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="a b", stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == " completion of: a b"
    assert len(chunks) == 5  # four words + the finish chunk
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    texts = ["the cat sat on the mat", "a cat sat on a mat", "quantum chromodynamics lattice"]
    out = client.embeddings.create(
        model="text-embedding-3-small", input=texts, dimensions=16, encoding_format="float"
    )
    cat, cat2, qcd = (d.embedding for d in out.data)
    assert len(cat) == 16 and math.isclose(math.hypot(*cat), 1.0)
    assert _cos(cat, cat2) > _cos(cat, qcd) and _cos(cat, cat2) > _cos(cat2, qcd)
    # The SDK asks for base64 by default and decodes it itself.
    decoded = client.embeddings.create(
        model="text-embedding-3-small", input=texts[0], dimensions=16
    )
    assert decoded.data[0].embedding == pytest.approx(cat, abs=1e-6)
    assert out.usage.prompt_tokens == 15


def test_images_are_png(client: openai.OpenAI) -> None:
    out = client.images.generate(model="gpt-image-1", prompt="a red fox", n=2, size="1024x1024")
    assert len(out.data) == 2
    assert all(base64.b64decode(d.b64_json).startswith(b"\x89PNG\r\n\x1a\n") for d in out.data)


def test_wrong_key_is_401(up: FakeUpstream) -> None:
    bad = openai.OpenAI(base_url=up.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.code == "invalid_api_key"


@pytest.mark.parametrize(
    ("model", "exc"),
    [
        ("no-such-model", openai.NotFoundError),
        ("error-400", openai.BadRequestError),
        ("error-401", openai.AuthenticationError),
        ("error-403", openai.PermissionDeniedError),
        ("error-429", openai.RateLimitError),
        ("error-500", openai.InternalServerError),
        ("error-503", openai.InternalServerError),
    ],
)
def test_error_modes(client: openai.OpenAI, model: str, exc: type[Exception]) -> None:
    with pytest.raises(exc) as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert err.value.response.headers["x-request-id"].startswith("req_up_")
    if model == "error-429":
        assert err.value.response.headers["retry-after"] == "1"


def test_cut_stream(client: openai.OpenAI) -> None:
    # The connection drops after two word chunks without finish_reason or [DONE]. The SDK first
    # yields the chunks it received, then raises openai.APIConnectionError("Connection error.")
    # whose __cause__ is the HTTP client's RemoteProtocolError (incomplete chunked read).
    got: list[str] = []
    stream = client.chat.completions.create(
        model="cut-stream", messages=[{"role": "user", "content": "a b c d"}], stream=True
    )
    with pytest.raises(openai.APIConnectionError) as err:
        for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "incomplete chunked read" in str(err.value.__cause__)
    assert "".join(got) == "Echo: a "


def test_error_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="error-stream", messages=[{"role": "user", "content": "a b"}], stream=True
    )
    # The SDK raises a plain openai.APIError (no status code) for an in-stream error event.
    with pytest.raises(openai.APIError, match="server had an error") as err:
        list(stream)
    assert type(err.value) is openai.APIError


def test_slow_requests_overlap(client: openai.OpenAI, up: FakeUpstream) -> None:
    def call() -> None:
        client.chat.completions.create(
            model="slow-0.5", messages=[{"role": "user", "content": "x"}]
        )

    threads = [threading.Thread(target=call) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert up.max_in_flight >= 5 and len(up.requests) == 5
