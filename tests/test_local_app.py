"""With no key and no URL, the whole app (UI endpoints and API) runs on the embedded model."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from core.config import load_settings
from tests.conftest import ACCESS_KEY, Served, serve

pytestmark = pytest.mark.local_model
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture(scope="module")
def local_app() -> Iterator[Served]:
    from ui.server import create_app

    # No OPENAI_API_KEY, no OPENAI_BASE_URL: PROVIDER=auto must pick the embedded model.
    settings = load_settings(environ={"ACCESS_KEY": ACCESS_KEY}, env_file=None)
    served = serve(create_app(settings))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def local_client(local_app: Served) -> Client:
    return Client(local_app.url, auth=("offline", ACCESS_KEY), verbose=False)


def test_health_names_the_local_provider(local_app: Served) -> None:
    body = httpx.get(f"{local_app.url}/health").json()
    assert body["provider"] == "local"
    assert body["reachable"] is True
    assert MODEL_ID in body["upstream"]


def test_chat_and_completion_answer_offline(local_client: Client) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    for _ in range(2):  # stateless: the same client, twice
        reply = local_client.predict(messages=messages, max_tokens=16, api_name="/chat")
        assert reply.strip()
    outputs = list(local_client.submit(messages=messages, max_tokens=16, api_name="/chat"))
    assert len(outputs) > 1
    text = local_client.predict(prompt="The sky is", max_tokens=8, api_name="/completion")
    assert text.strip()


def test_embeddings_and_models_offline(local_client: Client) -> None:
    result = local_client.predict(texts=["a cat", "a kitten"], api_name="/embeddings")
    assert result["model"] == MODEL_ID and len(result["vectors"]) == 2
    [model] = local_client.predict(api_name="/models")
    assert model["id"] == MODEL_ID
    assert model["kinds"] == ["chat", "completion", "embedding"]


def test_images_say_how_to_configure_a_backend(local_client: Client) -> None:
    with pytest.raises(AppError, match="no image model") as info:
        local_client.predict(prompt="a red apple", api_name="/generate_image")
    assert "OPENAI_API_KEY" in str(info.value)
