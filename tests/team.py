"""A team's gateway for the tests: several backends in one process (issue 14).

Two OpenAI-compatible fakes (OpenAI's models, and an Ollama-like server that lists its own), a
fake of Anthropic's Messages API, a fake of Hugging Face's router, a server that is down, and
the embedded model, all named in one BACKENDS_FILE, served by the whole app on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from core.config import load_settings
from core.providers.local import bundled_model_path
from tests.conftest import ACCESS_KEY, Served, free_port, serve
from tests.fake_anthropic import FakeAnthropic
from tests.fake_huggingface import CHAT_MODEL as HF_CHAT
from tests.fake_huggingface import EMBEDDING_MODEL as HF_EMBED
from tests.fake_huggingface import IMAGE_MODEL as HF_IMAGE
from tests.fake_huggingface import FakeHuggingFace
from tests.upstream import FakeUpstream

LOCAL = bundled_model_path().stem
KEYS = {
    "TEAM_OPENAI_KEY": "sk-team-openai-key-0123456789abcdef",
    "TEAM_ANTHROPIC_KEY": "sk-ant-team-key-0123456789abcdef",
    "TEAM_HF_TOKEN": "hf_team_token_0123456789abcdef",
}


@dataclass
class Team:
    url: str
    served: Served
    core: Any
    openai: FakeUpstream
    ollama: FakeUpstream
    claude: FakeAnthropic
    hf: FakeHuggingFace
    client: openai.OpenAI


BACKENDS = """
backends:
  - name: openai
    kind: openai
    base_url: {openai}
    api_key_env: TEAM_OPENAI_KEY
    models: [gpt-4.1-mini, text-embedding-3-small, gpt-image-1, error-503]
    fallbacks: {{error-503: [ollama/llama3.2]}}
  - name: claude
    kind: anthropic
    base_url: {claude}
    api_key_env: TEAM_ANTHROPIC_KEY
    models: [claude-sonnet-4-5, claude-error-529, claude-error-429, claude-error-400,
             claude-error-500, claude-cut-stream, claude-overloaded-early]
    fallbacks: {{claude-error-529: [openai/gpt-4.1-mini], claude-error-429: [local/{local}],
                claude-overloaded-early: [openai/gpt-4.1-mini]}}
    prices: {{claude-sonnet-4-5: {{input: 3, output: 15}}}}
  - name: ollama
    kind: openai
    base_url: {ollama}
    models: "*"
  - name: hf
    kind: huggingface
    base_url: {hf}
    api_key_env: TEAM_HF_TOKEN
    models: [{hf_chat}, {hf_embed}, {hf_image}]
  - name: down
    kind: openai
    base_url: http://127.0.0.1:{closed}/v1
    models: [down-model]
    fallbacks: {{down-model: [ollama/llama3.2]}}
  - name: local
    kind: local
"""


@contextmanager
def running_team(folder: Path, **env: str) -> Iterator[Team]:
    """The team's gateway; `env`: more settings (CACHE=memory...)."""
    fakes = {
        "openai": FakeUpstream(api_key=KEYS["TEAM_OPENAI_KEY"]).start(),
        # Ollama takes any key (the product sends a placeholder when it has none).
        "ollama": FakeUpstream(api_key="not-needed", models=["llama3.2", "qwen2.5-coder"]).start(),
        "claude": FakeAnthropic(api_key=KEYS["TEAM_ANTHROPIC_KEY"]).start(),
        "hf": FakeHuggingFace(token=KEYS["TEAM_HF_TOKEN"]).start(),
    }
    path = folder / "backends.yaml"
    path.write_text(
        BACKENDS.format(
            openai=fakes["openai"].url, ollama=fakes["ollama"].url, claude=fakes["claude"].url,
            hf=fakes["hf"].url, closed=free_port(), local=LOCAL, hf_chat=HF_CHAT,
            hf_embed=HF_EMBED, hf_image=HF_IMAGE,
        )
    )  # fmt: skip
    saved = {k: os.environ.get(k) for k in KEYS}
    os.environ.update(KEYS)
    settings = load_settings(
        environ={
            "ACCESS_KEY": ACCESS_KEY,
            "BACKENDS_FILE": str(path),
            "DATA_DIR": str(folder / "data"),
            "UPSTREAM_MAX_RETRIES": "0",
            "REQUEST_TIMEOUT": "10",
            **env,
        },
        env_file=None,
    )
    from ui.server import create_app

    app = create_app(settings)
    served: Served = serve(app)
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=ACCESS_KEY, max_retries=0)
    try:
        yield Team(served.url, served, app.dashboard.state.core, fakes["openai"],
                   fakes["ollama"], fakes["claude"], fakes["hf"], client)  # fmt: skip
    finally:
        served.stop()
        for fake in fakes.values():
            fake.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
