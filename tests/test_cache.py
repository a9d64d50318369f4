"""The response cache (CACHE=memory|database), over real HTTP: the openai SDK and raw requests
through /v1, gradio_client through the Gradio API, one fake upstream that counts what reaches
it, and the ledger read back. What is cached: embeddings per input, and chat or completions at
temperature 0 with a seed; a hit spends no quota, is a `cached` ledger row at cost 0, and says
so in X-Cache; one user's answer is never another's unless CACHE_SHARED allows it."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from gradio_client import Client

from core.cache import ENTRY_BYTES, MemoryStore, use_from
from core.config import load_settings
from core.errors import ConfigError
from tests.conftest import ACCESS_KEY, Served, app_settings, serve
from tests.db_fixtures import BACKENDS, fresh_database
from tests.team import HF_EMBED, LOCAL, Team, running_team
from tests.upstream import FakeUpstream

HI = [{"role": "user", "content": "Tell me a fact about owls"}]
SEEDED = {"temperature": 0, "seed": 7}


class App:
    def __init__(self, served: Served, core: Any, upstream: FakeUpstream) -> None:
        self.served, self.core, self.upstream = served, core, upstream

    @property
    def url(self) -> str:
        return self.served.url

    def sdk(self, key: str = ACCESS_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def post(self, path: str, body: dict, key: str = ACCESS_KEY, **headers: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} | {
            k.replace("_", "-"): v for k, v in headers.items()
        }
        return httpx.post(f"{self.url}/v1/{path}", json=body, headers=headers, timeout=30)

    def upstream_calls(self, path: str) -> list[dict]:
        return [r["json"] for r in self.upstream.requests if r["path"] == f"/v1/{path}"]

    def rows(self, user: str) -> Any:
        self.core.ledger.flush()
        return self.core.ledger.rows(users=[user])

    def stop(self) -> None:
        self.served.server.should_exit = self.served.server.force_exit = True
        self.served.thread.join(timeout=10)


def start(upstream: FakeUpstream, data_dir: Path, **env: str) -> App:
    from ui.server import create_app

    app = create_app(app_settings(upstream, DATA_DIR=str(data_dir), **env))
    return App(serve(app), app.state.core, upstream)


@pytest.fixture(scope="module")
def cached(upstream: FakeUpstream, tmp_path_factory) -> Iterator[App]:
    app = start(upstream, tmp_path_factory.mktemp("cache-memory"), CACHE="memory")
    yield app
    app.stop()


@pytest.fixture(autouse=True)
def _fresh_counts(upstream: FakeUpstream) -> None:
    upstream.reset()


# ---- embeddings: one entry per input ------------------------------------------------------


def test_an_embedding_asked_again_comes_from_the_cache(cached: App) -> None:
    first = cached.post("embeddings", {"model": "text-embedding-3-small", "input": "owls"})
    again = cached.post("embeddings", {"model": "text-embedding-3-small", "input": "owls"})
    assert first.status_code == again.status_code == 200
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert again.json()["data"][0]["embedding"] == first.json()["data"][0]["embedding"]
    assert len(cached.upstream_calls("embeddings")) == 1


def test_a_batch_sends_only_the_inputs_the_cache_lacks(cached: App) -> None:
    sdk = cached.sdk()
    sdk.embeddings.create(model="text-embedding-3-small", input=["alpha one", "beta two"])
    raw = sdk.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["gamma three", "alpha one", "delta", "beta two"]
    )
    answer = raw.parse()
    assert raw.headers["x-cache"] == "partial"
    sent = cached.upstream_calls("embeddings")
    assert [call["input"] for call in sent] == [["alpha one", "beta two"], ["gamma three", "delta"]]
    # In the caller's order, each the vector a fresh call gives.
    fresh = sdk.embeddings.create(
        model="text-embedding-3-small",
        input=["gamma three", "alpha one", "delta", "beta two"],
        extra_headers={"Cache-Control": "no-cache"},
    )
    assert [d.index for d in answer.data] == [0, 1, 2, 3]
    assert [d.embedding for d in answer.data] == [d.embedding for d in fresh.data]
    # Only the new inputs' tokens were spent upstream: two words of four texts' six.
    assert answer.usage.prompt_tokens == 3
    # A partial hit is an ordinary call for the inputs sent: its ledger row counts them.
    rows = cached.rows("owner")
    row = rows[rows["request_id"] == raw.headers["x-request-id"]].iloc[0]
    assert (row["status"], row["prompt_tokens"]) == ("ok", 3)


def test_dimensions_encoding_and_model_are_part_of_the_key(cached: App) -> None:
    sdk = cached.sdk()
    text = "the key names what shapes the vector"
    floats = sdk.embeddings.create(
        model="text-embedding-3-small", input=text, encoding_format="float"
    )
    sdk.embeddings.create(model="text-embedding-3-small", input=text, dimensions=4)
    sdk.embeddings.create(model="text-embedding-3-large", input=text)
    raw = cached.post(
        "embeddings",
        {"model": "text-embedding-3-small", "input": text, "encoding_format": "base64"},
    )
    assert raw.headers["x-cache"] == "miss"
    assert len(cached.upstream_calls("embeddings")) == 4
    packed = base64.b64decode(raw.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == pytest.approx(
        floats.data[0].embedding
    )
    again = cached.post(
        "embeddings",
        {"model": "text-embedding-3-small", "input": text, "encoding_format": "base64"},
    )
    assert again.headers["x-cache"] == "hit" and again.json()["data"] == raw.json()["data"]


def test_token_id_inputs_are_cached_like_texts(cached: App) -> None:
    body = {"model": "text-embedding-3-small", "input": [[64, 8415], [1, 2, 3]]}
    first, again = cached.post("embeddings", body), cached.post("embeddings", body)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert again.json()["data"] == first.json()["data"]


# ---- chat and completions: temperature 0 with a seed ---------------------------------------


def test_a_seeded_greedy_chat_is_answered_from_the_cache(cached: App) -> None:
    body = {"model": "gpt-4.1-mini", "messages": HI, **SEEDED}
    first, again = cached.post("chat/completions", body), cached.post("chat/completions", body)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert again.content == first.content  # the same answer, id and all
    assert len(cached.upstream_calls("chat/completions")) == 1
    # Another seed, another question: asked upstream.
    other = cached.post("chat/completions", body | {"seed": 8})
    assert other.headers["x-cache"] == "miss"
    assert len(cached.upstream_calls("chat/completions")) == 2


def test_a_sampled_chat_is_never_cached(cached: App) -> None:
    for body in (
        {"model": "gpt-4.1-mini", "messages": HI, "seed": 7},  # default temperature
        {"model": "gpt-4.1-mini", "messages": HI, "temperature": 0},  # no seed
        {"model": "gpt-4.1-mini", "messages": HI, "temperature": 0.5, "seed": 7},
    ):
        first, again = cached.post("chat/completions", body), cached.post("chat/completions", body)
        assert "x-cache" not in first.headers and "x-cache" not in again.headers
        assert first.json()["id"] != again.json()["id"]
    assert len(cached.upstream_calls("chat/completions")) == 6


def test_a_seeded_stream_is_replayed_chunk_by_chunk(cached: App) -> None:
    sdk = cached.sdk()
    messages = [{"role": "user", "content": "Stream me five words now"}]

    def streamed() -> tuple[str, list[str], str | None]:
        raw = sdk.chat.completions.with_raw_response.create(
            model="gpt-4.1-mini",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **SEEDED,
        )
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = [c.usage for c in chunks if c.usage]
        assert len(usage) == 1
        return text, [c.id for c in chunks], raw.headers.get("x-cache")

    first, again = streamed(), streamed()
    assert first[2] == "miss" and again[2] == "hit"
    assert again[0] == first[0] == "Echo: Stream me five words now"
    assert len(again[1]) == len(first[1]) > 3  # replayed as the same chunks
    assert len(cached.upstream_calls("chat/completions")) == 1
    # Not streamed is another form of answer: its own entry.
    whole = sdk.chat.completions.with_raw_response.create(
        model="gpt-4.1-mini", messages=messages, **SEEDED
    )
    assert whole.headers["x-cache"] == "miss"
    assert whole.parse().choices[0].message.content == first[0]


def test_completions_are_cached_too(cached: App) -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon a time", **SEEDED}
    first, again = cached.post("completions", body), cached.post("completions", body)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert again.content == first.content


def test_cache_control_asks_afresh_or_bypasses(cached: App) -> None:
    body = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "fresh"}], **SEEDED}
    first = cached.post("chat/completions", body)
    refreshed = cached.post("chat/completions", body, cache_control="no-cache")
    assert refreshed.headers["x-cache"] == "miss"
    assert refreshed.json()["id"] != first.json()["id"]
    # no-cache stored the fresh answer; no-store neither reads nor writes.
    assert cached.post("chat/completions", body).content == refreshed.content
    bypass = cached.post("chat/completions", body, cache_control="no-store")
    assert bypass.headers["x-cache"] == "bypass"
    assert bypass.json()["id"] not in (first.json()["id"], refreshed.json()["id"])
    assert cached.post("chat/completions", body).content == refreshed.content
    assert len(cached.upstream_calls("chat/completions")) == 3
    # A call the cache never takes says nothing about it, whatever the header.
    sampled = cached.post("chat/completions", body | {"seed": None}, cache_control="no-store")
    assert sampled.status_code == 200 and "x-cache" not in sampled.headers


def test_only_whole_answers_to_the_request_are_kept(cached: App) -> None:
    """Not kept: an upstream error, a stream cut off or ended by an error, a reply the quota
    cut short (another request than the one asked), a stream the client left."""
    for model, stream in (
        ("error-500", False),
        ("error-429", False),
        ("cut-stream", True),
        ("error-stream", True),
    ):
        body = {"model": model, "messages": HI, "stream": stream, **SEEDED}
        for _ in range(2):
            answer = cached.post("chat/completions", body)
            assert answer.headers.get("x-cache", "miss") == "miss", model
    assert len(cached.upstream_calls("chat/completions")) == 8
    # A small day's budget: the reply is capped to fit, so it is not what the request asks.
    _, key = cached.core.users.add("cache-capped", daily_tokens=300)
    body = {"model": "gpt-4.1-mini", "messages": HI, **SEEDED}
    for _ in range(2):
        answer = cached.post("chat/completions", body, key=key)
        assert answer.status_code == 200 and answer.headers["x-cache"] == "miss"
    assert cached.upstream_calls("chat/completions")[-1]["max_tokens"] < 300
    # A client that leaves a stream after its first chunk.
    words = {"role": "user", "content": " ".join(["word"] * 40)}
    body = {"model": "gpt-4.1-mini", "messages": [words], "stream": True, **SEEDED}
    headers = {"Authorization": f"Bearer {ACCESS_KEY}"}
    with httpx.stream(
        "POST", f"{cached.url}/v1/chat/completions", json=body, headers=headers
    ) as left:
        next(left.iter_lines())
    assert cached.post("chat/completions", body).headers["x-cache"] == "miss"


# ---- users, quotas, the ledger ------------------------------------------------------------


def test_a_hit_never_crosses_users(cached: App) -> None:
    _, ann = cached.core.users.add("cache-ann")
    _, bob = cached.core.users.add("cache-bob")
    body = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "mine"}], **SEEDED}
    assert cached.post("chat/completions", body, key=ann).headers["x-cache"] == "miss"
    assert cached.post("chat/completions", body, key=bob).headers["x-cache"] == "miss"
    assert cached.post("chat/completions", body, key=ann).headers["x-cache"] == "hit"
    vector = {"model": "text-embedding-3-small", "input": "private words"}
    assert cached.post("embeddings", vector, key=ann).headers["x-cache"] == "miss"
    assert cached.post("embeddings", vector, key=bob).headers["x-cache"] == "miss"
    assert len(cached.upstream_calls("chat/completions")) == 2


def test_a_user_named_owner_does_not_get_the_owner_keys_answers(cached: App) -> None:
    """Scoped by who the caller is (the owner key, or a user's id), not by a name that a
    user may also have."""
    _, key = cached.core.users.add("owner")
    body = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "mine"}], **SEEDED}
    assert cached.post("chat/completions", body).headers["x-cache"] in ("miss", "hit")
    assert cached.post("chat/completions", body, key=key).headers["x-cache"] == "miss"
    vector = {"model": "text-embedding-3-small", "input": "the owner's text"}
    assert cached.post("embeddings", vector).headers["x-cache"] == "miss"
    assert cached.post("embeddings", vector, key=key).headers["x-cache"] == "miss"


def test_hits_are_cached_rows_that_spend_no_quota(cached: App) -> None:
    # Two requests a minute, and a day's tokens that one more uncached call would pass.
    _, key = cached.core.users.add("cache-quota", daily_tokens=40, rpm=2)
    body = {"model": "gpt-4.1-mini", "messages": HI, "max_tokens": 10, **SEEDED}
    assert cached.post("chat/completions", body, key=key).status_code == 200
    hits = [cached.post("chat/completions", body, key=key) for _ in range(4)]
    assert [(h.status_code, h.headers["x-cache"]) for h in hits] == [(200, "hit")] * 4
    other = cached.post("chat/completions", body | {"seed": 9}, key=key)
    assert other.status_code == 200  # the hits took neither requests nor tokens
    rows = cached.rows("cache-quota")
    assert list(rows["status"]) == ["ok", "cached", "cached", "cached", "cached", "ok"]
    hit_rows = rows[rows["status"] == "cached"]
    assert (hit_rows["prompt_tokens"] + hit_rows["completion_tokens"]).sum() == 0
    assert hit_rows["cost_usd"].sum() == 0
    assert list(hit_rows["request_id"]) == [h.headers["x-request-id"] for h in hits]
    third = cached.post("chat/completions", body | {"seed": 10}, key=key)
    assert third.status_code == 429  # the third uncached call of the minute


def test_the_gradio_api_uses_the_cache(cached: App, tmp_path) -> None:
    client = Client(
        cached.url,
        auth=("cache-gradio", ACCESS_KEY),
        verbose=False,
        analytics_enabled=False,
        download_files=str(tmp_path),
    )
    texts = ["one gradio text", "another gradio text"]
    first = client.predict(texts, "text-embedding-3-small", 0, api_name="/embeddings")
    again = client.predict(texts, "text-embedding-3-small", 0, api_name="/embeddings")
    assert again["vectors"] == first["vectors"]
    assert len(cached.upstream_calls("embeddings")) == 1
    assert list(cached.rows("cache-gradio")["status"]) == ["ok", "cached"]


def test_cache_off_by_default_keeps_no_answer(upstream: FakeUpstream, tmp_path) -> None:
    app = start(upstream, tmp_path)
    try:
        body = {"model": "gpt-4.1-mini", "messages": HI, **SEEDED}
        first, again = app.post("chat/completions", body), app.post("chat/completions", body)
        assert "x-cache" not in again.headers and first.json()["id"] != again.json()["id"]
        assert app.core.service.cache is None
    finally:
        app.stop()


# ---- CACHE=database: shared by replicas -----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_database_cache_is_shared_by_replicas(
    backend, upstream: FakeUpstream, tmp_path
) -> None:
    with fresh_database(backend, tmp_path) as database:
        url = database.overrides.get("DATABASE_URL") or str(database.engine.url)
        env = {"CACHE": "database", "DATABASE_URL": url}
        one = start(upstream, tmp_path / "one", **env)
        two = start(upstream, tmp_path / "two", **env)
        try:
            body = {"model": "gpt-4.1-mini", "messages": HI, **SEEDED}
            first = one.post("chat/completions", body)
            again = two.post("chat/completions", body)
            assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
            assert again.content == first.content
            vectors = {"model": "text-embedding-3-small", "input": ["x y", "z"]}
            one.post("embeddings", vectors)
            assert two.post("embeddings", vectors).headers["x-cache"] == "hit"
            assert len(upstream.requests) == 2
        finally:
            one.stop()
            two.stop()


def test_cache_shared_lets_users_share_answers(upstream: FakeUpstream, tmp_path) -> None:
    app = start(upstream, tmp_path, CACHE="memory", CACHE_SHARED="true")
    try:
        _, ann = app.core.users.add("shared-ann")
        _, bob = app.core.users.add("shared-bob")
        body = {"model": "text-embedding-3-small", "input": "common knowledge"}
        assert app.post("embeddings", body, key=ann).headers["x-cache"] == "miss"
        assert app.post("embeddings", body, key=bob).headers["x-cache"] == "hit"
    finally:
        app.stop()


# ---- several backends: fallbacks, and backends that build their own answers ----------------


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Iterator[Team]:
    with running_team(tmp_path_factory.mktemp("cache-team"), CACHE="memory") as running:
        yield running


def test_a_fallbacks_answer_is_not_kept(team: Team) -> None:
    """error-503 falls back to ollama/llama3.2: that is not the answer error-503 names."""
    team.ollama.reset()
    for _ in range(2):
        raw = team.client.chat.completions.with_raw_response.create(
            model="openai/error-503", messages=HI, **SEEDED
        )
        assert raw.parse().model.endswith("llama3.2")  # the model that answered
        assert raw.headers["x-cache"] == "miss"
    assert len([r for r in team.ollama.requests if r["path"] == "/v1/chat/completions"]) == 2


def test_a_fallback_embeds_the_whole_batch_never_a_mix_of_models(team: Team) -> None:
    """Some inputs cached from openai/error-503, the rest sent: when that backend fails and
    ollama answers, every vector is ollama's (one model's vectors), and none is kept."""
    cache = team.core.service.cache
    material = {"function": "embedding", "backend": "openai", "model": "error-503",
                "form": "bytes", "dimensions": None, "body": {}}  # fmt: skip
    key = cache.key("owner-key", material | {"input": "cached words"})
    cache.store.put_many({key: b"[9.0,9.0,9.0,9.0,9.0,9.0,9.0,9.0]"}, ttl=60)
    team.ollama.reset()
    raw = team.client.embeddings.with_raw_response.create(
        model="openai/error-503", input=["cached words", "new words"]
    )
    assert raw.headers["x-cache"] == "miss"
    answer = raw.parse()
    assert answer.model.endswith("llama3.2")
    assert [9.0] * 8 not in [d.embedding for d in answer.data]
    sent = [r["json"]["input"] for r in team.ollama.requests if r["path"] == "/v1/embeddings"]
    assert sent == [["cached words", "new words"]]
    # The seeded entry was a hit before the failure: the key is the one the service uses.
    assert cache.store.get_many([key]) == {key: b"[9.0,9.0,9.0,9.0,9.0,9.0,9.0,9.0]"}


def test_the_embedded_models_seeded_answer_is_cached(team: Team) -> None:
    """A backend that builds its own answers (the typed path): streamed and not."""
    ask = {"model": f"local/{LOCAL}", "messages": HI, "max_tokens": 8, **SEEDED}
    first = team.client.chat.completions.with_raw_response.create(**ask)
    again = team.client.chat.completions.with_raw_response.create(**ask)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    streamed = [
        team.client.chat.completions.with_raw_response.create(**ask, stream=True) for _ in range(2)
    ]
    # Built here from the same chunks, streamed or not: one entry serves both.
    assert [s.headers["x-cache"] for s in streamed] == ["hit", "hit"]
    texts = [
        "".join(c.choices[0].delta.content or "" for c in s.parse() if c.choices) for s in streamed
    ]
    assert texts[0] == texts[1] == first.parse().choices[0].message.content


def test_hugging_face_embeddings_are_cached_per_input(team: Team) -> None:
    team.hf.requests.clear()
    team.client.embeddings.create(model=f"hf/{HF_EMBED}", input=["first text", "second"])
    raw = team.client.embeddings.with_raw_response.create(
        model=f"hf/{HF_EMBED}", input=["second", "third text"]
    )
    assert raw.headers["x-cache"] == "partial"
    assert len(raw.parse().data) == 2
    assert len(team.hf.requests) == 2


# ---- the pieces -----------------------------------------------------------------------------


def test_the_memory_store_is_bounded_and_expires() -> None:
    # Room for two entries of a one-letter key and four bytes, each counted with its overhead.
    store = MemoryStore(max_bytes=2 * (1 + 4 + ENTRY_BYTES) + 3)
    store.put_many({"a": b"1234", "b": b"5678"}, ttl=60)
    assert store.get_many(["a"]) == {"a": b"1234"}  # a is now the most recently used
    store.put_many({"c": b"90ab"}, ttl=60)  # a third: the least recently used goes
    assert set(store.get_many(["a", "b", "c"])) == {"a", "c"}
    store.put_many({"big": b"x" * store.max_bytes}, ttl=60)  # larger than the store: not kept
    assert store.get_many(["big"]) == {} and set(store.get_many(["a", "c"])) == {"a", "c"}
    store.put_many({"gone": b"1"}, ttl=-1)
    assert store.get_many(["gone"]) == {}


def test_many_small_entries_cannot_hold_more_memory_than_the_cap() -> None:
    """Embeddings of one dimension are tiny values: each entry's overhead counts too."""
    store = MemoryStore(max_bytes=1_000_000)
    store.put_many({f"{i:064x}": b"[0.5]" for i in range(20_000)}, ttl=60)
    assert len(store.get_many([f"{i:064x}" for i in range(20_000)])) < 3_000


@pytest.mark.parametrize(
    ("header", "use"),
    [
        (None, "use"),
        ("", "use"),
        ("no-cache", "refresh"),
        ("No-Cache, private", "refresh"),
        ("max-age=0", "refresh"),
        ("no-store", "skip"),
        ("no-cache, no-store", "skip"),
        ("max-age=60", "use"),
    ],
)
def test_cache_control_is_read_as_http_means_it(header: str | None, use: str) -> None:
    assert use_from(header) == use
    assert use_from(None, pragma=header) == use  # HTTP/1.0's Pragma: no-cache, alike


def test_a_wrong_cache_setting_is_one_clear_line() -> None:
    with pytest.raises(ConfigError, match=r"CACHE.*off, memory or database"):
        load_settings(environ={"CACHE": "redis"}, env_file=None)
