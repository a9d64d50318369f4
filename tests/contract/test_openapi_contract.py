"""/v1 against OpenAI's published OpenAPI spec (issue 11).

Each operation is fuzzed by schemathesis with requests valid per the spec (see contract.py for
the checks and for each constraint on generation, with its reason), and the faults the fuzzing
found are kept as minimal requests. Bounded: about half a minute on two cores.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.contract.contract import AUTH, SCHEMA, SPEC, Operation, fuzz

GENERATING = ("extras", "model", "stream", "max_tokens")
EMBEDDING = ("extras", "model", "token_ids", "dimensions", "empty_input", "base64")
OPERATIONS = [
    Operation("GET", "/models", 10),
    Operation("GET", "/models/{model}", 20, path_parameters={"model": "gpt-4.1-mini"}),
    Operation("POST", "/chat/completions", 150, GENERATING),
    Operation("POST", "/completions", 150, (*GENERATING, "token_ids")),
    Operation(
        "POST",
        "/embeddings",
        150,
        EMBEDDING,
    ),
]
IMAGES = Operation(
    "POST",
    "/images/generations",
    60,
    ("extras", "model", "image_size", "image_prompt"),
)


def test_spec_names_its_source() -> None:
    source = SPEC["info"]["x-source"]
    assert source["repository"] == "https://github.com/openai/openai-openapi"
    assert len(source["commit"]) == 40
    assert SPEC["info"]["version"]
    paths = {f"{m.upper()} {p}" for p, item in SPEC["paths"].items() for m in item}
    assert paths == {o.label for o in [*OPERATIONS, IMAGES]}


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda o: o.label)
def test_operation_follows_the_spec(v1: str, operation: Operation) -> None:
    fuzz(v1, operation)


@pytest.mark.parametrize("operation", [IMAGES], ids=lambda o: o.label)
def test_images_follow_the_spec(v1: str, operation: Operation) -> None:
    fuzz(v1, operation)


CHAT = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}
EMBEDDING_BODY = {"model": "text-embedding-3-small", "input": "hi"}
IMAGE = {"model": "gpt-image-1", "prompt": "a red square"}
# (id, path, body, why the spec allows it): requests the fuzzing found the gateway refused.
ONCE_REFUSED = [
    ("completion-empty-prompt", "/completions", {**COMPLETION, "prompt": ""},
     "prompt's string branch has no minLength (its default is '')"),
    ("completion-null-prompt", "/completions", {**COMPLETION, "prompt": None},
     "prompt is nullable (default '<|endoftext|>')"),
    ("completion-empty-prompt-item", "/completions", {**COMPLETION, "prompt": [""]},
     "prompt's array of strings has items without minLength"),
    ("completion-empty-stop", "/completions", {**COMPLETION, "stop": ""},
     "StopConfiguration's string has no minLength"),
    ("chat-empty-stop", "/chat/completions", {**CHAT, "stop": [""]},
     "StopConfiguration's array items have no minLength"),
    ("chat-long-stop", "/chat/completions", {**CHAT, "stop": "x" * 101},
     "StopConfiguration's string has no maxLength"),
    ("embedding-blank-input", "/embeddings", {**EMBEDDING_BODY, "input": " "},
     "input ' ' is not the empty string the spec's prose forbids"),
    ("image-n-as-float", "/images/generations", {**IMAGE, "n": 2.0},
     "n is an integer, and JSON's 2.0 is one"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "why"), [r[1:] for r in ONCE_REFUSED], ids=[r[0] for r in ONCE_REFUSED]
)
def test_valid_request_accepted(v1: str, path: str, body: dict[str, Any], why: str) -> None:
    response = requests.post(v1 + path, json=body, headers=AUTH, timeout=30)
    assert response.status_code == 200, f"{why}: {response.status_code} {response.text}"
    case = SCHEMA[path]["POST"].Case(body=body, media_type="application/json")
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
