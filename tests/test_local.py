"""The embedded llama.cpp backend on the real bundled model, through core.service.Service."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from core import errors
from core.config import load_settings
from core.providers import local
from core.providers.local import LocalProvider
from core.schemas import ChatRequest, StreamChunk
from core.service import Service

pytestmark = pytest.mark.local_model
T = TypeVar("T")
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
CHAT = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "My name is Ada."},
    {"role": "assistant", "content": "Nice to meet you, Ada!"},
    {"role": "user", "content": "Name three colors of the rainbow."},
]
LONG = [
    {
        "role": "user",
        "content": "Write a very long, detailed story about a dragon who learns to cook.",
    }
]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def collect(stream: AsyncIterator[StreamChunk]) -> list[StreamChunk]:
    return [chunk async for chunk in stream]


def text_of(chunks: list[StreamChunk]) -> str:
    return "".join(c.text for c in chunks)


def local_service(**env: str) -> Service:
    return Service(load_settings(environ={"PROVIDER": "local", **env}, env_file=None))


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    svc = local_service()
    yield svc
    run(svc.aclose())


@pytest.fixture
def provider(service: Service) -> LocalProvider:
    assert isinstance(service.provider, LocalProvider)
    return service.provider


@pytest.fixture
def generations(provider: LocalProvider, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Spy on llama-cpp's chat generator: chunks produced and whether it was closed early."""
    seen: list[dict[str, Any]] = []
    real = provider.llm.create_chat_completion

    def spy(**kwargs: Any) -> Iterator[dict[str, Any]]:
        record = {"chunks": 0, "closed_early": False}
        seen.append(record)
        try:
            for chunk in real(**kwargs):
                record["chunks"] += 1
                yield chunk
        except GeneratorExit:
            record["closed_early"] = True
            raise

    monkeypatch.setattr(provider.llm, "create_chat_completion", spy)
    return seen


def test_chat_streams_with_system_prompt_and_history(service: Service) -> None:
    chunks = run(collect(service.chat_stream({"messages": CHAT, "temperature": 0})))
    texts = [c.text for c in chunks if c.text]
    assert len(texts) > 1 and text_of(chunks).strip()
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length") and last.usage is not None
    assert last.usage.prompt_tokens > 20  # the system prompt and both turns went in
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_chat_respects_max_tokens(service: Service) -> None:
    request = {"messages": LONG, "temperature": 0, "max_tokens": 8}
    chunks = run(collect(service.chat_stream(request)))
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage is not None
    assert 0 < chunks[-1].usage.completion_tokens <= 8


def test_temperature_is_honoured(service: Service) -> None:
    def reply(temperature: float) -> str:
        request = {"messages": CHAT, "temperature": temperature, "max_tokens": 24}
        return text_of(run(collect(service.chat_stream(request))))

    assert reply(0) == reply(0)
    assert len({reply(1.5) for _ in range(3)}) > 1


def test_completion_streams_and_honours_stop(service: Service) -> None:
    request = {"prompt": "1, 2, 3, 4,", "temperature": 0, "max_tokens": 16}
    free = run(collect(service.completion_stream(request)))
    assert len([c for c in free if c.text]) > 1 and "7" in text_of(free)
    stopped = run(collect(service.completion_stream({**request, "stop": [", 7"]})))
    assert text_of(stopped).startswith(" 5") and "7" not in text_of(stopped)
    assert stopped[-1].finish_reason == "stop" and stopped[-1].usage is not None


def test_prompt_longer_than_context_is_invalid(service: Service) -> None:
    with pytest.raises(errors.InvalidRequest, match="LOCAL_CONTEXT_SIZE"):
        run(collect(service.completion_stream({"prompt": "hello " * 3000})))


def test_embeddings_similarity(service: Service) -> None:
    texts = ["The cat sits on the mat.", "A cat is sitting on the mat.", "Stock prices fell."]
    result = run(service.embeddings({"texts": texts}))
    assert len(result.vectors) == 3 and result.model == MODEL_ID
    assert {len(v) for v in result.vectors} == {result.dimensions}
    assert all(math.isclose(math.hypot(*v), 1, abs_tol=1e-4) for v in result.vectors)
    cos = [
        [sum(x * y for x, y in zip(a, b, strict=True)) for b in result.vectors]
        for a in result.vectors
    ]
    assert cos[0][1] > cos[0][2] and cos[0][1] > cos[1][2]
    assert result.usage.prompt_tokens > 0


def test_embeddings_dimensions_must_match(service: Service, provider: LocalProvider) -> None:
    ok = run(service.embeddings({"texts": ["hi"], "dimensions": provider.dimensions}))
    assert ok.dimensions == provider.dimensions
    with pytest.raises(errors.InvalidRequest, match=f"{provider.dimensions} dimensions"):
        run(service.embeddings({"texts": ["hi"], "dimensions": 8}))


def test_images_unsupported(service: Service, provider: LocalProvider) -> None:
    with pytest.raises(errors.Unsupported, match="OPENAI_API_KEY"):
        run(service.generate_images({"prompt": "a red apple"}))
    with pytest.raises(errors.Unsupported, match=r"no image model.*OPENAI_BASE_URL"):
        run(provider.generate_images(None))  # type: ignore[arg-type]


def test_models_and_health(service: Service) -> None:
    [model] = run(service.list_models(refresh=True))
    assert model.id == MODEL_ID and model.owned_by == "local" and model.created
    assert model.kinds == ["chat", "completion", "embedding"]
    # No image model: none offered (not the chat model), and the UI can say so up front.
    assert service.default_model("image") == "" and not service.serves("image")
    assert service.default_model("chat") == MODEL_ID and service.serves("embedding")
    health = run(service.health())
    assert health["reachable"] is True and MODEL_ID in health["upstream"]


def test_missing_model_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="LOCAL_MODEL_PATH"):
        load_settings(environ={"LOCAL_MODEL_PATH": str(tmp_path / "nope.gguf")}, env_file=None)


def test_garbage_model_file_is_a_one_line_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf\x00\xff" * 1000)
    with pytest.raises(errors.ConfigError) as caught:
        local_service(LOCAL_MODEL_PATH=str(bad))
    message = str(caught.value)
    assert "LOCAL_MODEL_PATH" in message and str(bad) in message and "\n" not in message


def test_missing_bundled_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(errors.ConfigError, match="install requirements, or set LOCAL_MODEL_PATH"):
        local.bundled_model_path()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "local"),
        ({"OPENAI_API_KEY": "sk-test-123456"}, "openai"),
        ({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, "openai"),
        ({"OPENAI_API_KEY": "sk-test-123456", "PROVIDER": "local"}, "local"),
    ],
)
def test_provider_switch(env: dict[str, str], expected: str) -> None:
    settings = load_settings(environ=env, env_file=None)
    assert settings.active_provider == expected
    svc = Service(settings)
    try:
        assert svc.provider.name == expected
    finally:
        run(svc.aclose())


def test_closing_the_stream_stops_the_generation(
    service: Service, provider: LocalProvider, generations: list[dict[str, Any]]
) -> None:
    async def scenario() -> str:
        stream = service.chat_stream({"messages": LONG, "temperature": 0, "max_tokens": 1500})
        assert (await anext(stream)).text and (await anext(stream)).text
        await stream.aclose()  # what a disconnecting client does
        # The next caller queues behind the stopping worker, then gets the model.
        return text_of(await collect(service.chat_stream({"messages": CHAT, "max_tokens": 16})))

    assert run(scenario()).strip()
    first, second = generations
    assert first["closed_early"] and first["chunks"] < 100
    assert not second["closed_early"] and not provider.busy


def test_cancelling_the_task_stops_the_worker_before_returning(
    service: Service, provider: LocalProvider, generations: list[dict[str, Any]]
) -> None:
    async def scenario() -> None:
        two_read = asyncio.Event()

        async def consume() -> None:
            request = {"messages": LONG, "temperature": 0, "max_tokens": 1500}
            read = 0
            async for chunk in service.chat_stream(request):
                read += bool(chunk.text)
                if read == 2:
                    two_read.set()

        task = asyncio.create_task(consume())
        await two_read.wait()
        task.cancel()  # what Gradio's stop button does
        with pytest.raises(asyncio.CancelledError):
            await task
        # Cancellation returned only after the worker let go of the model.
        assert not provider.busy and generations[0]["closed_early"]

    run(scenario())
    assert text_of(run(collect(service.chat_stream({"messages": CHAT, "max_tokens": 8}))))


def test_provider_aclose_waits_for_the_worker(provider: LocalProvider) -> None:
    async def scenario() -> None:
        stream = provider.chat_stream(ChatRequest(messages=LONG, max_tokens=1500))
        await anext(stream)
        await stream.aclose()
        assert not provider.busy

    run(scenario())


def test_concurrent_streams_are_serialized(service: Service) -> None:
    request = {"messages": CHAT, "temperature": 0, "max_tokens": 24}

    async def scenario() -> tuple[Any, ...]:
        return await asyncio.gather(
            collect(service.chat_stream(request)),
            collect(service.chat_stream(request)),
            service.embeddings({"texts": ["one", "two"]}),
            collect(service.completion_stream({"prompt": "The sky is", "max_tokens": 8})),
        )

    first, second, embedded, completed = run(scenario())
    assert text_of(first) and text_of(first) == text_of(second)  # no state leaked between them
    assert first[-1].usage == second[-1].usage
    assert len(embedded.vectors) == 2 and completed[-1].usage is not None


def test_other_model_names_are_refused_clearly(service: Service) -> None:
    with pytest.raises(errors.ModelNotFound, match="has only the model"):
        run(collect(service.chat_stream({"messages": CHAT, "model": "gpt-4o"})))
    with pytest.raises(errors.ModelNotFound, match="has only the model"):
        run(service.embeddings({"texts": ["a"], "model": "text-embedding-3-small"}))
