"""With no key and no URL, the whole app (UI endpoints and API) runs on the embedded model."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from core.config import load_settings
from tests.conftest import ACCESS_KEY, Served, free_port, serve

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


def test_an_empty_completion_prompt_starts_afresh(local_client: Client) -> None:
    text = local_client.predict(prompt="", max_tokens=4, api_name="/completion")
    assert isinstance(text, str)


def test_images_say_how_to_configure_a_backend(local_client: Client) -> None:
    with pytest.raises(AppError, match="no image model") as info:
        local_client.predict(prompt="a red apple", api_name="/generate_image")
    assert "OPENAI_API_KEY" in str(info.value)


# ---- schemas that used to crash the process (a segfault in libllama.so) or hang the model -----

ROOT = Path(__file__).resolve().parents[1]
SAY_HI = [{"role": "user", "content": "Say hi."}]


def _schema(schema: dict) -> dict:
    return {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    }


def _tool(parameters: dict) -> dict:
    function = {"name": "f", "parameters": {"type": "object", "properties": {"v": parameters}}}
    return {"tools": [{"type": "function", "function": function}], "tool_choice": "required"}


CRASHERS = [
    ({"type": "string", "maxLength": 200_000}, "maxLength"),
    ({"type": "string", "maxLength": 30_000}, "maxLength"),
    ({"type": "string", "maxLength": 10_000}, "maxLength"),  # printed 80 kB of grammar
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 30_000}, "maxItems"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 30_000}, "minItems"),
    ({"type": "string", "pattern": "^a{0,30000}$"}, "{0,30000}"),
    # Within every bound, but one group of the grammar made from it holds 2,000 repetitions.
    ({"type": "string", "pattern": "^(a{0,500}b{0,500}){0,3}$"}, "grammar"),
    # Not a crash but a hang: llama.cpp tries every way of splitting a token among 160
    # optional parts (minutes per token, the model held).
    ({"type": "string", "pattern": "^((a|b|c|d|e)?){32}$"}, "optional or alternative"),
    # The converter writes an escaped quote llama.cpp cannot parse: it prints the grammar.
    ({"enum": ['say "hi"', "b"]}, "llama.cpp"),
]  # fmt: skip


@pytest.fixture(scope="module")
def app_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """python app.py on the embedded model, its stderr in a file of its own."""
    data = tmp_path_factory.mktemp("local-process")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env |= {"ACCESS_KEY": ACCESS_KEY, "PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
            "DATA_DIR": str(data), "PROVIDER": "local", "LOG_LEVEL": "WARNING",
            "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip
    stderr = data / "stderr.log"
    with (data / "stdout.log").open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out,
                                   stderr=err)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, stderr.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the app did not start"
                time.sleep(0.2)
        yield url, stderr
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.mark.parametrize(("schema", "said"), CRASHERS, ids=[str(s)[:40] for s, _ in CRASHERS])
def test_a_schema_llama_cpp_cannot_take_is_a_400_and_the_process_lives(
    app_process: tuple[str, Path], schema: dict, said: str
) -> None:
    url, stderr = app_process
    headers = {"Authorization": f"Bearer {ACCESS_KEY}"}
    printed = stderr.stat().st_size
    for extra, param in ((_schema(schema), "response_format"), (_tool(schema), "tools")):
        body = {"messages": SAY_HI, "max_tokens": 4, **extra}
        answer = httpx.post(f"{url}/v1/chat/completions", headers=headers, json=body, timeout=60)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == param and said in error["message"], error
        # Still alive, and still answering.
        body = {"messages": SAY_HI, "max_tokens": 2}
        answer = httpx.post(f"{url}/v1/chat/completions", headers=headers, json=body, timeout=60)
        assert answer.status_code == 200, answer.text
    # Nothing of the grammar on stderr: a refused request writes no more than a log line.
    assert stderr.stat().st_size - printed < 2_000, stderr.read_text()[-3000:]
