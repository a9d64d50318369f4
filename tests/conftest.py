"""Fixtures: a real OpenAI-compatible upstream, the app served over HTTP, a logged-in client."""

from __future__ import annotations

import io
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import uvicorn
from gradio_client import Client

from core.config import Settings, load_settings
from core.log import configure_logging
from core.service import Service
from tests.upstream import FakeUpstream

ACCESS_KEY = "test-access-key-9f8e7d6c5b4a"
UPSTREAM_KEY = "sk-test-upstream-key-0123456789abcdef0123456789"
# Everything the app logs during the session, through its own handler and secret filter.
LOG_STREAM = io.StringIO()
# One database for the session's apps (each test that needs its own passes DATA_DIR).
DATA_DIR = tempfile.mkdtemp(prefix="dashboard-test-data-")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Served:
    """An ASGI app running under uvicorn in a thread on 127.0.0.1."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(app: Any) -> Served:
    port = free_port()
    from ui.server import server_options  # served as app.py serves it

    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, lifespan="on", **server_options()
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the app did not start")
        time.sleep(0.05)
    return Served(url=f"http://127.0.0.1:{port}", server=server, thread=thread)


def app_settings(upstream: FakeUpstream, **overrides: str) -> Settings:
    environ = {
        "ACCESS_KEY": ACCESS_KEY,
        "OPENAI_API_KEY": upstream.api_key,
        "OPENAI_BASE_URL": upstream.url,
        "UPSTREAM_MAX_RETRIES": "0",
        "REQUEST_TIMEOUT": "10",
        "LOG_LEVEL": "DEBUG",
        "CHAT_MODEL": "gpt-4.1-mini",
        "COMPLETION_MODEL": "gpt-3.5-turbo-instruct",
        "IMAGE_MODEL": "gpt-image-1",
        "EMBEDDING_MODEL": "text-embedding-3-small",
        "DATA_DIR": DATA_DIR,
        **overrides,
    }
    return load_settings(environ=environ, env_file=None)


@pytest.fixture(scope="session", autouse=True)
def app_logging() -> Iterator[io.StringIO]:
    """Route all logging through the app's own handler (with its secret filter) into a buffer."""
    configure_logging("DEBUG", [ACCESS_KEY, UPSTREAM_KEY], stream=LOG_STREAM)
    yield LOG_STREAM


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    up = FakeUpstream(api_key=UPSTREAM_KEY).start()
    yield up
    up.stop()


@pytest.fixture(scope="session")
def settings(upstream: FakeUpstream) -> Settings:
    return app_settings(upstream)


@pytest.fixture(scope="session")
def running_app(settings: Settings) -> Iterator[Served]:
    """The whole app (the APIs, and Gradio behind auth) on a free port, once per session."""
    from ui.server import create_app

    served = serve(create_app(settings))
    yield served
    served.stop()


@pytest.fixture(scope="session")
def client(running_app: Served, tmp_path_factory: pytest.TempPathFactory) -> Client:
    """A gradio_client logged in with the access key, shared by the API tests."""
    downloads = tmp_path_factory.mktemp("downloads")
    return Client(
        running_app.url,
        auth=("tester", ACCESS_KEY),
        verbose=False,
        analytics_enabled=False,
        download_files=str(downloads),
    )


@pytest.fixture
def service(upstream: FakeUpstream) -> Iterator[Service]:
    """A Service straight on the upstream (no Gradio), for core tests."""
    svc = Service(app_settings(upstream))
    yield svc


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep tests away from a developer's .env and real keys."""
    monkeypatch.chdir(tmp_path)
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ACCESS_KEY", "PROVIDER"):
        monkeypatch.delenv(name, raising=False)


def logged() -> str:
    """All log text so far."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    return LOG_STREAM.getvalue()
