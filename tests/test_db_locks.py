"""A database write lock held by another process (issue 15) freezes nothing.

Another connection holds SQLite's write lock (BEGIN IMMEDIATE) for as long as the test likes.
Reads begin DEFERRED (core.db.reading), so they neither take nor wait for that lock, and no
database wait ever runs on the event loop: /health, the login page, a sign-in, signed-in
dashboard requests and /v1 calls all answer while it is held, even while other requests of
the same server wait for it (a quota that must be written, a key lookup that must read). The
assertions are about order (answered before the lock was released), never about time."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from core import auth, db
from core.context import Core
from core.users import UserStore
from tests.conftest import ACCESS_KEY, Served, app_settings, serve
from tests.upstream import FakeUpstream

CHAT = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]}


def other_connection(path: Path) -> sqlite3.Connection:
    """A connection of "another process": its own, outside SQLAlchemy; never waits."""
    return sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)


def can_take_write_lock(path: Path) -> bool:
    other = other_connection(path)
    try:
        other.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
        return False
    else:
        other.execute("ROLLBACK")
        return True
    finally:
        other.close()


def test_a_read_transaction_does_not_take_the_write_lock_a_write_does(tmp_path: Path) -> None:
    engine = db.make_engine(db.database_url(tmp_path, None))
    db.migrate(engine)
    path = tmp_path / "dashboard.db"
    try:
        with db.reading(engine) as conn:
            conn.execute(sa.select(db.users)).all()
            assert conn.in_transaction()
            assert can_take_write_lock(path)  # the read's transaction left the lock free
        with engine.begin() as conn:
            conn.execute(sa.select(db.users)).all()
            assert not can_take_write_lock(path)  # a normal transaction takes it up front
        with engine.connect() as conn:
            conn.execute(sa.select(db.users)).all()
            assert not can_take_write_lock(path)  # reading() marks its own connection only
        # And while another process holds the lock, reads go on (a wait would be 30 s, then
        # "database is locked"); the users, keys and sessions stores read this way.
        store = UserStore(engine)
        _, key = store.add("reader")
        holder = other_connection(path)
        holder.execute("BEGIN IMMEDIATE")
        try:
            assert store.get("reader") is not None
            assert store.authenticate_key(key) is not None
            assert store.list()
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    finally:
        engine.dispose()


# ---- the whole app, over HTTP, while another connection holds the write lock ---------------


@dataclass
class Replica:
    url: str
    core: Core
    served: Served
    # Statements the database was sent from a thread that runs an event loop: none, ever.
    on_loop: list[str] = field(default_factory=list)

    def http(self, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def bearer(self, key: str) -> httpx.Client:
        return self.http(authorization=f"Bearer {key}")


def start(upstream: FakeUpstream, data: Path) -> Replica:
    from ui.server import create_app

    app = create_app(app_settings(upstream, DATA_DIR=str(data)))
    replica = Replica("", app.state.core, serve(app))
    replica.url = replica.served.url

    @sa.event.listens_for(replica.core.users.engine, "before_cursor_execute")
    def _statement(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # a worker thread: waiting there is fine
        replica.on_loop.append(statement)

    return replica


@pytest.fixture
def pair(upstream: FakeUpstream, tmp_path: Path, monkeypatch) -> Iterator[tuple[Replica, Replica]]:
    """Two replicas on one SQLite database: `there` has never read what `here` made."""
    # Copies read a minute ago still count as fresh: a lookup made twice is surely cached.
    monkeypatch.setattr(auth, "REVOKED_WITHIN", 60.0)
    monkeypatch.setattr(auth, "RESOLVED_WITHIN", 60.0)
    here = start(upstream, tmp_path)
    there = start(upstream, tmp_path)
    try:
        yield here, there
    finally:
        for replica in (here, there):
            replica.served.server.should_exit = replica.served.server.force_exit = True
            replica.served.thread.join(timeout=10)
            replica.core.users.engine.dispose()


class Background:
    """A request made in a thread; `answers` (shared) notes when it was answered."""

    def __init__(self, label: str, answers: list[str], call: Any) -> None:
        self.response: httpx.Response | None = None

        def run() -> None:
            self.response = call()
            answers.append(label)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self) -> httpx.Response:
        self.thread.join(timeout=60)
        assert self.response is not None
        return self.response


def sign_in(http: httpx.Client, name: str, key: str) -> httpx.Client:
    answer = http.post("/login", data={"username": name, "password": key})
    assert answer.status_code == 200, answer.text
    return http


def completed(http: httpx.Client, api_name: str) -> bool:
    job = http.post(f"/gradio_api/call/{api_name}", json={"data": []})
    assert job.status_code == 200, job.text
    answer = http.get(f"/gradio_api/call/{api_name}/{job.json()['event_id']}")
    return answer.status_code == 200 and "event: complete" in answer.text


def test_a_held_write_lock_freezes_nothing(pair, tmp_path: Path) -> None:
    here, there = pair
    _, user_key = here.core.users.add("lock-user", rpm=1000)
    _, quota_key = here.core.users.add("lock-quota", rpm=1000)
    _, late_key = here.core.users.add("lock-late")
    # Before the lock: each replica's first /health (it waits for its first database check),
    # the user's key once on `here` (so its lookup is cached there), two sign-ins there.
    for replica in (here, there):
        assert replica.http().get("/health").status_code == 200
    assert here.bearer(user_key).get("/v1/models").status_code == 200
    user_browser = sign_in(here.http(), "lock-user", user_key)
    owner_browser = sign_in(here.http(), "boss", ACCESS_KEY)

    # A key lookup on `there` that waits for the lock: read as every read was read before
    # (BEGIN IMMEDIATE), so that a request really waits on the database meanwhile.
    waiting = threading.Event()
    read = there.core.users.key_credential

    def waits_for_the_lock(key: str, *, max_age: float = 0.0) -> Any:
        waiting.set()
        with there.core.users.engine.begin() as conn:
            conn.exec_driver_sql("SELECT 1")
        return read(key, max_age=max_age)

    answers: list[str] = []
    holder = other_connection(tmp_path / "dashboard.db")
    holder.execute("BEGIN IMMEDIATE")
    try:
        # A call whose quota must be written (it waits for the lock, in a thread), and a key
        # lookup that must wait too: the same servers answer everything else meanwhile.
        quota = Background(
            "quota", answers, lambda: here.bearer(quota_key).post("/v1/chat/completions", json=CHAT)
        )
        there.core.users.key_credential = waits_for_the_lock  # type: ignore[method-assign]
        slow = Background("slow lookup", answers, lambda: there.bearer(late_key).get("/v1/models"))
        assert waiting.wait(30)

        for replica in (here, there):
            health = replica.http().get("/health")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            page = replica.http().get("/")
            assert page.status_code == 200 and 'action="login"' in page.text
            assert replica.bearer(ACCESS_KEY).get("/v1/models").status_code == 200
        answers.append("health, login page, owner key")
        # A user's key: cached here; read on `there` (a deferred read: no wait).
        there.core.users.key_credential = read  # type: ignore[method-assign]
        assert here.bearer(user_key).get("/v1/models").status_code == 200
        assert there.bearer(user_key).get("/v1/models").status_code == 200
        answers.append("user keys")
        # Signed-in dashboard requests: the page, its config, an event; on `there` the
        # session's key version is read (deferred), on `here` it is in memory.
        for http in (user_browser, owner_browser):
            assert http.get("/").status_code == 200 and http.get("/config").status_code == 200
            assert completed(http, "models")
        away = there.http()
        away.cookies = user_browser.cookies
        assert away.get("/config").status_code == 200 and completed(away, "models")
        # A sign-in: the user is looked up before Gradio's hook runs (deferred, in a thread).
        assert completed(sign_in(there.http(), "lock-quota", quota_key), "models")
        answers.append("dashboard and sign-in")
        # The two waiting requests are still waiting: the lock is still held.
        assert quota.thread.is_alive() and slow.thread.is_alive()
        answers.append("released")  # just below; neither can be answered before
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert quota.result().status_code == 200, quota.result().text
    assert slow.result().status_code == 200, slow.result().text
    while_held = ["health, login page, owner key", "user keys", "dashboard and sign-in"]
    assert answers[:4] == [*while_held, "released"]
    assert sorted(answers[4:]) == ["quota", "slow lookup"]
    # Nothing above sent the database a statement from an event loop's thread.
    assert here.on_loop == [] and there.on_loop == []
