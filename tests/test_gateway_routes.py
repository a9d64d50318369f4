"""The /v1 surface as OpenAI's: unknown routes and methods in its error shape, one model."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import ACCESS_KEY, Served

AUTH = {"authorization": f"Bearer {ACCESS_KEY}"}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v1/responses", 404),
        ("GET", "/v1/files", 404),
        ("POST", "/v1/audio/speech", 404),
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/embeddings", 405),
    ],
)
def test_unknown_routes_and_methods_answer_in_openais_shape(
    running_app: Served, method: str, path: str, status: int
) -> None:
    answer = httpx.request(method, running_app.url + path, headers=AUTH, json={})
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert f"{method} {path}" in error["message"]


def test_one_model_can_be_retrieved(running_app: Served) -> None:
    sdk = openai.OpenAI(base_url=running_app.url + "/v1", api_key=ACCESS_KEY, max_retries=0)
    model = sdk.models.retrieve("gpt-4.1-mini")
    assert model.id == "gpt-4.1-mini" and model.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        sdk.models.retrieve("no-such/model")
    assert info.value.code == "model_not_found"
