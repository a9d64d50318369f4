"""No answered call goes unrecorded when the process is stopped (issue 15): `python app.py` as a
real process, stopped with SIGTERM (what Docker and Railway send) while its ledger writer waits
on the database, or killed with SIGKILL in the middle of a burst (its journal is replayed at the
next start). Every call the clients got an answer for must have its row afterwards, once. And
the tokens a killed process's calls held come back while the other processes run."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from core import db
from core.users import UserStore
from tests.conftest import ACCESS_KEY
from tests.db_fixtures import PG_URL, Database, fresh_database
from tests.processes import launched
from tests.upstream import FakeUpstream

# Five words: the upstream reports 5 prompt tokens, and its reply "Echo: ..." is 6 tokens.
WORDS = "alpha bravo charlie delta echo"


def test_sigterm_while_the_ledger_waits_on_the_database_loses_no_row(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    with launched(upstream, {"DATA_DIR": str(tmp_path)}, tmp_path / "app.log") as app:
        # Another process holds the database's write lock: the ledger writer has to wait.
        holder = sqlite3.connect(tmp_path / "dashboard.db", timeout=5, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        body = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]}
        auth = {"Authorization": f"Bearer {ACCESS_KEY}"}
        answered = [
            httpx.post(app.url + "/v1/chat/completions", headers=auth, json=body, timeout=30)
            for _ in range(20)
        ]
        assert all(a.status_code == 200 for a in answered)
        app.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        holder.execute("ROLLBACK")  # the database is free again while the app shuts down
        holder.close()
        app.process.wait(timeout=60)
    with sqlite3.connect(tmp_path / "dashboard.db") as conn:
        ids = {row[0] for row in conn.execute("SELECT request_id FROM usage WHERE status = 'ok'")}
    assert ids >= {a.headers["x-request-id"] for a in answered}  # every answered call, recorded
    assert "ledger written before shutdown" in (tmp_path / "app.log").read_text()
    assert not list((tmp_path / "journal").rglob("*.jsonl"))  # a clean stop leaves no journal


# ---- kill -9 ----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A fresh database; PostgreSQL's needs TEST_DATABASE_URL (CI provides it: not a skip)."""
    if request.param == "postgresql" and not PG_URL:
        if os.environ.get("CI"):
            pytest.fail("needs TEST_DATABASE_URL (PostgreSQL); .ci/run provides it")
        pytest.skip("set TEST_DATABASE_URL to run on PostgreSQL")
    with fresh_database(request.param, tmp_path / "data") as database:
        yield database


@dataclass
class Answer:
    request_id: str | None
    status: int | None = None
    complete: bool = False  # status 200 and the whole body: for a stream, [DONE] and its end
    done_seen: bool = False  # a stream's [DONE] arrived (complete or not)


def chat(url: str, key: str, *, stream: bool, model: str = "gpt-4.1-mini", **extra: Any) -> Answer:
    """One /v1 chat call; what the client got of it (never raises for a dead server)."""
    body = {"model": model, "messages": [{"role": "user", "content": WORDS}], **extra}
    if stream:
        body["stream"] = True
    answer = Answer(None)
    got = b""
    try:
        with httpx.stream(
            "POST",
            url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json=body,
            timeout=60,
        ) as response:
            answer.request_id = response.headers.get("x-request-id")
            answer.status = response.status_code
            for piece in response.iter_bytes():
                got += piece
                answer.done_seen = b"data: [DONE]" in got
        # httpx raises if the connection ends before the body does.
        answer.complete = answer.status == 200 and (answer.done_seen or not stream)
        if answer.complete and not stream:
            assert b'"completion_tokens":6' in got.replace(b" ", b"")
    except httpx.HTTPError:
        pass
    return answer


def usage_rows(database: Database) -> list[dict[str, Any]]:
    """Every ledger row, read without waiting for a writer (the app's SQLite engine begins
    every transaction IMMEDIATE: a plain one reads while another process holds the lock)."""
    engine = database.engine
    if database.backend == "sqlite":
        engine = sa.create_engine(engine.url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(db.usage).order_by(db.usage.c.id))]


def assert_recorded_once(database: Database, answers: list[Answer]) -> None:
    """Every complete answer has exactly one ledger row, with the tokens it really used."""
    rows = usage_rows(database)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_id.setdefault(row["request_id"], []).append(row)
    duplicated = {rid: len(found) for rid, found in by_id.items() if len(found) > 1}
    assert not duplicated
    complete = [a for a in answers if a.complete]
    missing = [a.request_id for a in complete if a.request_id not in by_id]
    assert not missing, f"{len(missing)} of {len(complete)} answered calls have no row"
    for answer in complete:
        [row] = by_id[answer.request_id]
        assert row["status"] == "ok", row
        assert (row["prompt_tokens"], row["completion_tokens"], row["reserved_tokens"]) == (5, 6, 0)


def held_lock(database: Database) -> Any:
    """Block the app's ledger writes (its writer waits) until .release() is called: SQLite's
    write lock, or a PostgreSQL lock on the usage table that lets reads through."""
    if database.backend == "sqlite":
        conn = sqlite3.connect(Path(database.overrides["DATA_DIR"]) / "dashboard.db", timeout=30)
        conn.isolation_level = None
        conn.execute("BEGIN IMMEDIATE")

        class Lock:
            def release(self) -> None:
                conn.execute("ROLLBACK")
                conn.close()

        return Lock()
    pg = database.engine.connect()
    transaction = pg.begin()
    pg.execute(sa.text("LOCK TABLE usage IN SHARE MODE"))

    class PgLock:
        def release(self) -> None:
            transaction.rollback()
            pg.close()

    return PgLock()


def test_kill_9_loses_no_answered_call(
    upstream: FakeUpstream, database: Database, tmp_path: Path
) -> None:
    """SIGKILL gives the process no chance to write its queue: the answered calls' outcomes
    are in its journal (DATA_DIR/journal), which the next start replays, once each. Both
    ways an outcome is written: a whole row (the owner: no quota) and the settlement of a
    quota user's pending row (reserved before the call, settled after)."""
    app_log = tmp_path / "app.log"
    with launched(upstream, database.overrides, app_log) as app:
        _, user_key = UserStore(database.engine).add(
            "burst-user", daily_tokens=10_000_000, rpm=100_000
        )
        owner = ACCESS_KEY
        # 1. Rows that are certainly not in the database when the process dies: the writer
        # is held up (another process's lock) while calls are answered. Quota calls reserve
        # first, then are answered (and settled) while the lock is held.
        with ThreadPoolExecutor(max_workers=48) as pool:
            slow = [
                pool.submit(chat, app.url, user_key, stream=True, model="drip-0.3")
                for _ in range(12)
            ] + [
                pool.submit(chat, app.url, user_key, stream=False, model="slow-1.5")
                for _ in range(12)
            ]
            deadline = time.monotonic() + 30
            while sum(r["status"] == "pending" for r in usage_rows(database)) < len(slow):
                assert time.monotonic() < deadline, "the quota calls did not reserve"
                time.sleep(0.05)
            lock = held_lock(database)
            try:
                quick = list(pool.map(lambda i: chat(app.url, owner, stream=i % 2 == 0), range(60)))
                held = quick + [f.result() for f in slow]
                assert all(a.complete for a in held)
                # None of them is written: only the journal has them.
                written = {r["request_id"] for r in usage_rows(database) if r["status"] == "ok"}
                assert not written & {a.request_id for a in held}
                app.kill()
            finally:
                lock.release()

    # 2. A burst on the restarted app, killed halfway: answers complete just before the kill,
    # calls still running, calls refused at the door.
    with launched(upstream, database.overrides, app_log) as app:
        assert_recorded_once(database, held)  # replayed when it started
        answers: list[Answer] = []
        enough = threading.Event()

        def one(i: int) -> Answer:
            key = user_key if i % 4 < 2 else owner
            answer = chat(app.url, key, stream=i % 2 == 0)
            answers.append(answer)
            if sum(a.complete for a in answers) >= 100:
                enough.set()
            return answer

        with ThreadPoolExecutor(max_workers=24) as pool:
            running = [pool.submit(one, i) for i in range(200)]
            assert enough.wait(timeout=120), "the burst did not get 100 answers"
            app.kill()
            [f.result() for f in running]

    with launched(upstream, database.overrides, app_log) as app:
        answered = [a for a in answers if a.complete]
        assert 100 <= len(answered) < 200
        assert_recorded_once(database, held + answers)
        # Streams whose [DONE] came but not the end of the body are not counted above;
        # report how many there were (the window between the two, see README).
        cut = [a for a in answers if a.done_seen and not a.complete]
        print(f"answered {len(held) + len(answered)}; [DONE] without the body's end: {len(cut)}")
        app.stop()  # SIGTERM: a clean stop
    log = app_log.read_text()
    assert "replayed" in log
    journal = Path(database.overrides["DATA_DIR"]) / "journal"
    assert not list(journal.rglob("*.jsonl")), "a clean stop leaves no journal behind"


# ---- stale holds ----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Database, dict]]:
    """A database for two app processes, and the second one's settings: on SQLite the same
    DATA_DIR (the database is a file in it), on PostgreSQL a DATA_DIR of its own."""
    if request.param == "postgresql" and not PG_URL:
        if os.environ.get("CI"):
            pytest.fail("needs TEST_DATABASE_URL (PostgreSQL); .ci/run provides it")
        pytest.skip("set TEST_DATABASE_URL to run on PostgreSQL")
    with fresh_database(request.param, tmp_path / "a") as database:
        second = dict(database.overrides)
        if request.param == "postgresql":
            second["DATA_DIR"] = str(tmp_path / "b")
        yield database, second


def test_holds_of_a_killed_process_come_back_while_the_others_run(
    upstream: FakeUpstream, shared: tuple[Database, dict], tmp_path: Path
) -> None:
    """Process A runs two long streams that hold a user's whole day; A is killed. Process B,
    which keeps running, accepts the user's calls again once A has been silent for STALE
    seconds, and the killed calls' rows end `interrupted`, holding nothing."""
    database, b_overrides = shared
    beat = "0.5 4"  # a heartbeat every 0.5 s; silent for 4 s is dead
    with (
        launched(upstream, database.overrides, tmp_path / "a.log", heartbeat=beat) as a,
        launched(upstream, b_overrides, tmp_path / "b.log", heartbeat=beat) as b,
    ):
        _, key = UserStore(database.engine).add("held-user", daily_tokens=1000)
        auth = {"Authorization": f"Bearer {key}"}
        body = {"model": "drip-60", "messages": [{"role": "user", "content": "hi"}]}
        streams = []
        for extra in ({"max_tokens": 300}, {}):  # the second holds all the rest of the day
            request = httpx.Request(
                "POST",
                a.url + "/v1/chat/completions",
                headers=auth,
                json={**body, **extra, "stream": True},
            )
            client = httpx.Client(timeout=120)
            response = client.send(request, stream=True)
            assert response.status_code == 200  # reserved, and streaming
            streams.append((client, response))
        probe = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]}

        def ask_b() -> httpx.Response:
            return httpx.post(b.url + "/v1/chat/completions", headers=auth, json=probe, timeout=30)

        refused = ask_b()
        assert refused.status_code == 429
        assert "held by 2 call(s) in progress" in refused.json()["error"]["message"]
        held = [r for r in usage_rows(database) if r["status"] == "pending"]
        assert len(held) == 2 and sum(r["reserved_tokens"] for r in held) == 1000
        assert len({r["holder"] for r in held}) == 1 and held[0]["holder"]

        a.kill()
        for client, response in streams:
            response.close()
            client.close()
        deadline = time.monotonic() + 60  # generous: a few heartbeats after 4 s of silence
        while (answer := ask_b()).status_code != 200:
            assert answer.status_code == 429, answer.text
            assert time.monotonic() < deadline, "the killed calls still hold the day"
            time.sleep(0.5)
        assert b.process.poll() is None  # B was never restarted
        rows = {r["id"]: r for r in usage_rows(database)}
        for row in held:
            assert (rows[row["id"]]["status"], rows[row["id"]]["reserved_tokens"]) == (
                "interrupted",
                0,
            )
        assert "released 2 call(s) held by 1 process(es)" in (tmp_path / "b.log").read_text()
        with database.engine.connect() as conn:
            ids = set(conn.execute(sa.select(db.processes.c.id)).scalars())
        assert held[0]["holder"] not in ids  # the dead process is forgotten
        b.stop()
    with database.engine.connect() as conn:
        assert len(conn.execute(sa.select(db.processes)).all()) == 0  # B left cleanly


def test_a_journal_is_per_database(tmp_path: Path) -> None:
    """Apps on different databases sharing a DATA_DIR never replay each other's rows."""
    from core.ledger import journal_folder

    one = db.make_engine(f"sqlite:///{tmp_path / 'one.db'}")
    two = db.make_engine(f"sqlite:///{tmp_path / 'two.db'}")
    assert journal_folder(tmp_path, one) != journal_folder(tmp_path, two)
    assert journal_folder(tmp_path, one) == journal_folder(tmp_path, one)


@pytest.mark.parametrize("cache", ["off", "memory"])
def test_a_stream_sends_done_only_once_its_call_is_in_the_journal(
    upstream: FakeUpstream, tmp_path: Path, cache: str
) -> None:
    """A client may stop reading at [DONE] and the process die next: by then the call's row
    must be on disk. The ledger is slowed down here, so that a [DONE] sent before the call
    is recorded would reach the client first. A stream replayed from the cache too."""
    from tests.conftest import app_settings, serve
    from ui.server import create_app

    app = create_app(app_settings(upstream, DATA_DIR=str(tmp_path), CACHE=cache))
    ledger = app.state.core.ledger
    submit = ledger._submit

    def slowly(kind: str, params: dict[str, Any]) -> None:
        time.sleep(0.5)
        submit(kind, params)

    ledger._submit = slowly
    served = serve(app)
    try:
        body = {"model": "gpt-4.1-mini", "stream": True, "temperature": 0, "seed": 1,
                "messages": [{"role": "user", "content": WORDS}]}  # fmt: skip
        headers = {"Authorization": f"Bearer {ACCESS_KEY}"}
        for _ in range(2):  # with CACHE=memory, the second is a hit
            with httpx.stream(
                "POST", served.url + "/v1/chat/completions", json=body, headers=headers
            ) as answer:
                request_id = answer.headers["x-request-id"]
                for line in answer.iter_lines():
                    if line == "data: [DONE]":
                        journaled = b"".join(
                            p.read_bytes() for p in (tmp_path / "journal").rglob("*.jsonl")
                        )
                        assert request_id.encode() in journaled
                        break
                else:
                    raise AssertionError("no [DONE]")
    finally:
        served.stop()


def test_sigterm_with_a_stream_still_open_stops_in_time_and_writes_the_ledger(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A stream that would run for a minute does not hold the shutdown: the process ends
    well inside Docker's 10 s before SIGKILL, with the ledger written, the cut call in it."""
    with launched(upstream, {"DATA_DIR": str(tmp_path)}, tmp_path / "app.log") as app:
        words = " ".join(["word"] * 60)  # drip-1.0: one word a second
        body = {
            "model": "drip-1.0",
            "stream": True,
            "messages": [{"role": "user", "content": words}],
        }
        auth = {"Authorization": f"Bearer {ACCESS_KEY}"}
        with httpx.stream(
            "POST", app.url + "/v1/chat/completions", headers=auth, json=body, timeout=90
        ) as streamed:
            assert streamed.status_code == 200
            request_id = streamed.headers["x-request-id"]
            lines = streamed.iter_lines()
            while "Echo" not in next(lines):  # the reply has begun
                pass
            app.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            app.process.wait(timeout=30)
            stopped_after = time.monotonic() - started
    assert stopped_after < 9.0, f"shutdown took {stopped_after:.1f} s"
    assert "ledger written before shutdown" in (tmp_path / "app.log").read_text()
    with sqlite3.connect(tmp_path / "dashboard.db") as conn:
        rows = conn.execute(
            "SELECT status FROM usage WHERE request_id = ?", (request_id,)
        ).fetchall()
    assert len(rows) == 1 and rows[0][0] != "ok", rows
