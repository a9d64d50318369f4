"""The README's example script runs as written against a running server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import load_settings
from tests.conftest import ACCESS_KEY, Served, serve

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, app: Served) -> str:
    """Run examples/<name> against the app as a user would; return what it printed."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_MODEL")}
    env |= {"DASHBOARD_URL": app.url, "ACCESS_KEY": ACCESS_KEY}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_gradio_client_example_runs(running_app: Served) -> None:
    out = run_example("gradio_client_example.py", running_app)
    assert "chat: Echo: What is a vector embedding?" in out
    assert "completion:  completion of: The three primary colors are" in out
    assert "embeddings: text-embedding-3-small" in out
    assert "models: cut-stream (chat), dall-e-3 (image)" in out  # sorted by id
    assert "images saved to:" in out and ".png" in out


def test_openai_sdk_example_runs(running_app: Served) -> None:
    out = run_example("openai_sdk_example.py", running_app)
    # No model named: the server's default (CHAT_MODEL of the test app).
    assert "chat (gpt-4.1-mini): Echo: Name three prime numbers." in out
    assert "stream usage:" in out and "Echo: Count to five." in out
    assert "embeddings: 2 vectors of" in out
    assert "models: " in out and "error-400" in out  # the test upstream lists its modes first


@pytest.fixture(scope="module")
def offline_app(tmp_path_factory: pytest.TempPathFactory):
    from ui.server import create_app

    data_dir = tmp_path_factory.mktemp("examples-offline")
    settings = load_settings(
        environ={"ACCESS_KEY": ACCESS_KEY, "DATA_DIR": str(data_dir)}, env_file=None
    )
    served = serve(create_app(settings))
    yield served
    served.stop()


@pytest.mark.local_model
def test_both_examples_run_as_written_on_the_offline_default(offline_app: Served) -> None:
    out = run_example("openai_sdk_example.py", offline_app)
    assert "chat (SmolLM2-135M-Instruct.Q4_1):" in out
    assert "stream usage:" in out and "embeddings: 2 vectors of 576" in out
    assert "models: SmolLM2-135M-Instruct.Q4_1" in out
    out = run_example("gradio_client_example.py", offline_app)
    assert "chat: " in out and "embeddings: SmolLM2-135M-Instruct.Q4_1 576 dimensions" in out
    assert "images: " in out and "no image model" in out
