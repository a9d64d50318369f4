"""What an OpenAI client expects of the app in front of llama_cpp.server, which the app once
got wrong (issue 11): path-like model ids, a clear error for a missing endpoint, a usage chunk
the upstream does not send. Each docstring says what the client got before the fix.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from tests.conftest import ACCESS_KEY, Served
from tests.third_party.conftest import (
    ALIAS_ID,
    PATH_ID,
    LlamaServer,
    llama_settings,
    serve_app,
)

pytestmark = pytest.mark.local_model
SAY_HELLO = [{"role": "user", "content": "Say hello."}]


def test_chat_stream_with_usage(llama_sdk: openai.OpenAI) -> None:
    """llama_cpp.server ignores stream_options and sends no usage chunk; the client asked for
    one, so the last chunk must carry the usage with `choices == []`.

    Before the fix: the app passed the upstream's events on as they were; the last chunk was
    the one with finish_reason "length" and no usage."""
    *content, last = list(
        llama_sdk.chat.completions.create(
            model=ALIAS_ID,
            messages=SAY_HELLO,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in content if c.choices).strip()
    assert last.choices == [], last
    assert last.usage is not None
    assert last.usage.prompt_tokens > 0 and 0 < last.usage.completion_tokens <= 8


def test_every_listed_model_id_can_be_used(llama_sdk: openai.OpenAI) -> None:
    """The app lists the llama server's ids; a client picks one and uses it.

    Before the fix: the path-like id is listed, then refused with 400 "Invalid input: model: String
    should match pattern '^[A-Za-z0-9][A-Za-z0-9._:/@+\\-]{0,127}$'"."""
    for model in llama_sdk.models.list():
        reply = llama_sdk.chat.completions.create(model=model.id, messages=SAY_HELLO, max_tokens=2)
        assert reply.choices[0].message.content is not None, model.id


def test_the_default_path_like_id_over_v1(llama_sdk: openai.OpenAI) -> None:
    """The id llama_cpp.server gives a model by default is its absolute path.

    Before the fix: 400 "Invalid input: model: String should match pattern ..." (a leading '/')."""
    reply = llama_sdk.chat.completions.create(model=PATH_ID, messages=SAY_HELLO, max_tokens=4)
    assert (reply.choices[0].message.content or "").strip()
    vectors = llama_sdk.embeddings.create(model=PATH_ID, input="a cat", encoding_format="float")
    assert len(vectors.data[0].embedding) > 0


def test_the_default_path_like_id_over_gradio(llama_gradio: Client) -> None:
    """Before the fix: AppError "Invalid input: model: String should match pattern ..."."""
    reply = llama_gradio.predict(messages=SAY_HELLO, model=PATH_ID, max_tokens=4, api_name="/chat")
    assert isinstance(reply, str) and reply.strip()


@pytest.fixture(scope="module")
def path_id_app(
    llama_server: LlamaServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """The app configured with the server's default ids (CHAT_MODEL=/.../x.gguf and so on).

    Before the fix: load_settings raised ConfigError "CHAT_MODEL (got '/...gguf'): String
    should match pattern ...; allowed: a model name of letters, digits and . _ - : / @ + (at
    most 128)"."""
    data_dir = tmp_path_factory.mktemp("llama-path-app-data")
    served = serve_app(llama_settings(llama_server, data_dir, PATH_ID))
    yield served
    served.stop()


def test_the_app_starts_with_path_like_default_models(path_id_app: Served) -> None:
    client = openai.OpenAI(
        base_url=path_id_app.url + "/v1", api_key=ACCESS_KEY, max_retries=0, timeout=120
    )
    with client:
        reply = client.chat.completions.create(model=PATH_ID, messages=SAY_HELLO, max_tokens=4)
        assert (reply.choices[0].message.content or "").strip()
    gradio = Client(
        path_id_app.url, auth=("tester", ACCESS_KEY), verbose=False, analytics_enabled=False
    )
    try:
        assert gradio.predict(messages=SAY_HELLO, max_tokens=4, api_name="/chat").strip()
    finally:
        gradio.close()


def test_images_give_a_clear_error_over_v1(llama_sdk: openai.OpenAI, llama_app: Served) -> None:
    """llama_cpp.server has no /v1/images/generations: it answers 404 {"detail": "Not Found"}.
    The model exists (the app lists it): the error must say images are not available there.

    Before the fix: 404, code "model_not_found", "The upstream has no model
    'HuggingFaceTB/SmolLM2-135M-Instruct', or this key has no access to it. Pick one from the
    Models tab."."""
    with pytest.raises(openai.APIStatusError) as info:
        llama_sdk.images.generate(model=ALIAS_ID, prompt="a red apple")
    error = info.value
    assert error.status_code in (400, 404, 501), (error.status_code, error.body)
    assert error.code != "model_not_found", error.body
    message = str(error.message)
    assert "image" in message.lower(), message
    assert "no model" not in message.lower(), message
    # The app still serves afterwards.
    assert llama_sdk.models.list().data


def test_images_give_a_clear_error_over_gradio(llama_gradio: Client) -> None:
    """Before the fix: AppError "The upstream has no model 'HuggingFaceTB/SmolLM2-135M-Instruct', or
    this key has no access to it. Pick one from the Models tab."."""
    with pytest.raises(AppError) as info:
        llama_gradio.predict(prompt="a red apple", model=ALIAS_ID, api_name="/generate_image")
    message = str(info.value)
    assert "image" in message.lower(), message
    assert "no model" not in message.lower(), message
