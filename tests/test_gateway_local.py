"""The /v1 API on the embedded model (no key, no URL): the openai SDK works unchanged."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from core.config import load_settings
from core.context import Core
from tests.conftest import ACCESS_KEY, serve

pytestmark = pytest.mark.local_model
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
SAY_HELLO = [{"role": "user", "content": "Say hello."}]


@dataclass
class LocalGateway:
    url: str
    core: Core
    client: openai.OpenAI


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGateway]:
    from ui.server import create_app

    data_dir = tmp_path_factory.mktemp("gateway-local-data")
    # No OPENAI_API_KEY, no OPENAI_BASE_URL: PROVIDER=auto picks the embedded model.
    settings = load_settings(
        environ={"ACCESS_KEY": ACCESS_KEY, "DATA_DIR": str(data_dir)}, env_file=None
    )
    app = create_app(settings)
    served = serve(app)
    client = openai.OpenAI(
        base_url=served.url + "/v1", api_key=ACCESS_KEY, max_retries=0, timeout=120
    )
    yield LocalGateway(url=served.url, core=app.state.core, client=client)
    client.close()
    served.stop()


def test_chat_completion(local: LocalGateway) -> None:
    reply = local.client.chat.completions.create(model=MODEL_ID, messages=SAY_HELLO, max_tokens=8)
    assert reply.object == "chat.completion"
    assert reply.model == MODEL_ID
    assert reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert (reply.choices[0].message.content or "").strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_with_and_without_usage(local: LocalGateway) -> None:
    stream = local.client.chat.completions.create(
        model=MODEL_ID,
        messages=SAY_HELLO,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    *content, last = list(stream)
    assert len(content) > 1
    assert all(c.object == "chat.completion.chunk" and c.choices for c in content)
    assert "".join(c.choices[0].delta.content or "" for c in content).strip()
    assert content[-1].choices[0].finish_reason in ("stop", "length")
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens > 0 and 0 < last.usage.completion_tokens <= 8

    plain = list(
        local.client.chat.completions.create(
            model=MODEL_ID, messages=SAY_HELLO, max_tokens=8, stream=True
        )
    )
    assert len(plain) > 1
    assert all(c.choices and c.usage is None for c in plain)


def test_raw_stream_ends_with_done(local: LocalGateway) -> None:
    body = {"model": MODEL_ID, "messages": SAY_HELLO, "max_tokens": 4, "stream": True}
    headers = {"Authorization": f"Bearer {ACCESS_KEY}"}
    with httpx.stream(
        "POST", local.url + "/v1/chat/completions", json=body, headers=headers, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["choices"] for line in lines[:-1])


def test_completions_stream_and_not(local: LocalGateway) -> None:
    whole = local.client.completions.create(model=MODEL_ID, prompt="The sky is", max_tokens=6)
    assert whole.object == "text_completion"
    assert whole.choices[0].text.strip()
    assert whole.usage is not None and whole.usage.completion_tokens > 0
    chunks = list(
        local.client.completions.create(
            model=MODEL_ID, prompt="The sky is", max_tokens=6, stream=True
        )
    )
    assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks).strip()


def test_embeddings_base64_default_and_float(local: LocalGateway) -> None:
    texts = ["a cat", "a kitten"]
    default = local.client.embeddings.create(model=MODEL_ID, input=texts)  # base64 on the wire
    floats = local.client.embeddings.create(model=MODEL_ID, input=texts, encoding_format="float")
    assert default.model == floats.model == MODEL_ID
    assert [d.index for d in default.data] == [0, 1]
    dims = len(floats.data[0].embedding)
    assert dims > 0 and all(len(d.embedding) == dims for d in default.data + floats.data)
    for a, b in zip(default.data, floats.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, rel=1e-5, abs=1e-6)  # float32 vs JSON
    assert default.usage.prompt_tokens > 0


def test_models(local: LocalGateway) -> None:
    [model] = list(local.client.models.list())
    assert model.id == MODEL_ID and model.object == "model"
    assert model.owned_by == "local"


def test_images_say_there_is_no_image_model(local: LocalGateway) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        local.client.images.generate(model=MODEL_ID, prompt="a red apple")
    assert not 200 <= info.value.status_code < 300
    assert "no image model" in info.value.message
    assert "OPENAI_API_KEY" in info.value.message


def test_bad_input_and_quotas_on_the_embedded_model(local: LocalGateway) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        local.client.chat.completions.create(model=MODEL_ID, messages=SAY_HELLO, temperature=5)
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        local.client.embeddings.create(model=MODEL_ID, input=[])
    assert info.value.param == "input"

    name = f"local-{uuid.uuid4().hex[:8]}"
    _, key = local.core.users.add(name, rpm=1)
    with openai.OpenAI(base_url=local.url + "/v1", api_key=key, max_retries=0) as client:
        client.chat.completions.create(model=MODEL_ID, messages=SAY_HELLO, max_tokens=2)
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(
                model=MODEL_ID, messages=SAY_HELLO, max_tokens=2, stream=True
            )
    assert int(limited.value.response.headers["retry-after"]) > 0
    rows = local.core.ledger.rows(users=[name]).to_dict("records")
    assert [(r["source"], r["function"], r["status"]) for r in rows] == [
        ("v1", "chat", "ok"),
        ("v1", "chat", "refused"),
    ]
    assert rows[0]["prompt_tokens"] > 0 and rows[0]["completion_tokens"] > 0
