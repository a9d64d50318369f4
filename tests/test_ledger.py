"""The usage ledger and quotas, on SQLite always and on PostgreSQL when TEST_DATABASE_URL is set.

Every call through the service is a row (success, failure, invalid input, refusal), streams
included; quotas hold under concurrency, directly on the Service and over real HTTP.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from gradio_client import Client
from gradio_client.exceptions import AppError

from core import db, errors, tokens
from core import ledger as ledger_module
from core.auth import Principal
from core.context import Core, open_core
from core.ledger import Ledger, Limits
from core.pricing import PriceTable
from core.schemas import Usage
from core.service import Service
from tests.conftest import ACCESS_KEY, Served, app_settings, logged, serve
from tests.db_fixtures import BACKENDS, Database, fresh_database, needs_postgresql
from tests.upstream import FakeUpstream

# Five words, so the upstream reports 5 prompt tokens; the reply "Echo: ..." is 6 tokens.
WORDS = "alpha bravo charlie delta echo"
PARALLEL = 20


@pytest.fixture(scope="module", params=BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Database]:
    """One fresh database per backend for this module; tests use their own user names."""
    data_dir = tmp_path_factory.mktemp(f"ledger-{request.param}")
    with fresh_database(request.param, data_dir) as database:
        yield database


@contextmanager
def opened(upstream: FakeUpstream, database: Database, **overrides: str) -> Iterator[Core]:
    """The core (service, ledger, users) on the test database, with no Gradio."""
    core = open_core(app_settings(upstream, **database.overrides, **overrides))
    database.ledgers.append(core.ledger)
    try:
        yield core
    finally:
        core.ledger.flush()  # outcomes are written by a background thread
        database.ledgers.remove(core.ledger)
        core.ledger.engine.dispose()


def run(core: Core, coro: Any) -> Any:
    """Run one scenario on a fresh event loop and close the provider on that same loop."""

    async def main() -> Any:
        try:
            return await coro
        finally:
            await core.service.aclose()

    return asyncio.run(main())


def caller(name: str, *, rpm: int | None = None, daily_tokens: int | None = None) -> Principal:
    return Principal(name=name, role="user", limits=Limits(daily_tokens=daily_tokens, rpm=rpm))


async def chat(service: Service, who: Principal, content: str = WORDS, **extra: Any) -> str:
    request = {"messages": [{"role": "user", "content": content}], **extra}
    text = ""
    async for chunk in service.chat_stream(request, caller=who, source="test"):
        text += chunk.text
    return text


async def attempt(coro: Any) -> str | errors.ServiceError:
    """The call's result, or the service error it raised (for gather over many calls)."""
    try:
        return await coro
    except errors.ServiceError as exc:
        return exc


def chat_requests_with(upstream: FakeUpstream, marker: str) -> int:
    """How many chat requests carrying `marker` reached the upstream."""
    return sum(
        1
        for r in upstream.requests
        if r["path"] == "/v1/chat/completions" and marker in str(r["json"])
    )


def tokens_today(database: Database, user: str) -> int:
    """What the ledger says the user spent today (settled tokens plus any still held)."""
    start = datetime.combine(datetime.now(UTC).date(), datetime.min.time(), UTC)
    return sum(
        r["prompt_tokens"] + r["completion_tokens"] + r["reserved_tokens"]
        for r in database.usage(user=user)
        if _aware(r["ts"]) >= start
    )


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# ---- migrations -----------------------------------------------------------------------------


def test_migrations_run_once_and_record_their_versions(database: Database, tmp_path) -> None:
    with fresh_database(database.backend, tmp_path) as fresh:
        latest = db.MIGRATIONS[-1][0]
        assert db.migrate(fresh.engine) == latest
        assert db.migrate(fresh.engine) == latest  # the second run is a no-op
        with fresh.engine.connect() as conn:
            versions = conn.execute(
                sa.select(db.schema_version.c.version, db.schema_version.c.description).order_by(
                    db.schema_version.c.version
                )
            ).all()
            tables = set(sa.inspect(conn).get_table_names())
        assert [tuple(v) for v in versions] == [(v, d) for v, d, _ in db.MIGRATIONS]
        assert {"users", "usage", "schema_version"} <= tables
        # Append-only: versions only go up.
        numbers = [v for v, _, _ in db.MIGRATIONS]
        assert numbers == sorted(set(numbers))


def test_a_database_made_before_the_holder_column_gains_it(database: Database, tmp_path) -> None:
    """A database of schema 5 (made by an older release) keeps its rows and gets the column
    that names the process holding a pending row's tokens."""
    with fresh_database(database.backend, tmp_path) as fresh:
        with fresh.engine.begin() as conn:
            db.schema_version.create(conn)
            for version, description, apply in db.MIGRATIONS[:5]:
                apply(conn)
                conn.execute(
                    db.schema_version.insert().values(version=version, description=description)
                )
            conn.execute(sa.text("ALTER TABLE usage DROP COLUMN holder"))  # as v1 made it then
            conn.execute(
                sa.text(
                    'INSERT INTO usage (ts, "user", source, function, provider, status, '
                    "request_id) VALUES (:ts, 'old', 'v1', 'chat', 'openai', 'ok', 'req_old')"
                ),
                {"ts": datetime.now(UTC)},
            )
        assert db.migrate(fresh.engine) == db.MIGRATIONS[-1][0]
        with fresh.engine.connect() as conn:
            columns = {c["name"] for c in sa.inspect(conn).get_columns("usage")}
            kept = conn.execute(sa.select(db.usage.c.request_id, db.usage.c.holder)).all()
        assert "holder" in columns
        assert [tuple(row) for row in kept] == [("req_old", None)]


def test_a_new_migration_is_applied_once(database: Database, tmp_path, monkeypatch) -> None:
    applied: list[int] = []

    def v_next(conn: sa.Connection) -> None:
        applied.append(1)
        conn.execute(sa.text("CREATE TABLE migration_probe (id INTEGER PRIMARY KEY)"))

    with fresh_database(database.backend, tmp_path) as fresh:
        db.migrate(fresh.engine)
        following = db.MIGRATIONS[-1][0] + 1
        monkeypatch.setattr(db, "MIGRATIONS", [*db.MIGRATIONS, (following, "probe", v_next)])
        assert db.migrate(fresh.engine) == following
        assert db.migrate(fresh.engine) == following
        assert applied == [1]
        with fresh.engine.connect() as conn:
            versions = conn.execute(sa.select(db.schema_version.c.version)).scalars().all()
            assert "migration_probe" in sa.inspect(conn).get_table_names()
        assert sorted(versions) == [v for v, _, _ in db.MIGRATIONS]


# ---- one row per call, straight on the Service ------------------------------------------------


def test_a_successful_chat_is_one_row_with_tokens_cost_and_request_id(upstream, database) -> None:
    who = caller("row-ok")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one two three four five"},
    ]

    async def scenario(service: Service) -> tuple[str, Any]:
        text, usage = "", None
        async for chunk in service.chat_stream({"messages": messages}, caller=who, source="test"):
            text += chunk.text
            usage = chunk.usage or usage
        return text, usage

    with opened(upstream, database) as core:
        reply, usage = run(core, scenario(core.service))
    assert reply == "Echo: one two three four five"
    [row] = database.usage(user="row-ok")
    # The upstream counts words: 2 + 5 in, 6 out; the ledger has exactly what the stream said.
    assert (row["prompt_tokens"], row["completion_tokens"]) == (7, 6)
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 6)
    assert row["status"] == "ok"
    assert row["function"] == "chat"
    assert row["model"] == "gpt-4.1-mini"
    assert row["provider"] == "openai"
    assert row["source"] == "test"
    assert row["reserved_tokens"] == 0
    assert row["latency_ms"] > 0
    expected = PriceTable().cost("gpt-4.1-mini", prompt_tokens=7, completion_tokens=6)
    assert expected > 0
    assert row["cost_usd"] == pytest.approx(expected)
    assert row["request_id"].startswith("req_")
    assert f"request_id={row['request_id']}" in logged()
    assert abs(datetime.now(UTC) - _aware(row["ts"])) < timedelta(hours=1)


def test_a_model_id_longer_than_its_column_is_still_recorded(upstream, database) -> None:
    """Model ids may be 256 characters (a path on vLLM); the column holds 128. PostgreSQL
    refuses a longer value, and would lose the row with it: the ledger cuts it to fit."""
    long_id = "m" * 200  # the fake upstream answers 404 for it: a row all the same
    for who in (caller("row-long-free"), caller("row-long-quota", rpm=100)):

        async def scenario(service: Service, who: Principal = who) -> None:
            with pytest.raises(errors.ServiceError):
                await chat(service, who, model=long_id)

        with opened(upstream, database) as core:
            run(core, scenario(core.service))
        [row] = database.usage(user=who.name)
        assert row["model"] == long_id[:128]


def test_streamed_completion_and_embeddings_are_counted(upstream, database) -> None:
    who = caller("row-more")

    async def scenario(service: Service) -> None:
        text = ""
        request = {"prompt": "alpha beta", "max_tokens": 3}
        async for chunk in service.completion_stream(request, caller=who, source="test"):
            text += chunk.text
        assert text == " completion of: alpha"  # max_tokens=3 words
        result = await service.embeddings({"texts": ["one two", "three"]}, caller=who)
        assert result.usage.prompt_tokens == 3
        await chat(service, who, model="slow-0")  # a model with no price

    upstream.reset()
    with opened(upstream, database) as core:
        run(core, scenario(core.service))
    completion, embedding, unpriced = database.usage(user="row-more")
    assert (completion["function"], completion["model"]) == ("completion", "gpt-3.5-turbo-instruct")
    assert (completion["prompt_tokens"], completion["completion_tokens"]) == (2, 3)
    assert completion["cost_usd"] > 0
    assert (embedding["function"], embedding["model"]) == ("embedding", "text-embedding-3-small")
    assert (embedding["prompt_tokens"], embedding["completion_tokens"]) == (3, 0)
    assert embedding["cost_usd"] > 0
    assert embedding["source"] == "core"  # the default source
    assert (unpriced["status"], unpriced["cost_usd"]) == ("ok", 0)
    assert unpriced["prompt_tokens"] == 5 and unpriced["completion_tokens"] == 6
    # The stream asked the upstream for its usage, which is what the ledger holds.
    streamed = [r["json"] for r in upstream.requests if r["path"] == "/v1/completions"]
    assert streamed[-1]["stream"] is True
    assert streamed[-1]["stream_options"] == {"include_usage": True}


def test_image_tokens_are_counted_against_the_daily_quota(upstream, database) -> None:
    """gpt-image models report input and output tokens: the ledger records them, the daily
    quota counts them, and they are priced per token; a model that reports no tokens is
    charged its price per image."""
    budget = caller("row-images", daily_tokens=425)
    low = {"quality": "low"}  # holds 408 output tokens an image while it runs

    async def scenario(service: Service) -> list[Any]:
        return [
            # Holds 3 (+1) + 408 of 425 (prompts counted with OpenAI's tokenizer); spends 3 + 16.
            await service.generate_images({"prompt": "a red apple", **low}, caller=budget),
            # Needs 2 (+1) + 408 more: 19 + 411 > 425, so refused, and only because of those 19.
            await attempt(service.generate_images({"prompt": "a pear", **low}, caller=budget)),
            await service.generate_images(
                {"prompt": "a plum", "model": "dall-e-3"}, caller=caller("row-images-dalle")
            ),
        ]

    upstream.reset()
    prices = '{"dall-e-3": {"image": 0.04}}'
    with opened(upstream, database, PRICES_JSON=prices) as core:
        first, second, dalle = run(core, scenario(core.service))
    assert first.usage == Usage(prompt_tokens=3, completion_tokens=16, total_tokens=19)
    assert isinstance(second, errors.QuotaExceeded)
    assert dalle.usage is None and len(dalle.images) == 1
    images, refused = database.usage(user="row-images")
    assert (images["function"], images["model"]) == ("image", "gpt-image-1")
    assert (images["prompt_tokens"], images["completion_tokens"]) == (3, 16)
    tokens_cost = PriceTable().cost("gpt-image-1", prompt_tokens=3, completion_tokens=16, images=1)
    assert images["cost_usd"] == pytest.approx(tokens_cost)
    assert tokens_cost == pytest.approx((3 * 5.0 + 16 * 40.0) / 1_000_000)  # no per-image price
    assert refused["status"] == "refused"
    [unmetered] = database.usage(user="row-images-dalle")
    assert (unmetered["prompt_tokens"], unmetered["completion_tokens"]) == (0, 0)
    assert unmetered["cost_usd"] == pytest.approx(0.04)


def test_an_image_is_refused_when_its_largest_size_would_not_fit(upstream, database) -> None:
    """An image cannot be cut short like a reply: its whole bound is held before it is asked
    for, so a quota holds for images too, even with calls in parallel."""
    budget = caller("row-images-bound", daily_tokens=5000)

    async def scenario(service: Service) -> list[Any]:
        # A slow gpt-image model: every call has reserved before the first one ends.
        slow = {"prompt": "image-bound-marker", "model": "gpt-image-slow-0.3"}
        high = {**slow, "quality": "high"}  # holds 6240 an image
        low = {**slow, "quality": "low", "n": 2}  # 2 * 408
        return await asyncio.gather(
            attempt(service.generate_images(high, caller=budget)),
            *(attempt(service.generate_images(low, caller=budget)) for _ in range(8)),
        )

    upstream.reset()
    with opened(upstream, database) as core:
        high, *lows = run(core, scenario(core.service))
    assert isinstance(high, errors.QuotaExceeded)
    done = [r for r in lows if not isinstance(r, errors.ServiceError)]
    # Each holds its prompt (OpenAI's tokenizer, +1) and 2 * 408: that many fit at once.
    fit = 5000 // (tokens.counter("gpt-image-1")("image-bound-marker") + 1 + 816)
    assert len(done) == fit
    assert all(isinstance(r, errors.QuotaExceeded) for r in lows if r not in done)
    sent = [r for r in upstream.requests if r["path"] == "/v1/images/generations"]
    assert len(sent) == fit and all(r["json"]["quality"] == "low" for r in sent)


def test_an_upstream_failure_is_recorded(upstream, database) -> None:
    who = caller("row-failed")

    async def scenario(service: Service) -> list[Any]:
        return [
            await attempt(chat(service, who, model="error-500")),
            await attempt(chat(service, who, model="error-stream")),
        ]

    with opened(upstream, database) as core:
        failed, cut = run(core, scenario(core.service))
    assert isinstance(failed, errors.UpstreamError) and "500" in str(failed)
    assert isinstance(cut, errors.StreamInterrupted)
    failure, interrupted = database.usage(user="row-failed")
    assert failure["status"] == "UpstreamError"
    assert failure["request_id"] == failed.request_id
    assert failure["model"] == "error-500"
    assert interrupted["status"] == "StreamInterrupted"
    assert interrupted["request_id"] == cut.request_id
    for row in (failure, interrupted):
        assert row["function"] == "chat"
        assert row["provider"] == "openai"
        assert row["reserved_tokens"] == 0
    # Nothing was generated for the refused call; the cut stream had begun, so its tokens
    # are estimated (the upstream spent them) and count against the quota.
    assert failure["prompt_tokens"] == failure["completion_tokens"] == 0
    assert failure["cost_usd"] == 0
    assert interrupted["prompt_tokens"] > 0 and interrupted["completion_tokens"] > 0


def test_a_read_sees_every_outcome_handed_over_from_many_threads(upstream, database) -> None:
    """Outcomes are written in the background; a read (which flushes) must see each one that
    was handed over before it, whichever thread handed it over and whatever the writer was
    doing at that moment."""
    with opened(upstream, database) as core:
        ledger = core.ledger

        def hand_over(worker: int) -> int:
            seen = 0
            for i in range(60):
                ledger.record(
                    user=f"row-threads-{worker}",
                    function="chat",
                    model="gpt-4.1-mini",
                    provider="openai",
                    source="v1",
                    request_id=f"req_threads_{worker}_{i}",
                    status="ok",
                    prompt_tokens=1,
                )
                # Each read is right away, while other threads are still handing rows over.
                seen = len(ledger.rows(users=[f"row-threads-{worker}"]))
                assert seen == i + 1
            return seen

        with ThreadPoolExecutor(max_workers=6) as pool:
            assert list(pool.map(hand_over, range(6))) == [60] * 6


@pytest.mark.parametrize("statement", ["many rows at once", "a row at a time"])
def test_rows_written_together_are_each_recorded_and_counted(
    upstream, database, statement: str
) -> None:
    """The writer puts a batch's rows in one INSERT (SQLAlchemy's insertmanyvalues; a row at a
    time where the database has no RETURNING, SQLite before 3.35) and changes each user's
    counter once per batch: every row is there as it was handed over, and the counter holds
    what the rows add up to."""
    user = f"batch-{statement.split()[0]}"
    at = datetime.now(UTC).replace(microsecond=123456)
    with opened(upstream, database) as core:
        ledger = core.ledger
        if statement == "a row at a time":
            ledger._insert_many = ledger_module._INSERT
        # A quota'd call makes the user's counter for today.
        run(core, chat(core.service, caller(user, daily_tokens=100_000)))
        ledger.flush()
        for i in range(120):  # handed over together: a batch or a few
            for who in (user, f"{user}-other"):
                ledger.record(
                    user=who, function="chat", model=f"model-{i % 3}", provider="openai",
                    source="v1", request_id=f"req_{user}_{who}_{i}", status="ok",
                    prompt_tokens=i, completion_tokens=1, latency_ms=i / 10,
                    ts=at + timedelta(microseconds=i),
                )  # fmt: skip
        ledger.flush()
        with ledger.engine.connect() as conn:
            c = db.quota_counters.c
            spent = conn.execute(sa.select(c.spent).where(c.user == user)).scalar_one()
        read = ledger.rows(users=[user])
    rows = database.usage(user=user)
    assert len(rows) == 121 and len({r["request_id"] for r in rows}) == 121
    assert len(database.usage(user=f"{user}-other")) == 120
    assert spent == sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    assert spent == tokens_today(database, user) > sum(range(120)) + 120
    # Each value reads back as it was handed over: the time to the microsecond, the numbers.
    by_id = {r["request_id"]: r for r in rows}
    for i in (0, 7, 119):
        row = by_id[f"req_{user}_{user}_{i}"]
        assert _aware(row["ts"]) == at + timedelta(microseconds=i)
        assert (row["model"], row["prompt_tokens"], row["latency_ms"]) == (
            f"model-{i % 3}",
            i,
            i / 10,
        )
    # The usage page's read (core.ledger.rows) gives each row's own time too.
    read_at = dict(zip(read["request_id"], read["ts"], strict=True))
    assert len(read_at) == 121
    assert read_at[f"req_{user}_{user}_119"] == at + timedelta(microseconds=119)


@pytest.mark.parametrize("cancels", [1, 3])
def test_a_call_cancelled_while_its_reservation_is_written_releases_it(
    upstream, database, monkeypatch, cancels: int
) -> None:
    """The client leaves while the reservation's row is being written (by the ledger's
    reserving thread): the call waits for the row and settles it as cancelled, so no tokens
    stay held and nothing is sent; also when it is cancelled again while it waits (a Stop,
    then the server's shutdown)."""
    user = f"row-cancel-reserve-{cancels}"
    who = caller(user, daily_tokens=5000)
    upstream.reset()
    with opened(upstream, database) as core:
        ledger = core.ledger
        real = ledger._reserve_in
        writing = threading.Event()

        def slow_reserve(*args: Any) -> Any:
            writing.set()
            threading.Event().wait(0.5)  # the row is being written when the client leaves
            return real(*args)

        monkeypatch.setattr(ledger, "_reserve_in", slow_reserve)

        async def scenario() -> None:
            task = asyncio.ensure_future(chat(core.service, who, content="cancel-marker"))
            await asyncio.to_thread(writing.wait, 10)
            for _ in range(cancels):
                task.cancel()
                await asyncio.sleep(0.05)
            with pytest.raises(asyncio.CancelledError):
                await task

        run(core, scenario())
    [row] = database.usage(user=user)
    assert row["status"] == "cancelled"
    assert row["reserved_tokens"] == 0
    assert tokens_today(database, user) == 0
    assert chat_requests_with(upstream, "cancel-marker") == 0


def test_invalid_input_is_recorded_and_never_sent(upstream, database) -> None:
    who = caller("row-invalid")
    upstream.reset()
    with opened(upstream, database) as core, pytest.raises(errors.InvalidRequest) as bad:
        run(core, chat(core.service, who, content="invalid-marker", temperature=7))
    [row] = database.usage(user="row-invalid")
    assert row["status"] == "InvalidRequest"
    assert row["function"] == "chat"
    assert row["request_id"] == bad.value.request_id
    assert row["prompt_tokens"] == row["completion_tokens"] == row["reserved_tokens"] == 0
    assert chat_requests_with(upstream, "invalid-marker") == 0


def test_a_refusal_is_recorded_and_never_sent(upstream, database) -> None:
    once_a_minute = caller("row-refused", rpm=1)

    async def scenario(service: Service) -> list[Any]:
        return [
            await attempt(chat(service, once_a_minute, content="refused-marker")),
            await attempt(chat(service, once_a_minute, content="refused-marker")),
            # Not even the prompt fits in a daily quota of 3 tokens.
            await attempt(chat(service, caller("row-broke", daily_tokens=3))),
        ]

    upstream.reset()
    with opened(upstream, database) as core:
        first, per_minute, per_day = run(core, scenario(core.service))
    assert first == "Echo: refused-marker"
    assert isinstance(per_minute, errors.QuotaExceeded)
    assert isinstance(per_day, errors.QuotaExceeded)
    assert "1 requests per minute" in str(per_minute)
    assert "Try again in" in str(per_minute)
    assert 1 <= per_minute.retry_after <= 60
    # It could never fit: said so, with no time to come back at.
    assert "more than your whole daily quota of 3 tokens" in str(per_day)
    assert per_day.retry_after is None
    ok, refused = database.usage(user="row-refused")
    assert ok["status"] == "ok"
    assert refused["status"] == "refused"
    assert refused["request_id"] == per_minute.request_id
    assert refused["prompt_tokens"] == refused["completion_tokens"] == 0
    assert refused["reserved_tokens"] == 0
    [broke] = database.usage(user="row-broke")
    assert (broke["status"], broke["request_id"]) == ("refused", per_day.request_id)
    assert chat_requests_with(upstream, "refused-marker") == 1


# ---- LOG_CONTENT ------------------------------------------------------------------------------


def test_no_prompt_or_reply_text_is_stored_by_default(upstream, database, tmp_path) -> None:
    marker = "zebra-quartz-unique-words"
    with opened(upstream, database) as core:
        assert core.settings.log_content is False
        reply = run(core, chat(core.service, caller("content-off"), content=marker))
    assert reply == f"Echo: {marker}"
    [row] = database.usage(user="content-off")
    assert row["prompt_text"] is None and row["completion_text"] is None
    assert not any(marker in str(value) for r in database.usage() for value in r.values())
    if database.backend == "sqlite":
        # Not in the database files either (WAL included).
        folder = Path(database.overrides["DATA_DIR"])
        for path in folder.glob("dashboard.db*"):
            assert marker.encode() not in path.read_bytes(), path.name


def test_log_content_true_stores_prompt_and_reply(upstream, database) -> None:
    marker = "walrus-content-logged"
    with opened(upstream, database, LOG_CONTENT="true") as core:
        reply = run(core, chat(core.service, caller("content-on"), content=marker))
    [row] = database.usage(user="content-on")
    assert marker in row["prompt_text"]
    assert row["completion_text"] == reply == f"Echo: {marker}"


# ---- quotas under concurrency, straight on the Service ----------------------------------------


def test_rpm_holds_for_twenty_concurrent_calls(upstream, database) -> None:
    who = caller("burst-direct", rpm=5)

    async def scenario(service: Service) -> list[Any]:
        calls = [chat(service, who, content="burst-direct-marker") for _ in range(PARALLEL)]
        return await asyncio.gather(*(attempt(c) for c in calls))

    upstream.reset()
    with opened(upstream, database) as core:
        outcomes = run(core, scenario(core.service))
    kinds = Counter("ok" if isinstance(o, str) else type(o).__name__ for o in outcomes)
    assert kinds == {"ok": 5, "QuotaExceeded": 15}, [str(o) for o in outcomes]
    assert all("Try again in" in str(o) for o in outcomes if not isinstance(o, str))
    assert Counter(r["status"] for r in database.usage(user="burst-direct")) == {
        "ok": 5,
        "refused": 15,
    }
    assert chat_requests_with(upstream, "burst-direct-marker") == 5


def test_daily_tokens_hold_for_twenty_concurrent_calls(upstream, database) -> None:
    limit = 100
    who = caller("daily-direct", daily_tokens=limit)

    async def scenario(service: Service) -> tuple[list[Any], list[Any]]:
        calls = [chat(service, who, max_tokens=10) for _ in range(PARALLEL)]
        burst = await asyncio.gather(*(attempt(c) for c in calls))
        assert tokens_today(database, "daily-direct") <= limit
        # Then one at a time until the day's budget is really used up.
        after = []
        for _ in range(limit):
            after.append(await attempt(chat(service, who, max_tokens=10)))
            assert tokens_today(database, "daily-direct") <= limit
            if isinstance(after[-1], errors.QuotaExceeded):
                break
        return burst, after

    with opened(upstream, database) as core:
        burst, after = run(core, scenario(core.service))
    assert any(isinstance(o, str) for o in burst)
    refusals = [o for o in [*burst, *after] if isinstance(o, errors.ServiceError)]
    assert refusals and all(isinstance(r, errors.QuotaExceeded) for r in refusals)
    # Used up, or (while others run) held by calls in progress, with a short Retry-After.
    assert all(
        "resets at 00:00 UTC" in str(r) or ("in progress" in str(r) and r.retry_after <= 5)
        for r in refusals
    )
    assert isinstance(after[-1], errors.QuotaExceeded)
    rows = database.usage(user="daily-direct")
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows) <= limit
    assert all(r["reserved_tokens"] == 0 for r in rows)
    assert {r["status"] for r in rows} == {"ok", "refused"}


def test_a_prompt_denser_than_four_characters_a_token_cannot_overshoot_the_day(
    upstream, database
) -> None:
    limit = 60
    who = caller("dense-prompt", daily_tokens=limit)
    dense = " ".join(["a"] * 50)  # 50 tokens upstream: more than 4 characters a token

    with opened(upstream, database) as core:
        run(core, attempt(chat(core.service, who, content=dense)))
    rows = database.usage(user="dense-prompt")
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows) <= limit


# ---- pending rows -----------------------------------------------------------------------------


def test_release_stale_turns_old_pending_rows_into_interrupted(database) -> None:
    ledger = Ledger(database.engine, prices=PriceTable())
    db.migrate(database.engine)

    def reserve(tokens: int, *, minimum: int = 1) -> int:
        held = ledger.reserve(
            user="stale-user", limits=Limits(daily_tokens=1000), function="chat",
            model="gpt-4.1-mini", provider="openai", source="test", request_id="req_stale",
            estimate=tokens, minimum=minimum,
        )  # fmt: skip
        return held.row_id

    old, fresh = reserve(600), reserve(100)
    with database.engine.begin() as conn:
        when = datetime.now(UTC) - timedelta(minutes=10)
        conn.execute(db.usage.update().where(db.usage.c.id == old).values(ts=when))
    # The dead call's 600 tokens are still held against today's budget...
    with pytest.raises(errors.QuotaExceeded, match=r"700 of your 1,000 tokens today are held"):
        reserve(400, minimum=400)
    assert ledger.release_stale(timedelta(minutes=5)) == 1
    by_id = {r["id"]: r for r in database.usage(user="stale-user")}
    assert (by_id[old]["status"], by_id[old]["reserved_tokens"]) == ("interrupted", 0)
    assert (by_id[fresh]["status"], by_id[fresh]["reserved_tokens"]) == ("pending", 100)
    # ...and no longer once released.
    reserve(400, minimum=400)
    assert ledger.release_stale(timedelta(minutes=5)) == 0


def test_starting_the_app_releases_rows_a_dead_process_left_pending(upstream, database) -> None:
    ledger = Ledger(database.engine, prices=PriceTable())
    db.migrate(database.engine)
    held = ledger.reserve(
        user="crashed-user", limits=Limits(), function="chat", model="gpt-4.1-mini",
        provider="openai", source="test", request_id="req_crashed", estimate=50,
    )  # fmt: skip
    with database.engine.begin() as conn:
        when = datetime.now(UTC) - timedelta(hours=1)
        conn.execute(db.usage.update().where(db.usage.c.id == held.row_id).values(ts=when))
    with opened(upstream, database):
        pass
    [row] = database.usage(user="crashed-user")
    assert (row["status"], row["reserved_tokens"]) == ("interrupted", 0)


# ---- over real HTTP ---------------------------------------------------------------------------


@dataclass
class App:
    url: str
    core: Core

    def login(self, name: str, key: str = ACCESS_KEY) -> Client:
        return Client(self.url, auth=(name, key), verbose=False, analytics_enabled=False)

    def user(self, name: str, **limits: int) -> Client:
        """A new database user (role user) with these limits, logged in with their own key."""
        _, key = self.core.users.add(name, **limits)
        return self.login(name, key)


@pytest.fixture(scope="module")
def app(upstream: FakeUpstream, database: Database) -> Iterator[App]:
    from ui.server import create_app

    settings = app_settings(upstream, **database.overrides, LOGIN_MAX_FAILURES="1000")
    server = create_app(settings)
    served = serve(server)
    database.ledgers.append(server.state.core.ledger)
    try:
        yield App(served.url, server.state.core)
    finally:
        stop_now(served)
        server.state.core.ledger.flush()
        database.ledgers.remove(server.state.core.ledger)
        server.state.core.ledger.engine.dispose()


def stop_now(served: Served) -> None:
    """Stop without waiting for clients' idle heartbeat streams (like a crash or a redeploy)."""
    served.server.should_exit = served.server.force_exit = True
    served.thread.join(timeout=10)
    assert not served.thread.is_alive()


def in_parallel(call: Callable[[], Any], n: int = PARALLEL) -> tuple[list[Any], list[str]]:
    """Fire n calls at once from threads; returns (results, error messages)."""
    start = threading.Barrier(n)

    def fire() -> Any:
        start.wait(timeout=60)
        return call()

    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(fire) for _ in range(n)]
    results, failures = [], []
    for future in futures:
        try:
            results.append(future.result(timeout=120))
        except AppError as exc:
            failures.append(str(exc))
    return results, failures


def test_api_calls_are_recorded_under_the_signed_in_user(app: App, database: Database) -> None:
    bob = app.user("http-ledger", rpm=3)
    hello = [{"role": "user", "content": WORDS}]
    assert bob.predict(messages=hello, api_name="/chat") == f"Echo: {WORDS}"
    messages = []
    for kwargs in ({"model": "error-500"}, {"temperature": 7}, {}):
        with pytest.raises(AppError) as info:
            bob.predict(messages=hello, api_name="/chat", **kwargs)
        messages.append(str(info.value))
    assert "500" in messages[0]
    assert "temperature" in messages[1]
    assert "3 requests per minute" in messages[2] and "Try again in" in messages[2]
    rows = database.usage(user="http-ledger")
    assert [r["status"] for r in rows] == ["ok", "UpstreamError", "InvalidRequest", "refused"]
    assert {r["source"] for r in rows} == {"api"}
    assert {r["function"] for r in rows} == {"chat"}
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (5, 6)
    assert rows[0]["cost_usd"] > 0
    for row, message in zip(rows[1:], messages, strict=True):
        assert f"request id: {row['request_id']}" in message


def test_a_stream_over_http_is_counted_like_the_upstream_counted_it(app: App, database) -> None:
    client = app.user("http-stream")
    hello = [{"role": "user", "content": "one two three four five six seven"}]
    outputs = list(client.submit(messages=hello, api_name="/chat"))
    # The API sends the text so far at most every 30 ms; the upstream a word every 10 ms.
    assert len(outputs) >= 2 and outputs[-1] == "Echo: one two three four five six seven"
    outputs = list(client.submit(prompt="a b c d", max_tokens=2, api_name="/completion"))
    [chat_row, completion_row] = database.usage(user="http-stream")
    assert (chat_row["prompt_tokens"], chat_row["completion_tokens"]) == (7, 8)
    assert (completion_row["prompt_tokens"], completion_row["completion_tokens"]) == (4, 2)


def test_rpm_holds_for_twenty_parallel_http_calls(app: App, database, upstream) -> None:
    client = app.user("burst-http", rpm=5)
    hello = [{"role": "user", "content": "burst-http-marker"}]
    upstream.reset()
    replies, failures = in_parallel(lambda: client.predict(messages=hello, api_name="/chat"))
    assert replies == ["Echo: burst-http-marker"] * 5
    assert len(failures) == 15
    for message in failures:
        assert "QuotaExceeded" in message or "requests per minute" in message
        assert "Try again in" in message
        assert "request id: req_" in message
    rows = database.usage(user="burst-http")
    assert Counter(r["status"] for r in rows) == {"ok": 5, "refused": 15}
    assert chat_requests_with(upstream, "burst-http-marker") == 5


def test_daily_tokens_hold_for_twenty_parallel_http_calls(app: App, database) -> None:
    limit = 90
    client = app.user("daily-http", daily_tokens=limit)
    hello = [{"role": "user", "content": WORDS}]
    replies, failures = in_parallel(
        lambda: client.predict(messages=hello, max_tokens=10, api_name="/chat")
    )
    assert replies and failures
    assert all("resets at 00:00 UTC" in message or "in progress" in message for message in failures)
    rows = database.usage(user="daily-http")
    assert len(rows) == PARALLEL
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows) <= limit
    assert Counter(r["status"] for r in rows) == {"ok": len(replies), "refused": len(failures)}


def test_usage_aggregates_match_the_ledger_rows(app: App, database) -> None:
    """/usage (as the owner, an admin) sums exactly the rows in the database."""
    alice, bob = app.user("agg-alice", rpm=2), app.user("agg-bob")
    hello = [{"role": "user", "content": WORDS}]
    alice.predict(messages=hello, api_name="/chat")
    with pytest.raises(AppError):
        alice.predict(messages=hello, model="error-500", api_name="/chat")
    with pytest.raises(AppError):
        alice.predict(messages=hello, api_name="/chat")  # refused: 2 per minute
    bob.predict(prompt="one two three", api_name="/completion")
    bob.predict(texts=["one two", "three"], api_name="/embeddings")
    bob.predict(api_name="/models")
    owner = app.login("agg-owner")

    rows = database.usage()
    report = owner.predict(api_name="/usage")
    assert report["totals"] == expected_totals(rows)
    assert _by(report["by_user"], "user") == expected_by(rows, "user")
    assert _by(report["by_function"], "function") == expected_by(rows, "function")
    daily = defaultdict(lambda: [0, 0, 0.0])
    for r in rows:
        if r["model"]:
            key = (_aware(r["ts"]).strftime("%Y-%m-%d"), r["model"])
            daily[key][0] += 1
            daily[key][1] += r["prompt_tokens"] + r["completion_tokens"]
            daily[key][2] += r["cost_usd"]
    assert {(d["day"], d["model"]): [d["requests"], d["tokens"]] for d in report["daily"]} == {
        k: v[:2] for k, v in daily.items()
    }
    for d in report["daily"]:
        assert d["cost_usd"] == pytest.approx(daily[(d["day"], d["model"])][2], abs=1e-6)

    # Filters: one user, one model, and a range with nothing in it.
    only_alice = owner.predict(user="agg-alice", api_name="/usage")
    assert only_alice["totals"] == expected_totals(database.usage(user="agg-alice"))
    assert only_alice["totals"]["refused"] == 1 and only_alice["totals"]["failed"] == 1
    by_model = owner.predict(model="text-embedding-3-small", api_name="/usage")
    assert by_model["totals"] == expected_totals(database.usage(model="text-embedding-3-small"))
    today = datetime.now(UTC).date()
    tomorrow = str(today + timedelta(days=1))
    empty = owner.predict(start=tomorrow, end=tomorrow, api_name="/usage")
    assert empty["totals"]["requests"] == 0 and empty["by_user"] == []
    with pytest.raises(AppError, match="date"):
        owner.predict(start="not-a-day", api_name="/usage")


def expected_totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    statuses = [r["status"] for r in rows]
    prompt = sum(r["prompt_tokens"] for r in rows)
    completion = sum(r["completion_tokens"] for r in rows)
    return {
        "requests": len(rows),
        "succeeded": statuses.count("ok"),
        "failed": len(rows) - statuses.count("ok") - statuses.count("refused"),
        "refused": statuses.count("refused"),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost_usd": pytest.approx(sum(r["cost_usd"] for r in rows), abs=1e-6),
    }


def expected_by(rows: list[dict[str, Any]], column: str) -> dict[str, dict[str, int]]:
    groups: dict[str, dict[str, int]] = defaultdict(lambda: Counter())
    for r in rows:
        group = groups[r[column]]
        group["requests"] += 1
        group["failed"] += r["status"] not in ("ok", "refused")
        group["refused"] += r["status"] == "refused"
        group["tokens"] += r["prompt_tokens"] + r["completion_tokens"]
    return {k: dict(v) for k, v in groups.items()}


def _by(records: list[dict[str, Any]], column: str) -> dict[str, dict[str, int]]:
    keys = ("requests", "failed", "refused", "tokens")
    return {r[column]: {k: r[k] for k in keys} for r in records}


def test_users_and_rows_survive_an_app_restart(upstream, database: Database) -> None:
    from ui.server import create_app

    settings = app_settings(upstream, **database.overrides)
    first = create_app(settings)
    served = serve(first)
    try:
        _, key = first.state.core.users.add("restart-user", rpm=50, daily_tokens=5000)
        client = Client(served.url, auth=("restart-user", key), verbose=False)
        client.predict(messages=[{"role": "user", "content": WORDS}], api_name="/chat")
        before = client.predict(api_name="/usage")
    finally:
        stop_now(served)
        first.state.core.ledger.engine.dispose()
    assert before["totals"]["requests"] == 1

    second = create_app(app_settings(upstream, **database.overrides))
    served = serve(second)
    try:
        user = second.state.core.users.get("restart-user")
        assert user is not None and (user.rpm, user.daily_tokens) == (50, 5000)
        # The same key still signs in, and the usage recorded before the restart is there.
        client = Client(served.url, auth=("restart-user", key), verbose=False)
        after = client.predict(api_name="/usage")
        assert after["totals"] == before["totals"]
        assert after["totals"]["total_tokens"] == 11
    finally:
        stop_now(served)
        second.state.core.ledger.engine.dispose()
    [row] = database.usage(user="restart-user", function="chat")
    assert row["status"] == "ok"


def test_listing_models_writes_no_ledger_row(upstream, database) -> None:
    """A page load lists the models; that costs nothing and is not a call worth a row."""
    who = caller("row-models-only")
    with opened(upstream, database) as core:
        run(core, core.service.list_models(caller=who, source="ui", refresh=True))
    assert database.usage(user="row-models-only") == []


# ---- the journal and the heartbeat (issue 15) -----------------------------------------------


def _journal_of(ledger: Ledger) -> bytes:
    """What a ledger's journal holds now (its live file)."""
    assert ledger._journal is not None
    return ledger._journal.path.read_bytes()


def _dead_journal(folder: Path, content: bytes) -> Path:
    """A journal no process holds (its process died): the next replay takes it."""
    import secrets

    path = folder / f"{secrets.token_hex(8)}-1.jsonl"
    path.write_bytes(content)
    return path


def _settled_and_recorded(ledger: Ledger, user: str) -> tuple[int, list[str]]:
    """A quota call (reserved, then settled) and three whole rows, handed to `ledger`."""
    held = ledger.reserve(
        user=user, limits=Limits(daily_tokens=1000), function="chat", model="gpt-4.1-mini",
        provider="openai", source="test", request_id=f"req_{user}_held", estimate=100,
    )  # fmt: skip
    ledger.finish(
        held, status="ok", model="gpt-4.1-mini", provider="openai", prompt_tokens=5,
        completion_tokens=6, latency_ms=12.0,
    )  # fmt: skip
    ids = [f"req_{user}_{i}" for i in range(3)]
    for request_id in ids:
        ledger.record(
            user=user, function="chat", model="gpt-4.1-mini", provider="openai", source="v1",
            request_id=request_id, status="ok", prompt_tokens=5, completion_tokens=6,
        )  # fmt: skip
    return held.row_id, ids


def test_a_replayed_journal_writes_each_row_once(database, tmp_path) -> None:
    """Replaying a dead process's journal after its writer had committed everything, and
    again (twice the same file), leaves one row per call and the settlement as it was."""
    db.migrate(database.engine)
    folder = tmp_path / "journal"
    ledger = Ledger(database.engine, prices=PriceTable(), journal_dir=folder)
    row_id, ids = _settled_and_recorded(ledger, "journal-twice")
    ledger.flush()  # the writer committed all four outcomes
    content = _journal_of(ledger)
    assert content.count(b"\n") == 4
    before = database.usage(user="journal-twice")
    other = Ledger(database.engine, prices=PriceTable(), journal_dir=folder)
    for _ in range(2):
        dead = _dead_journal(folder, content)
        assert other.replay_dead() == 4
        assert not dead.exists()  # replayed, then removed
    after = database.usage(user="journal-twice")
    assert after == before
    assert sorted(r["request_id"] for r in after) == sorted(["req_journal-twice_held", *ids])
    [settled] = [r for r in after if r["id"] == row_id]
    assert (settled["status"], settled["completion_tokens"], settled["reserved_tokens"]) == (
        "ok",
        6,
        0,
    )
    ledger.close()
    other.close()
    assert not list(folder.glob("*.jsonl"))  # a clean close leaves nothing to replay


def test_a_replayed_settlement_wins_over_interrupted(database, tmp_path, monkeypatch) -> None:
    """The writer never wrote (the process died first): the journal alone has the outcomes.
    Another process had marked the pending row interrupted meanwhile; the replay records what
    the call really used. A line cut short by the kill is skipped, the rest replayed."""
    db.migrate(database.engine)
    folder = tmp_path / "journal"
    ledger = Ledger(database.engine, prices=PriceTable(), journal_dir=folder)
    monkeypatch.setattr(ledger, "_write_surely", lambda batch: None)  # dies before writing
    row_id, ids = _settled_and_recorded(ledger, "journal-only")
    ledger.flush()
    content = _journal_of(ledger)
    assert [r["status"] for r in database.usage(user="journal-only")] == ["pending"]
    with database.engine.begin() as conn:
        conn.execute(
            db.usage.update()
            .where(db.usage.c.id == row_id)
            .values(status="interrupted", reserved_tokens=0)
        )
    other = Ledger(database.engine, prices=PriceTable(), journal_dir=folder)
    _dead_journal(folder, content + b'["insert", {"user": "journal-on')  # torn last line
    assert other.replay_dead() == 4
    _dead_journal(folder, content)  # and once more: nothing doubles
    assert other.replay_dead() == 4
    rows = database.usage(user="journal-only")
    assert sorted(r["request_id"] for r in rows) == sorted(["req_journal-only_held", *ids])
    assert all(
        (r["status"], r["prompt_tokens"], r["completion_tokens"]) == ("ok", 5, 6) for r in rows
    )
    assert all(r["reserved_tokens"] == 0 for r in rows)
    assert "skipped 1 unreadable line(s)" in logged()


def test_a_live_process_journal_is_not_replayed(database, tmp_path) -> None:
    db.migrate(database.engine)
    folder = tmp_path / "journal"
    alive = Ledger(database.engine, prices=PriceTable(), journal_dir=folder)
    alive.record(
        user="journal-alive", function="chat", model="gpt-4.1-mini", provider="openai",
        source="v1", request_id="req_journal_alive", status="ok", prompt_tokens=1,
    )  # fmt: skip
    other = Ledger(database.engine, prices=PriceTable(), journal_dir=folder)
    assert other.replay_dead() == 0  # its process holds the lock
    assert alive._journal is not None and alive._journal.path.exists()
    alive.flush()
    assert len(database.usage(user="journal-alive")) == 1


def test_the_journal_starts_a_new_file_and_drops_the_written_ones(
    database, tmp_path, monkeypatch
) -> None:
    from core import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "JOURNAL_BYTES", 2000)
    db.migrate(database.engine)
    folder = tmp_path / "journal"
    ledger = Ledger(database.engine, prices=PriceTable(), journal_dir=folder)
    for i in range(60):
        ledger.record(
            user="journal-rotate", function="chat", model="gpt-4.1-mini", provider="openai",
            source="v1", request_id=f"req_rotate_{i}", status="ok", prompt_tokens=1,
        )  # fmt: skip
        ledger.flush()
    files = list(folder.glob("*.jsonl"))
    assert len(files) <= 2 and sum(f.stat().st_size for f in files) < 4000
    assert len(database.usage(user="journal-rotate")) == 60


def test_a_dead_process_holds_are_released_by_a_live_one(database, monkeypatch) -> None:
    """A pending row names its process; once that process has not beaten for STALE seconds,
    another process's heartbeat releases the row (interrupted, nothing held) and forgets the
    dead process. A row naming a live process is left alone."""
    from core import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "HEARTBEAT", 3600.0)  # beats only when called here
    db.migrate(database.engine)
    dead = Ledger(database.engine, prices=PriceTable())
    live = Ledger(database.engine, prices=PriceTable())
    dead.start(stale_unnamed=timedelta(hours=1))
    live.start(stale_unnamed=timedelta(hours=1))

    def reserve(ledger: Ledger, user: str) -> int:
        return ledger.reserve(
            user=user, limits=Limits(daily_tokens=1000), function="chat", model="gpt-4.1-mini",
            provider="openai", source="test", request_id=f"req_{user}", estimate=900,
        ).row_id  # fmt: skip

    gone, kept = reserve(dead, "holder-dead"), reserve(live, "holder-live")
    by_id = {r["id"]: r for r in database.usage() if r["id"] in (gone, kept)}
    assert (by_id[gone]["holder"], by_id[kept]["holder"]) == (dead.process_id, live.process_id)
    with database.engine.begin() as conn:  # `dead` stopped beating a minute ago
        conn.execute(
            db.processes.update()
            .where(db.processes.c.id == dead.process_id)
            .values(seen_at=datetime.now(UTC) - timedelta(minutes=1))
        )
    live._maintenance()
    by_id = {r["id"]: r for r in database.usage() if r["id"] in (gone, kept)}
    assert (by_id[gone]["status"], by_id[gone]["reserved_tokens"]) == ("interrupted", 0)
    assert (by_id[kept]["status"], by_id[kept]["reserved_tokens"]) == ("pending", 900)
    with database.engine.connect() as conn:
        ids = set(conn.execute(sa.select(db.processes.c.id)).scalars())
    assert dead.process_id not in ids and live.process_id in ids
    live.close()  # a clean stop removes its heartbeat row
    dead.close()
    with database.engine.connect() as conn:
        ids = set(conn.execute(sa.select(db.processes.c.id)).scalars())
    assert live.process_id not in ids


def test_the_heartbeat_outlives_a_database_outage(tmp_path, monkeypatch) -> None:
    """The database goes away: one warning, no exception out of the heartbeat; back, one
    line says so and the heartbeat row is written again."""
    from core import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "HEARTBEAT", 3600.0)
    engine = db.make_engine(f"sqlite:///{tmp_path / 'outage.db'}")
    db.migrate(engine)
    ledger = Ledger(engine, prices=PriceTable())
    ledger.start(stale_unnamed=timedelta(hours=1))
    real = ledger._beat

    def unreachable() -> None:
        raise sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(ledger, "_beat", unreachable)
    before = len(logged())
    for _ in range(3):
        ledger._maintenance()
    assert logged()[before:].count("heartbeat failed (the database is not answering)") == 1
    monkeypatch.setattr(ledger, "_beat", real)
    ledger._maintenance()
    assert "heartbeat reaches the database again" in logged()[before:]
    ledger.close()


# ---- running counters (issue 16): a quota check reads one row, whatever the day's history --


def _counter_and_rows(database: Database, ledger: Ledger, user: str) -> tuple[Any, Any]:
    """The user's counter row, and the same totals summed from today's rows (the record)."""
    ledger.flush()
    with database.engine.connect() as conn:
        counter = conn.execute(
            sa.select(db.quota_counters.c.spent, db.quota_counters.c.held,
                      db.quota_counters.c.running).where(db.quota_counters.c.user == user)
        ).first()  # fmt: skip
        summed = ledger._today(conn, user, datetime.now(UTC))
    return (tuple(counter) if counter else None), summed


def test_the_counters_match_the_rows_after_a_concurrent_mix(database) -> None:
    """Reservations, settlements, refusals and whole rows from 16 threads at once: the user's
    running counter ends equal to what today's rows add up to."""
    db.migrate(database.engine)
    ledger = Ledger(database.engine, prices=PriceTable())
    user, limits = "counted-user", Limits(daily_tokens=40_000)

    def one(i: int) -> None:
        if i % 5 == 0:  # a call that held no reservation (the user had no quota then)
            ledger.record(user=user, function="embedding", model="m", provider="openai",
                          source="test", request_id=f"req_rec{i}", status="ok",
                          prompt_tokens=7)  # fmt: skip
            return
        try:
            held = ledger.reserve(user=user, limits=limits, function="chat", model="m",
                                  provider="openai", source="test", request_id=f"req_c{i}",
                                  estimate=900, minimum=50)  # fmt: skip
        except errors.QuotaExceeded:
            return
        ledger.finish(held, status="ok", model="m", provider="openai", prompt_tokens=50,
                      completion_tokens=i % 300, latency_ms=1.0)  # fmt: skip

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(200)))
    counter, summed = _counter_and_rows(database, ledger, user)
    assert counter == summed and summed[1] == summed[2] == 0  # nothing held once all settled
    assert summed[0] > 0


def test_a_quota_check_reads_the_counter_not_the_days_rows(database) -> None:
    """With 20,000 of today's rows for the user, a check is one counter read: the rows are
    summed once (the first check of the day), then never again."""
    db.migrate(database.engine)
    ledger = Ledger(database.engine, prices=PriceTable())
    user, now = "busy-user", datetime.now(UTC)
    rows = [
        {"ts": now, "user": user, "source": "test", "function": "chat", "model": "m",
         "provider": "openai", "status": "ok", "request_id": f"req_h{i}",
         "prompt_tokens": 3, "completion_tokens": 2}
        for i in range(20_000)
    ]  # fmt: skip
    with database.engine.begin() as conn:
        conn.execute(db.usage.insert(), rows)
    summed: list[int] = []
    today = ledger._today
    ledger._today = lambda *args: summed.append(1) or today(*args)  # type: ignore[method-assign]
    for i in range(5):
        held = ledger.reserve(user=user, limits=Limits(daily_tokens=1_000_000), function="chat",
                              model="m", provider="openai", source="test",
                              request_id=f"req_b{i}", estimate=100)  # fmt: skip
        ledger.finish(held, status="ok", model="m", provider="openai", prompt_tokens=4,
                      completion_tokens=6, latency_ms=1.0)  # fmt: skip
    assert summed == [1]
    ledger._today = today  # type: ignore[method-assign]
    counter, summed_now = _counter_and_rows(database, ledger, user)
    assert counter == summed_now == (100_000 + 50, 0, 0)


def test_a_quota_check_does_not_wait_for_unrelated_ledger_writes(database) -> None:
    """The writer is stuck (the database slow to take a batch): a quota check of a user whose
    quota is far from spent goes ahead instead of waiting for the queue to drain."""
    db.migrate(database.engine)
    ledger = Ledger(database.engine, prices=PriceTable())
    stuck, release = _stuck_writer(ledger)
    try:
        ledger.record(user="other-user", function="chat", model="m", provider="openai",
                      source="test", request_id="req_other", status="ok",
                      prompt_tokens=5)  # fmt: skip
        assert stuck.wait(10)
        done = threading.Event()

        def check() -> None:
            ledger.reserve(user="free-user", limits=Limits(daily_tokens=10_000, rpm=100),
                           function="chat", model="m", provider="openai", source="test",
                           request_id="req_free", estimate=100)  # fmt: skip
            done.set()

        threading.Thread(target=check, daemon=True).start()
        assert done.wait(20) and not release.is_set()  # answered while the writer is stuck
    finally:
        release.set()


def test_counters_are_rebuilt_after_a_dead_processs_holds_are_released(database) -> None:
    db.migrate(database.engine)
    ledger = Ledger(database.engine, prices=PriceTable())
    user = "rebuilt-user"
    held = ledger.reserve(user=user, limits=Limits(daily_tokens=1_000), function="chat",
                          model="m", provider="openai", source="test", request_id="req_dead",
                          estimate=900)  # fmt: skip
    with database.engine.begin() as conn:
        when = datetime.now(UTC) - timedelta(minutes=10)
        conn.execute(db.usage.update().where(db.usage.c.id == held.row_id).values(ts=when))
    assert ledger.release_stale(timedelta(minutes=5)) == 1
    ledger.reserve(user=user, limits=Limits(daily_tokens=1_000), function="chat", model="m",
                   provider="openai", source="test", request_id="req_alive",
                   estimate=900)  # fmt: skip
    counter, summed = _counter_and_rows(database, ledger, user)
    assert counter == summed == (0, 900, 1)


def test_the_per_minute_wait_is_until_enough_requests_leave_the_window(database) -> None:
    """Four requests in the last minute, a limit of three: the next one fits once the third
    latest is a minute old (not the oldest: after it leaves, three remain)."""
    db.migrate(database.engine)
    ledger = Ledger(database.engine, prices=PriceTable())
    now = datetime.now(UTC)
    with database.engine.begin() as conn:
        conn.execute(
            db.usage.insert(),
            [
                {"ts": now - timedelta(seconds=ago), "user": "rpm-window", "source": "test",
                 "function": "chat", "model": "m", "provider": "openai", "status": "ok",
                 "request_id": f"req_w{ago}"}
                for ago in (55, 50, 40, 10)
            ],
        )  # fmt: skip
    with pytest.raises(errors.QuotaExceeded, match="3 requests per minute") as refused:
        ledger.reserve(user="rpm-window", limits=Limits(rpm=3), function="chat", model="m",
                       provider="openai", source="test", request_id="req_w_new",
                       estimate=10)  # fmt: skip
    assert refused.value.retry_after in (10, 11)  # the 50-second-old one leaves in 10 s


# From a review of the counters: every way a settlement, a release or a replay meets a counter
# being rebuilt leaves the counter equal to the rows.


def _reserve(ledger: Ledger, user: str, rid: str, estimate: int = 100) -> Any:
    return ledger.reserve(user=user, limits=Limits(daily_tokens=1000), function="chat",
                          model="m", provider="openai", source="test", request_id=rid,
                          estimate=estimate)  # fmt: skip


def _settle(ledger: Ledger, held: Any, prompt: int = 40, completion: int = 60) -> None:
    ledger.finish(held, status="ok", model="m", provider="openai", prompt_tokens=prompt,
                  completion_tokens=completion, latency_ms=1.0)  # fmt: skip


def _aged(database: Database, row_id: int) -> None:
    with database.engine.begin() as conn:
        when = datetime.now(UTC) - timedelta(minutes=10)
        conn.execute(db.usage.update().where(db.usage.c.id == row_id).values(ts=when))


def test_a_settlement_after_its_hold_was_released_still_counts(database) -> None:
    """A process thought dead (its heartbeat late through an outage) has its hold released, a
    check rebuilds the counter, then its writer settles the call: the tokens count."""
    db.migrate(database.engine)
    ledger = Ledger(database.engine, prices=PriceTable())
    held = _reserve(ledger, "late-settler", "req_late1", estimate=500)
    _aged(database, held.row_id)
    assert ledger.release_stale(timedelta(minutes=5)) == 1
    _reserve(ledger, "late-settler", "req_late2")  # rebuilds the counter
    _settle(ledger, held, 300, 200)
    counter, summed = _counter_and_rows(database, ledger, "late-settler")
    assert counter == summed == (500, 100, 1)


def test_a_settlement_written_twice_in_one_batch_counts_once(database) -> None:
    db.migrate(database.engine)
    ledger = Ledger(database.engine, prices=PriceTable())
    _reserve(ledger, "twice-settled", "req_tw0")
    held = _reserve(ledger, "twice-settled", "req_tw1")
    gate = threading.Event()
    write = ledger._write_batch
    ledger._write_batch = lambda batch: (gate.wait(10), write(batch))  # type: ignore[method-assign]
    for _ in range(3):  # the first batch waits; the next two settlements land in one batch
        _settle(ledger, held)
    gate.set()
    counter, summed = _counter_and_rows(database, ledger, "twice-settled")
    assert counter == summed == (100, 100, 1)


@pytest.mark.parametrize("other_step", ["release", "replay"])
def test_a_counter_rebuilt_while_another_process_releases_or_replays_is_right(
    database, other_step: str
) -> None:
    """A check rebuilds a user's counter from the rows (slowly) while another process
    releases that user's dead hold or replays its settlement: the counter ends right."""
    db.migrate(database.engine)
    ledger, other = (
        Ledger(database.engine, prices=PriceTable()),
        Ledger(database.engine, prices=PriceTable()),
    )
    user = f"raced-{other_step}"
    held = _reserve(ledger, user, f"req_{other_step}1", estimate=700)
    _aged(database, held.row_id)
    with database.engine.begin() as conn:
        conn.execute(db.quota_counters.delete())  # the next check rebuilds it
    read, today = threading.Event(), ledger._today

    def slowly(*args: Any) -> Any:
        out = today(*args)
        read.set()
        time.sleep(1.0)  # the other process commits meanwhile (PostgreSQL lets it)
        return out

    ledger._today = slowly  # type: ignore[method-assign]
    checking = threading.Thread(target=lambda: _reserve(ledger, user, f"req_{other_step}2"))
    checking.start()
    assert read.wait(10)
    if other_step == "release":
        assert other.release_stale(timedelta(minutes=5)) == 1
    else:
        entry = {"row_id": held.row_id, "rid": held.request_id, "c_user": user,
                 "c_day": str(held.day), "c_held": held.held, "c_tokens": 50,
                 "new_status": "ok", "new_model": "m", "new_provider": "openai",
                 "new_prompt_tokens": 20, "new_completion_tokens": 30, "new_latency_ms": 1.0,
                 "new_cost_usd": 0.0, "new_prompt_text": None,
                 "new_completion_text": None}  # fmt: skip
        other._replay_batch([("update", entry)])
    checking.join()
    ledger._today = today  # type: ignore[method-assign]
    counter, summed = _counter_and_rows(database, ledger, user)
    assert counter in (None, summed), (counter, summed)


def test_a_release_does_not_deadlock_with_a_writer_settling_the_same_user(database) -> None:
    """The writer has changed a user's counter and is about to settle the row; another
    process releases that row's hold meanwhile: both finish (no deadlock), counter right."""
    db.migrate(database.engine)
    url = database.engine.url.render_as_string(hide_password=False)
    mine, theirs = db.make_engine(url), db.make_engine(url)
    live, other = Ledger(mine, prices=PriceTable()), Ledger(theirs, prices=PriceTable())
    try:
        held = _reserve(live, "no-deadlock", "req_dl1", estimate=500)
        _aged(database, held.row_id)
        counted, paused = threading.Event(), []

        @sa.event.listens_for(mine, "before_cursor_execute")
        def pause(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            in_writer = threading.current_thread().name == "ledger"
            if in_writer and statement.lstrip().startswith("UPDATE usage") and not paused:
                paused.append(1)
                counted.set()
                time.sleep(1.0)  # counters changed, the row not yet: the release runs now

        _settle(live, held, 200, 100)
        assert counted.wait(10)
        other.release_stale(timedelta(minutes=5))  # raised DeadlockDetected on PostgreSQL
        counter, summed = _counter_and_rows(database, live, "no-deadlock")
        assert counter in (None, summed), (counter, summed)
    finally:
        mine.dispose()
        theirs.dispose()


def test_reservations_asked_together_are_one_transaction_and_one_failure_stays_its_own(
    tmp_path: Path,
) -> None:
    """Reservations asked while the reserving thread writes others go in one transaction,
    checked in order against one budget (the last one that does not fit is refused); one
    that fails for itself gets its error and the others their rows. (SQLite: PostgreSQL
    reserves each call in a thread of its own.)"""
    with fresh_database("sqlite", tmp_path) as database:
        _reservations_asked_together(database)


def _reservations_asked_together(database: Database) -> None:
    db.migrate(database.engine)
    ledger = Ledger(database.engine, prices=PriceTable())
    gate, inside = threading.Event(), threading.Event()
    real, begin = ledger._reserve_in, ledger._begin
    transactions = []

    def counted() -> Any:
        transactions.append(1)
        return begin()

    def observed(conn: Any, ask: Any, *rest: Any) -> Any:
        if ask.row["request_id"] == "req_gate":
            inside.set()
            gate.wait(10)  # the others queue up meanwhile
        if ask.row["request_id"] == "req_broken":
            raise ValueError("a row the database refuses")
        return real(conn, ask, *rest)

    ledger._reserve_in = observed  # type: ignore[method-assign]
    ledger._begin = counted  # type: ignore[method-assign]
    limits = Limits(daily_tokens=1000)

    def ask(rid: str, estimate: int) -> Any:
        try:
            return ledger.reserve(user="batched", limits=limits, function="chat", model="m",
                                  provider="openai", source="test", request_id=rid,
                                  estimate=estimate, minimum=estimate)  # fmt: skip
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(max_workers=5) as pool:
        first = pool.submit(ask, "req_gate", 100)
        assert inside.wait(10)
        later = [pool.submit(ask, rid, 400) for rid in ("req_a", "req_broken", "req_b", "req_c")]
        time.sleep(0.3)  # all four are queued behind the first
        gate.set()
        names = ["a", "broken", "b", "c"]
        answers = {rid: f.result(10) for rid, f in zip(names, later, strict=True)}
    assert first.result().held == 100
    assert answers["a"].held == 400 and answers["b"].held == 400
    assert isinstance(answers["broken"], ValueError)
    assert isinstance(answers["c"], errors.QuotaExceeded)  # 100 + 400 + 400 held: no room
    # The first alone, the four together (undone by the broken one), then each alone.
    assert len(transactions) == 1 + 1 + 4
    ledger.flush()
    rows = {r["request_id"]: r for r in database.usage(user="batched")}
    assert "req_broken" not in rows
    assert (rows["req_c"]["status"], rows["req_a"]["status"]) == ("refused", "pending")
    with database.engine.connect() as conn:
        held = conn.execute(
            sa.select(db.quota_counters.c.held).where(db.quota_counters.c.user == "batched")
        ).scalar()
    assert held == 900


def test_a_check_waiting_for_this_processs_settlements_holds_up_no_other_user(
    database,
) -> None:
    """A user whose day is all held by calls whose settlements are still queued (the writer
    slow to take them): that user's check waits for them, and another user's check goes
    ahead meanwhile."""
    db.migrate(database.engine)
    ledger = Ledger(database.engine, prices=PriceTable())
    held = _reserve(ledger, "held-up", "req_hu1", estimate=1000)  # all of the day's 1000
    stuck, release = _stuck_writer(ledger)
    try:
        _settle(ledger, held, 10, 10)  # queued: the writer is stuck on it
        assert stuck.wait(10)
        waiting = ThreadPoolExecutor(max_workers=1).submit(
            _reserve, ledger, "held-up", "req_hu2", 100
        )
        time.sleep(0.3)
        assert not waiting.done()  # it waits for its own settlement to be written...
        started = time.monotonic()
        other = _reserve(ledger, "somebody-else", "req_se1")  # ...and nobody else does
        assert other.held == 100 and time.monotonic() - started < 5
        assert not waiting.done()
    finally:
        release.set()
    assert waiting.result(10).held == 100  # then it fits: 20 spent, 100 held
    ledger.close()


def test_a_closed_ledger_refuses_reservations_at_once(database) -> None:
    db.migrate(database.engine)
    ledger = Ledger(database.engine, prices=PriceTable())
    _reserve(ledger, "before-close", "req_bc1")
    ledger.close()
    with pytest.raises(RuntimeError, match="closed"):
        _reserve(ledger, "after-close", "req_ac1")


@needs_postgresql
def test_one_users_lock_held_elsewhere_holds_up_no_other_user_on_postgresql(
    tmp_path: Path,
) -> None:
    """Another process holds one user's lock (PostgreSQL): that user's check waits for it,
    another user's does not."""
    with fresh_database("postgresql", tmp_path) as database:
        _one_users_lock_held_elsewhere(database)


def _one_users_lock_held_elsewhere(database: Database) -> None:
    db.migrate(database.engine)
    ledger = Ledger(database.engine, prices=PriceTable())
    with database.engine.begin() as conn:
        db.lock_user(conn, "locked-elsewhere")
        blocked = ThreadPoolExecutor(max_workers=1).submit(
            _reserve, ledger, "locked-elsewhere", "req_le1"
        )
        time.sleep(0.3)
        started = time.monotonic()
        assert _reserve(ledger, "free-meanwhile", "req_fm1").held == 100
        assert time.monotonic() - started < 5
        assert not blocked.done()
    assert blocked.result(10).held == 100
    ledger.close()


def _stuck_writer(ledger: Ledger) -> tuple[threading.Event, threading.Event]:
    """Make `ledger`'s writer stick on its next batch: (stuck: it is, release: let it go)."""
    stuck, release = threading.Event(), threading.Event()
    write = ledger._write_batch

    def slow(batch: Any) -> None:
        stuck.set()
        release.wait(30)
        write(batch)

    ledger._write_batch = slow  # type: ignore[method-assign]
    return stuck, release
