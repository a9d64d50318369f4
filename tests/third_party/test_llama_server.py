"""Our app in front of llama-cpp-python's own OpenAI-compatible server (a real third party).

Everything goes over real HTTP: the openai SDK against the app's /v1, and gradio_client against
its named API endpoints; the app forwards to `python -m llama_cpp.server` on the bundled GGUF.
"""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from gradio_client import Client

from tests.third_party.conftest import ALIAS_ID, LLAMA_KEY, PATH_ID, LlamaServer

pytestmark = pytest.mark.local_model
SAY_HELLO = [{"role": "user", "content": "Say hello."}]
DIMENSIONS = 576  # SmolLM2-135M's hidden size


def test_the_llama_server_lists_both_ids(llama_server: LlamaServer) -> None:
    headers = {"Authorization": f"Bearer {LLAMA_KEY}"}
    body = httpx.get(llama_server.url + "/models", headers=headers, timeout=10).json()
    assert [m["id"] for m in body["data"]] == [PATH_ID, ALIAS_ID]
    # Its key is checked: the app must be sending OPENAI_API_KEY for anything below to pass.
    assert httpx.get(llama_server.url + "/models", timeout=10).status_code == 401


def test_models_lists_the_upstream_ids(llama_sdk: openai.OpenAI) -> None:
    ids = [m.id for m in llama_sdk.models.list()]
    assert ALIAS_ID in ids
    assert PATH_ID in ids


def test_chat(llama_sdk: openai.OpenAI) -> None:
    reply = llama_sdk.chat.completions.create(model=ALIAS_ID, messages=SAY_HELLO, max_tokens=8)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert (reply.choices[0].message.content or "").strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_without_usage(llama_sdk: openai.OpenAI) -> None:
    chunks = list(
        llama_sdk.chat.completions.create(
            model=ALIAS_ID, messages=SAY_HELLO, max_tokens=8, stream=True
        )
    )
    assert len(chunks) > 1
    assert all(c.object == "chat.completion.chunk" and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in chunks)


def test_completion(llama_sdk: openai.OpenAI) -> None:
    reply = llama_sdk.completions.create(model=ALIAS_ID, prompt="The sky is", max_tokens=8)
    assert reply.object == "text_completion"
    assert reply.choices[0].text.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8

    chunks = list(
        llama_sdk.completions.create(model=ALIAS_ID, prompt="The sky is", max_tokens=8, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip()


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector]


def test_embeddings_of_a_string_and_a_list(llama_sdk: openai.OpenAI) -> None:
    # The SDK's default asks for base64; the answer must decode to the same floats either way.
    one = llama_sdk.embeddings.create(model=ALIAS_ID, input="a cat")
    [vector] = [d.embedding for d in one.data]
    assert len(vector) == DIMENSIONS and all(isinstance(x, float) for x in vector)
    assert one.usage.prompt_tokens > 0

    many = llama_sdk.embeddings.create(
        model=ALIAS_ID, input=["a cat", "stock market"], encoding_format="float"
    )
    assert [d.index for d in many.data] == [0, 1]
    cat, market = (d.embedding for d in many.data)
    assert len(cat) == len(market) == DIMENSIONS
    assert _unit(cat) == pytest.approx(_unit(vector), abs=1e-4)
    assert _unit(cat) != pytest.approx(_unit(market), abs=1e-2)


def test_gradio_chat_and_completion(llama_gradio: Client) -> None:
    for _ in range(2):  # stateless: the same client twice
        reply = llama_gradio.predict(messages=SAY_HELLO, max_tokens=8, api_name="/chat")
        assert isinstance(reply, str) and reply.strip()
    text = llama_gradio.predict(prompt="The sky is", max_tokens=8, api_name="/completion")
    assert isinstance(text, str) and text.strip()


def test_gradio_embeddings_and_models(llama_gradio: Client) -> None:
    result = llama_gradio.predict(texts=["a cat", "a kitten"], api_name="/embeddings")
    assert len(result["vectors"]) == 2
    assert all(len(v) == DIMENSIONS for v in result["vectors"])
    ids = [m["id"] for m in llama_gradio.predict(api_name="/models")]
    assert ALIAS_ID in ids
