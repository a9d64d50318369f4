"""Schema bounds: every request model refuses out-of-range input with a readable message."""

from __future__ import annotations

import pytest

from core.errors import InvalidRequest
from core.schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageRequest,
    guess_kinds,
    parse,
)

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("model", "data", "field"),
    [
        (ChatRequest, {"messages": HI, "temperature": 2.5}, "temperature"),
        (ChatRequest, {"messages": HI, "temperature": -0.1}, "temperature"),
        (ChatRequest, {"messages": HI, "max_tokens": 0}, "max_tokens"),
        (ChatRequest, {"messages": HI, "max_tokens": 10**7}, "max_tokens"),
        (ChatRequest, {"messages": []}, "messages"),
        (ChatRequest, {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        (ChatRequest, {"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "type"),
        (ChatRequest, {"messages": HI, "model": "bad model!"}, "model"),
        (ChatRequest, {"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (CompletionRequest, {"prompt": [[1.5]]}, "prompt"),
        (EmbeddingRequest, {"texts": [[-1]]}, "texts"),
        (EmbeddingRequest, {"texts": [[True, 2]]}, "texts"),
        (EmbeddingRequest, {"texts": [[]]}, "texts"),
        (EmbeddingRequest, {"texts": ["a", [1, 2]]}, "texts"),
        (ChatRequest, {"messages": HI, "model": "a" * 257}, "model"),
        (ImageRequest, {"prompt": "cat", "n": 11}, "n"),
        (ImageRequest, {"prompt": "cat", "n": 0}, "n"),
        (ImageRequest, {"prompt": "cat", "size": "640x480"}, "size"),
        (ImageRequest, {"prompt": "cat", "quality": "ultra"}, "quality"),
        (EmbeddingRequest, {"texts": ["a"] * 2049}, "texts"),
        (EmbeddingRequest, {"texts": []}, "texts"),
        (EmbeddingRequest, {"texts": ["ok", ""]}, "texts.1: String should have at least 1"),
        (EmbeddingRequest, {"texts": ["a"], "dimensions": 0}, "dimensions"),
        (ChatRequest, {"messages": HI, "unexpected": 1}, "unexpected"),
    ],
)
def test_out_of_bounds_input_is_refused_with_the_field_named(model, data, field) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(model, data)
    assert field in str(info.value)
    assert info.value.status == 400


def test_valid_input_passes_with_defaults() -> None:
    req = parse(ChatRequest, {"messages": HI})
    assert req.temperature == 0.7 and req.max_tokens is None and req.model is None
    assert parse(EmbeddingRequest, {"texts": ["a"] * 2048}).texts[0] == "a"
    image = parse(ImageRequest, {"prompt": "cat", "n": 10, "size": "1536x1024"})
    assert image.n == 10
    assert parse(ChatRequest, {"messages": HI, "model": "llama3.1:8b-instruct-q4_K_M"}).model


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "Only a system message."}],
        [{"role": "developer", "content": "Only a developer message."}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
        [
            {"role": "user", "name": "ann", "content": [{"type": "text", "text": "hi"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f"}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
            {"role": "function", "name": "f", "content": "42"},
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
        ],
    ],
)
def test_every_message_shape_openai_takes_is_accepted(messages) -> None:
    assert parse(ChatRequest, {"messages": messages}).messages


def test_openai_input_forms_are_accepted() -> None:
    assert parse(ChatRequest, {"messages": HI, "model": "/models/Qwen2.5-7B-Instruct"}).model
    assert parse(ChatRequest, {"messages": HI, "max_tokens": 200_000}).max_tokens == 200_000
    assert parse(EmbeddingRequest, {"texts": [[64, 8415], [1]]}).prompt_bound() == 3
    for prompt in ("x" * 200_000, ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        assert parse(CompletionRequest, {"prompt": prompt}).prompt


def test_error_message_does_not_echo_the_input() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(ChatRequest, {"messages": HI, "model": "sk-secret key"})
    assert "sk-secret" not in str(info.value)


@pytest.mark.parametrize(
    ("model_id", "kind"),
    [
        ("gpt-4.1-mini", "chat"),
        ("text-embedding-3-small", "embedding"),
        ("nomic-embed-text:latest", "embedding"),
        ("gpt-image-1", "image"),
        ("dall-e-3", "image"),
        ("whisper-1", "audio"),
        ("tts-1", "audio"),
        ("gpt-4o-transcribe", "audio"),
        ("omni-moderation-latest", "other"),
        ("gpt-3.5-turbo-instruct", "completion"),
        ("llama3.2:3b", "chat"),
        ("Qwen2.5-7B-Instruct", "chat"),
    ],
)
def test_model_kinds(model_id: str, kind: str) -> None:
    assert guess_kinds(model_id)[0] == kind
