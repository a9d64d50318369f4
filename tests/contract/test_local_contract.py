"""The embedded model's answers, built by the gateway itself, against OpenAI's published spec:
every field the spec requires (message.refusal, logprobs, system_fingerprint...), for each kind
of answer it can give (several choices, log probabilities, tool calls, JSON output)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from core.config import load_settings
from tests.conftest import ACCESS_KEY, serve
from tests.contract.contract import AUTH, SCHEMA

pytestmark = pytest.mark.local_model
MODEL = "SmolLM2-135M-Instruct.Q4_1"
HI = [{"role": "user", "content": "Say hello."}]
TOOL = {
    "type": "function",
    "function": {
        "name": "greet",
        "parameters": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 20}},
            "required": ["name"],
        },
    },
}
CASES = [
    ("chat", "/chat/completions", {"messages": HI, "max_tokens": 6}),
    ("chat-n", "/chat/completions", {"messages": HI, "max_tokens": 4, "n": 2, "seed": 1}),
    ("chat-logprobs", "/chat/completions",
     {"messages": HI, "max_tokens": 4, "logprobs": True, "top_logprobs": 3}),
    ("chat-tools", "/chat/completions",
     {"messages": HI, "max_tokens": 40, "tools": [TOOL], "tool_choice": "required"}),
    ("chat-json", "/chat/completions",
     {"messages": HI, "max_tokens": 40, "response_format": {"type": "json_schema", "json_schema":
      {"name": "g", "schema": TOOL["function"]["parameters"]}}}),
    ("completion", "/completions", {"prompt": "The sky is", "max_tokens": 4}),
    ("completion-logprobs", "/completions",
     {"prompt": ["The sky is", "Grass is"], "max_tokens": 4, "logprobs": 2}),
    ("embeddings", "/embeddings", {"input": ["a cat", "a dog"], "encoding_format": "float"}),
    ("models", "/models", None),
]  # fmt: skip


@pytest.fixture(scope="module")
def v1_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ui.server import create_app

    data_dir = tmp_path_factory.mktemp("contract-local-data")
    settings = load_settings(
        environ={"ACCESS_KEY": ACCESS_KEY, "DATA_DIR": str(data_dir)}, env_file=None
    )
    served = serve(create_app(settings))
    yield served.url + "/v1"
    served.stop()


@pytest.mark.parametrize(("name", "path", "body"), CASES, ids=[c[0] for c in CASES])
def test_embedded_answers_follow_the_spec(v1_local: str, name: str, path: str, body) -> None:
    method = "GET" if body is None else "POST"
    operation = SCHEMA[path][method]
    case = (
        operation.Case()
        if body is None
        else operation.Case(body={"model": MODEL, **body}, media_type="application/json")
    )
    with requests.Session() as session:
        response = case.call(base_url=v1_local, session=session, headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
