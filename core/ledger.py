"""The usage ledger: one row per call, and per-user quotas enforced in the same transaction."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from core import db
from core.endpoints import ENDPOINTS
from core.errors import QuotaExceeded
from core.pricing import PriceTable

try:
    import fcntl
except ImportError:  # not on Windows: no journal there
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("core.ledger")
HELD_RETRY = 2  # seconds: tokens held by calls in progress come back when they settle
# Every HEARTBEAT seconds a process says it is alive (core.db.processes); one unheard of for
# STALE seconds is dead, and the processes still running release the tokens its calls held.
HEARTBEAT = 5.0
STALE = 30.0
# Every SWEEP seconds, holds of a process with no heartbeat row at all are looked for too (a
# scan of the last RECENT days of rows: older holds no longer count against any quota).
SWEEP = 600.0
RECENT = timedelta(days=2)
# The journal starts a new file past this size; the old one goes once all it holds is written.
JOURNAL_BYTES = 256 * 1024
# Once an outcome arrives, the writer gathers what comes in the next LINGER seconds into the
# same transaction: under load, one transaction per few dozen calls instead of per call or two
# (the journal keeps them meanwhile; a flush, and so a quota check that needs this process's
# rows, does not wait for it). 5 ms cost 74 us of CPU per call at 1,000 calls/s, 20 ms 43 us.
LINGER = 0.02
QUOTA_FUNCTIONS = tuple(ENDPOINTS)  # every function is counted against the quota
COLUMNS = [
    "ts",
    "user",
    "source",
    "function",
    "model",
    "provider",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "cost_usd",
    "request_id",
]


# Built once (SQLAlchemy memoizes their cache keys); executed many rows at a time.
_INSERT = db.usage.insert()
# Many rows in one statement (SQLAlchemy's "insertmanyvalues", which RETURNING turns on), not
# a statement per row: sqlite3 lets go of the GIL around each statement's every step, and
# taking it back from a busy event loop waits up to its switch interval (5 ms). Measured with
# the event loop busy, 20 rows: 37 us of CPU a row against 62, and 0.8 ms of wall time
# against 3.1.
_INSERT_MANY = db.usage.insert().returning(db.usage.c.id)
_SETTLE = (
    db.usage.update()
    # The request id too: a journal replayed into another database changes no other row.
    .where(db.usage.c.id == sa.bindparam("row_id"), db.usage.c.request_id == sa.bindparam("rid"))
    .values(
        status=sa.bindparam("new_status"),
        # A fallback's answer: the backend and model that answered, not the ones asked.
        model=sa.bindparam("new_model"),
        provider=sa.bindparam("new_provider"),
        prompt_tokens=sa.bindparam("new_prompt_tokens"),
        completion_tokens=sa.bindparam("new_completion_tokens"),
        reserved_tokens=0,
        latency_ms=sa.bindparam("new_latency_ms"),
        cost_usd=sa.bindparam("new_cost_usd"),
        prompt_text=sa.bindparam("new_prompt_text"),
        completion_text=sa.bindparam("new_completion_text"),
    )
)


@dataclass(frozen=True)
class Limits:
    daily_tokens: int | None = None
    rpm: int | None = None


@dataclass
class Reservation:
    """A pending ledger row, holding its tokens against the daily budget until it finishes."""

    row_id: int
    token_budget: int | None  # what this call may still spend today (None: no limit)
    request_id: str = ""
    user: str = ""
    day: date | None = None  # the UTC day whose counters hold its tokens
    held: int = 0


@dataclass
class _Ask:
    """A reservation asked of the ledger, answered through `answer` (a Reservation, or the
    exception: QuotaExceeded, or the database's)."""

    row: dict[str, Any]  # the call's ledger row, but its status and holding
    limits: Limits
    estimate: int
    minimum: int
    answer: Callable[[Reservation | BaseException], None]
    waited: bool = False  # for this process's writer, once: see _reserve_in


class _AskAgain:
    """A flush marker (the writer calls set() once what was queued before it is written)
    that hands an ask back to the reserving thread instead of waking a waiter: that thread
    never waits for the writer itself."""

    def __init__(self, asks: queue.SimpleQueue[_Ask | None], ask: _Ask) -> None:
        self.asks, self.ask = asks, ask

    def set(self) -> None:
        self.asks.put(self.ask)


_C = db.quota_counters.c
_U = db.usage.c
_COUNTER = sa.select(_C.day, _C.spent, _C.held, _C.running).where(_C.user == sa.bindparam("user"))
# The requests of a user's last minute, latest first (refused calls and answers from the
# response cache cost no request): the one `skip` rows down.
_NTH_RECENT = (
    sa.select(_U.ts)
    .where(
        _U.user == sa.bindparam("user"),
        _U.ts >= sa.bindparam("since"),
        _U.status.not_in(("refused", "cached")),
        _U.function.in_(QUOTA_FUNCTIONS),
    )
    .order_by(_U.ts.desc())
    .limit(1)
    .offset(sa.bindparam("skip"))
)


def _row(column: Any) -> Any:
    """`column` of the row a settlement names, as it is before the settlement."""
    return (
        sa.select(column)
        .where(_U.id == sa.bindparam("row_id"), _U.request_id == sa.bindparam("rid"))
        .scalar_subquery()
    )


# A settlement changes the counter by what it changes on its row (whatever the row's status:
# pending, already settled, or released as interrupted): run before the row's.
_SETTLE_COUNTER = (
    db.quota_counters.update()
    .where(
        _C.user == sa.bindparam("c_user"),
        _C.day == sa.bindparam("c_day"),
        sa.exists().where(
            db.usage.c.id == sa.bindparam("row_id"), db.usage.c.request_id == sa.bindparam("rid")
        ),
    )
    .values(
        held=_C.held - _row(db.usage.c.reserved_tokens),
        running=_C.running - _row(sa.case((db.usage.c.reserved_tokens > 0, 1), else_=0)),
        spent=_C.spent
        + sa.bindparam("c_tokens")
        - _row(db.usage.c.prompt_tokens + db.usage.c.completion_tokens),
    )
)
# A whole row (a caller without quotas) adds its tokens; a reservation, what it holds.
_SPEND_COUNTER = (
    db.quota_counters.update()
    .where(_C.user == sa.bindparam("c_user"), _C.day == sa.bindparam("c_day"))
    .values(spent=_C.spent + sa.bindparam("c_tokens"))
)
_HOLD_COUNTER = (
    db.quota_counters.update()
    .where(_C.user == sa.bindparam("c_user"), _C.day == sa.bindparam("c_day"))
    .values(held=_C.held + sa.bindparam("c_held"), running=_C.running + 1)
)


# The columns' sizes (core.db.usage): PostgreSQL refuses a longer value, and the row with it.
MODEL_CHARS = db.usage.c.model.type.length or 128
PROVIDER_CHARS = db.usage.c.provider.type.length or 16


def _fit(value: str | None, size: int) -> str | None:
    return value[:size] if value else value


def _now() -> datetime:
    return datetime.now(UTC)


def _entry(kind: str, params: dict[str, Any]) -> bytes:
    """One journal line. Text orjson refuses (a lone surrogate) goes through json's escapes."""
    try:
        return orjson.dumps([kind, params], option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return json.dumps([kind, params], default=str).encode() + b"\n"


def _parse(line: bytes) -> tuple[str, dict[str, Any]] | None:
    """A journal line back, or None for one cut short (a kill during a large write)."""
    for loads in (orjson.loads, json.loads):
        try:
            kind, params = loads(line)
        except (ValueError, TypeError):
            continue
        if kind in ("insert", "update") and isinstance(params, dict):
            if kind == "insert":
                params["ts"] = datetime.fromisoformat(params["ts"])
            return kind, params
    return None


class Journal:
    """Outcomes on local disk before they reach the database, one line each, appended with
    one write (so threads never interleave), to files in `folder` named after the process.

    The process holds an exclusive flock on its files while it lives: a file whose lock can
    be taken is a dead process's, to be replayed into the database and removed. A kill -9
    leaves the lines in the OS's page cache, which outlives the process; nothing is fsynced.
    """

    def __init__(self, folder: Path, name: str) -> None:
        assert fcntl is not None
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.name = name
        self._count = 0
        self._fd, self.path = self._open()
        self.size = 0
        # Files set aside (fd, path, outcomes submitted before it): removed once written.
        self.retired: list[tuple[int, Path, int]] = []

    def _open(self) -> tuple[int, Path]:
        """A new locked file: made under a name the others ignore, locked, then renamed, so
        that nobody can take it for a dead process's in between."""
        self._count += 1
        path = self.folder / f"{self.name}-{self._count}.jsonl"
        making = path.with_suffix(".new")
        fd = os.open(making, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(making, path)
        return fd, path

    def append(self, line: bytes) -> None:
        os.write(self._fd, line)
        self.size += len(line)

    def rotate(self, submitted: int) -> None:
        """Go on in a new file; the current one holds outcomes up to `submitted`."""
        fd, path = self._open()
        self.retired.append((self._fd, self.path, submitted))
        self._fd, self.path, self.size = fd, path, 0

    def drop_written(self, written: int) -> None:
        """Remove the files set aside whose outcomes are all in the database."""
        while self.retired and self.retired[0][2] <= written:
            fd, path, _ = self.retired.pop(0)
            path.unlink(missing_ok=True)
            os.close(fd)

    def close(self, *, remove: bool) -> None:
        """Unlock (and, if all is written, remove) every file: one left is replayed later."""
        if self._fd < 0:
            return  # closed already
        for fd, path, _ in [*self.retired, (self._fd, self.path, 0)]:
            if remove:
                path.unlink(missing_ok=True)
            os.close(fd)
        self.retired, self._fd = [], -1

    def dead(self) -> Iterator[tuple[Path, list[tuple[str, dict[str, Any]]]]]:
        """Each dead process's file with its outcomes, locked while the caller replays it;
        removed when the caller goes on to the next (an exception leaves it for later)."""
        for path in sorted(self.folder.glob("*.jsonl")):
            if path.name.startswith(self.name + "-"):
                continue  # this process's own
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its process is alive
                try:
                    if os.stat(path).st_ino != os.fstat(fd).st_ino:
                        continue  # replayed and removed by another process meanwhile
                except FileNotFoundError:
                    continue
                with open(fd, "rb", closefd=False) as file:
                    lines = [line for line in file.read().splitlines() if line.strip()]
                entries = [e for e in map(_parse, lines) if e is not None]
                if (torn := len(lines) - len(entries)) > 0:
                    log.warning("%s: skipped %d unreadable line(s)", path, torn)
                yield path, entries
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)  # the lock goes with it


def journal_folder(data_dir: Path, engine: Engine) -> Path:
    """Where a process keeps its journal: per database, so that a DATA_DIR shared by apps on
    different databases never replays one's rows into another."""
    url = engine.url.render_as_string(hide_password=True)
    return data_dir / "journal" / hashlib.sha256(url.encode()).hexdigest()[:12]


class Ledger:
    def __init__(
        self,
        engine: Engine,
        *,
        prices: PriceTable,
        log_content: bool = False,
        journal_dir: Path | None = None,
    ) -> None:
        self.engine = engine
        self.prices = prices
        self.log_content = log_content
        # SQLite allows one writer; waiting writers poll with sleeps of up to 100 ms. Queueing
        # this process's writers on a lock instead hands the database over at once.
        self._write = threading.Lock() if engine.dialect.name == "sqlite" else nullcontext()
        # SQLite before 3.35 has no RETURNING: a statement per row there.
        self._insert_many = _INSERT_MANY if engine.dialect.insert_executemany_returning else _INSERT
        # Outcomes are written by one thread, in batches, off the request path; reads flush it.
        # The writer never takes the submitters' lock, so handing an outcome over never waits.
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._submitting = threading.Lock()
        self._submitted = 0  # outcomes handed over, counted with their put
        self._written = 0  # of those, how many are written (set by the writer only)
        self._writer: threading.Thread | None = None
        self._urgent = threading.Event()  # a flush waits: no lingering
        # On SQLite (one writer at a time, whoever asks), reservations are written by a thread
        # of their own, those asked meanwhile in one transaction: no thread per call, one
        # BEGIN and COMMIT for the calls that arrived together. On PostgreSQL each has a
        # thread of the pool: users' locks are their own, and one user's wait is nobody
        # else's.
        self._batched = engine.dialect.name == "sqlite"
        self._asks: queue.SimpleQueue[_Ask | None] = queue.SimpleQueue()
        self._reserver: threading.Thread | None = None
        self._closed = False
        # This process, as it names itself in core.db.processes and on the rows it holds.
        self.process_id = uuid.uuid4().hex[:16]
        self._holder: str | None = None  # process_id once its heartbeat row is written
        self._stop = threading.Event()
        self._heart: threading.Thread | None = None
        self._stale_unnamed = timedelta(hours=1)  # pending rows naming no process (start())
        self._next_sweep = 0.0
        self._failing = False  # the heartbeat could not reach the database last time
        self._journal: Journal | None = None
        self._journal_warned = False
        if journal_dir is not None:
            if fcntl is None:
                log.warning("no fcntl here: the ledger keeps no journal")
            else:
                self._journal = Journal(journal_dir, self.process_id)
                # A ledger nobody holds any more unlocks its files: another process replays them.
                weakref.finalize(self, self._journal.close, remove=False).atexit = False

    def _start_writer(self) -> None:
        """The writer thread, at the first thing handed to it (under the submitters' lock)."""
        if self._writer is None:
            self._writer = threading.Thread(
                target=_drain, args=(weakref.ref(self), self._queue), name="ledger", daemon=True
            )
            self._writer.start()

    def _submit(self, kind: str, params: dict[str, Any]) -> None:
        line = _entry(kind, params) if self._journal is not None else b""
        with self._submitting:
            self._start_writer()
            journal = self._journal
            if journal is not None:
                # On disk (the page cache) before the answer ends: a crash cannot lose it.
                try:
                    journal.append(line)
                except OSError as exc:
                    self._journal_failed(exc)
            self._submitted += 1
            self._queue.put((kind, params))

    def _journal_failed(self, exc: OSError) -> None:
        if not self._journal_warned:  # once: a full disk would say it at every call
            self._journal_warned = True
            log.error("the ledger's journal failed (%s); rows are still written", exc)

    def _write_batch(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """One transaction, one executemany per kind, with statements built once; the users'
        counters change in the same transaction as their rows."""
        inserts = [params for kind, params in batch if kind == "insert"]
        updates = [params for kind, params in batch if kind == "update"]
        # One settlement per row (the last): the counter statements all run before the rows'.
        updates = list({(p["row_id"], p["rid"]): p for p in updates}.values())
        settled = [params for params in updates if "c_user" in params]
        # One counter change per user and day, however many of their rows the batch holds.
        tokens: dict[tuple[str, date], int] = {}
        for p in inserts:
            if p["prompt_tokens"] or p["completion_tokens"]:
                key = (p["user"], p["ts"].astimezone(UTC).date())
                tokens[key] = tokens.get(key, 0) + p["prompt_tokens"] + p["completion_tokens"]
        spent = [{"c_user": user, "c_day": day, "c_tokens": n} for (user, day), n in tokens.items()]
        with self._begin() as conn:
            # Against a quota check rebuilding a counter meanwhile (PostgreSQL).
            db.lock_user(conn, *(p["c_user"] for p in [*settled, *spent]))
            if inserts:
                conn.execute(self._insert_many, inserts).close()  # its ids unread
            if spent:
                conn.execute(_SPEND_COUNTER, spent)
            if settled:
                conn.execute(_SETTLE_COUNTER, settled)  # before the rows: pending ones count
            if updates:
                conn.execute(_SETTLE, updates)

    def _write_taken(self, taken: list[tuple[str, Any]]) -> None:
        """The writer's step: write a batch taken from the queue, then answer flushes."""
        batch = [item for item in taken if item[0] != "flush"]
        if batch:
            self._write_surely(batch)
        self._written += len(batch)  # only this thread writes it
        journal = self._journal
        if journal is not None and (journal.size > JOURNAL_BYTES or journal.retired):
            self._compact(journal)
        for kind, done in taken:
            if kind == "flush":  # everything queued before the marker is written now
                done.set()

    def _compact(self, journal: Journal) -> None:
        """Keep the journal small: past JOURNAL_BYTES, go on in a new file; remove old files
        once every outcome they hold is written. Under the submitters' lock: no outcome is
        appended meanwhile, and the journal is not closed."""
        with self._submitting:
            if self._journal is not journal:
                return  # closed
            try:
                if journal.size > JOURNAL_BYTES:
                    journal.rotate(self._submitted)
                journal.drop_written(self._written)
            except OSError as exc:
                self._journal_failed(exc)

    def _write_surely(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """Write the batch; while the database cannot be reached (an outage, a restart), keep
        it and try again with a growing pause, rather than drop answered calls' rows. A row
        the database refuses for itself is written alone, so it does not hold the rest."""
        pause = 0.5
        while True:
            try:
                self._write_batch(batch)
                return
            except sa.exc.OperationalError:
                log.warning("the database is not answering; %d ledger row(s) wait", len(batch))
                time.sleep(pause)
                pause = min(pause * 2, 10.0)
            except Exception:
                log.exception("could not write %d ledger rows; writing them one by one", len(batch))
                for item in batch:
                    try:
                        self._write_batch([item])
                    except Exception:
                        log.exception("dropped a ledger row the database refused")
                return

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every outcome handed to the ledger so far is written."""
        if self._written >= self._submitted:
            return  # nothing pending: no round trip to the writer
        done = threading.Event()
        self._queue.put(("flush", done))
        self._urgent.set()
        done.wait(timeout)

    # ---- a process's life: heartbeat, dead processes' holds, dead processes' journals -----

    def start(self, stale_unnamed: timedelta) -> None:
        """Say this process is alive, replay the journals of processes that died, release
        what dead processes held, then keep doing so in the background every HEARTBEAT s.
        `stale_unnamed`: when a pending row naming no process (an older release's) is dead."""
        self._stale_unnamed = stale_unnamed
        self._beat()
        self._holder = self.process_id
        self.replay_dead()  # first: a replayed settlement is not released as interrupted
        self._release_dead()
        released = self.release_stale(stale_unnamed)
        if released:
            log.info("released %d call(s) left pending by processes that stopped", released)
        self._next_sweep = time.monotonic() + SWEEP
        self._heart = threading.Thread(
            target=_maintain, args=(weakref.ref(self), self._stop), name="heartbeat", daemon=True
        )
        self._heart.start()

    def close(self) -> None:
        """A clean stop: finish the reservations under way (later ones are refused), write
        what is queued, stop beating, leave nothing to replay."""
        self._closed = True
        if self._reserver is not None and self._reserver is not threading.current_thread():
            self._asks.put(None)
            self._reserver.join(timeout=10)
        self._stop.set()
        if self._heart is not None and self._heart is not threading.current_thread():
            self._heart.join(timeout=10)
        self.flush()
        with self._submitting:
            journal, self._journal = self._journal, None
            if journal is not None:
                journal.close(remove=self._written >= self._submitted)
        if self._holder is not None:
            try:
                with self._begin() as conn:
                    conn.execute(db.processes.delete().where(db.processes.c.id == self.process_id))
            except Exception:
                log.warning("could not remove this process's heartbeat row", exc_info=True)

    def _maintenance(self) -> None:
        """One heartbeat: alive, dead journals replayed, dead holds released; an outage is
        logged once and tried again at the next beat."""
        try:
            self._beat()
            self._holder = self.process_id
            self.replay_dead()
            self._release_dead()
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + SWEEP
                self.release_stale(self._stale_unnamed, since=RECENT)
        except Exception as exc:
            if not self._failing:
                self._failing = True
                operational = isinstance(exc, sa.exc.OperationalError)
                log.warning(
                    "the ledger's heartbeat failed (%s); trying again every %g s",
                    "the database is not answering" if operational else type(exc).__name__,
                    HEARTBEAT,
                    exc_info=not operational,
                )
            return
        if self._failing:
            self._failing = False
            log.info("the ledger's heartbeat reaches the database again")

    def _beat(self) -> None:
        """Write this process's heartbeat (an update, or an insert the first time)."""
        now = _now()
        p = db.processes.c
        with self._begin() as conn:
            beat = db.processes.update().where(p.id == self.process_id).values(seen_at=now)
            if not conn.execute(beat).rowcount:
                conn.execute(db.processes.insert().values(id=self.process_id, seen_at=now))

    def _release_dead(self) -> None:
        """Release the holds of processes unheard of for STALE seconds, and forget those
        processes (a settlement written or replayed before wins: only pending rows change).
        Costs one read of the small processes table, unless a process died."""
        now = _now()
        p, u = db.processes.c, db.usage.c
        silent = now - timedelta(seconds=STALE)
        with db.reading(self.engine) as conn:  # most beats find none: no write lock for that
            if not conn.execute(sa.select(p.id).where(p.seen_at < silent).limit(1)).first():
                return
        with self._begin() as conn:
            dead = conn.execute(sa.select(p.id).where(p.seen_at < silent)).scalars().all()
            if not dead:
                return
            where = [u.status == "pending", u.holder.in_(dead), u.ts >= now - RECENT]
            users = conn.execute(sa.select(u.user).where(*where).distinct()).scalars().all()
            db.lock_user(conn, *users)
            released = (
                conn.execute(
                    db.usage.update()
                    .where(*where, u.user.in_(users))
                    .values(status="interrupted", reserved_tokens=0)
                ).rowcount
                if users
                else 0
            )
            if released:
                _forget_counters(conn, users)
            conn.execute(db.processes.delete().where(p.id.in_(dead), p.seen_at < silent))
        log.warning(
            "released %d call(s) held by %d process(es) unheard of for %g s: %s",
            released,
            len(dead),
            STALE,
            ", ".join(dead),
        )

    def replay_dead(self) -> int:
        """Write the outcomes in dead processes' journals (those written already are not
        written twice); remove each journal once done. Returns how many were replayed."""
        if self._journal is None:
            return 0
        replayed = 0
        for path, entries in self._journal.dead():
            if entries:
                self._replay(entries)
                log.info("replayed %d ledger outcome(s) from %s", len(entries), path.name)
            replayed += len(entries)
        return replayed

    def _replay(self, entries: list[tuple[str, dict[str, Any]]]) -> None:
        try:
            self._replay_batch(entries)
        except sa.exc.OperationalError:
            raise  # the database is away: the journal stays for the next beat
        except Exception:
            log.exception("could not replay %d ledger outcomes; one by one", len(entries))
            for entry in entries:
                try:
                    self._replay_batch([entry])
                except sa.exc.OperationalError:
                    raise
                except Exception:
                    log.exception("dropped a journaled ledger row the database refused")

    def _replay_batch(self, entries: list[tuple[str, dict[str, Any]]]) -> None:
        """Idempotent: a settlement is by row id (writing it again changes nothing, and it
        wins over `interrupted`); a whole row is skipped if its (request id, ts) is there."""
        inserts = [params for kind, params in entries if kind == "insert"]
        updates = [params for kind, params in entries if kind == "update"]
        with self._begin() as conn:
            users = {p["user"] for p in inserts} | {p["c_user"] for p in updates if "c_user" in p}
            db.lock_user(conn, *users)
            if inserts:
                inserts = self._unwritten(conn, inserts)
            if inserts:
                conn.execute(self._insert_many, inserts).close()  # its ids unread
            if updates:
                conn.execute(_SETTLE, updates)
            # Rare (a process died): the counters are rebuilt from the rows at the next check;
            # a journal of an older release names no user for its settlements: all of them.
            legacy = any("c_user" not in p for p in updates)
            _forget_counters(conn, None if legacy else users)

    def _unwritten(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows not in the database yet: a request id is one call's, and one call has one
        row; with its timestamp, the key holds even for rows of made-up ids (tests, scripts)."""
        u = db.usage.c
        sqlite = self.engine.dialect.name == "sqlite"

        def key(request_id: str, ts: datetime) -> tuple[str, datetime]:
            # SQLite keeps the wall time without its zone; PostgreSQL an instant.
            return request_id, (ts.replace(tzinfo=None) if sqlite else _aware(ts))

        there: set[tuple[str, datetime]] = set()
        for i in range(0, len(rows), 500):
            chunk = rows[i : i + 500]
            stamps = [r["ts"] for r in chunk]
            found = conn.execute(
                sa.select(u.request_id, u.ts).where(
                    u.request_id.in_({r["request_id"] for r in chunk}),
                    u.ts >= min(stamps),
                    u.ts <= max(stamps),
                )
            )
            there.update(key(request_id, ts) for request_id, ts in found)
        fresh, seen = [], set()
        for row in rows:
            k = key(row["request_id"], row["ts"])
            if k not in there and k not in seen:
                seen.add(k)
                fresh.append(row)
        return fresh

    @contextmanager
    def _begin(self) -> Iterator[sa.Connection]:
        with self._write, self.engine.begin() as conn:
            yield conn

    def reserve(self, **call: Any) -> Reservation:
        """Check the user's quotas and insert a pending row, atomically; refuse with a row too
        (QuotaExceeded is raised once that row is committed). Blocks; the arguments are
        reserve_async's."""
        answered: concurrent.futures.Future[Reservation] = concurrent.futures.Future()
        self._ask(lambda outcome: _settle_future(answered, outcome), **call)
        return answered.result()

    def reserve_async(self, **call: Any) -> asyncio.Future[Reservation]:
        """reserve() for the event loop, answered from the reserving thread (SQLite) or a
        thread of the pool (PostgreSQL); the caller must see it through (core.service).

        user, limits, function, model, provider, source, request_id: the call's; `estimate`
        is what the call may use at most; `minimum` what it needs at least (its prompt), so
        a call that cannot fit in today's budget is refused up front."""
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[Reservation] = loop.create_future()

        def answer(outcome: Reservation | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_settle_future, answered, outcome)

        self._ask(answer, **call)
        return answered

    def _ask(
        self,
        answer: Callable[[Reservation | BaseException], None],
        *,
        user: str,
        limits: Limits,
        function: str,
        model: str | None,
        provider: str,
        source: str,
        request_id: str,
        estimate: int,
        minimum: int = 1,
    ) -> None:
        row = {
            "ts": _now(),
            "user": user,
            "source": source,
            "function": function,
            "model": _fit(model, MODEL_CHARS),
            "provider": _fit(provider, PROVIDER_CHARS),
            "request_id": request_id,
        }
        ask = _Ask(row, limits, estimate, minimum, answer)
        if self._closed:
            answer(RuntimeError("the ledger is closed"))
        elif not self._batched:
            _POOL.submit(self._reserve_batch, [ask])
        else:
            if self._reserver is None:
                with self._submitting:
                    if self._reserver is None:
                        self._reserver = threading.Thread(
                            target=_reserving,
                            args=(weakref.ref(self), self._asks),
                            name="reserver",
                            daemon=True,
                        )
                        self._reserver.start()
            self._asks.put(ask)

    def _reserve_batch(self, asks: list[_Ask]) -> None:
        """Reservations in one transaction, answered once it is committed. One refused for
        tokens held by calls that may have settled here already, their settlements still
        queued, is asked again once this process's writer has written them (on SQLite the
        reserving thread does not wait for that meanwhile: a flush marker hands it back)."""
        later: list[_Ask] = []
        answers: list[Reservation | QuotaExceeded | BaseException | None]
        try:
            with self._begin() as conn:
                db.lock_user(conn, *(ask.row["user"] for ask in asks))
                answers = [self._reserve_in(conn, ask, later) for ask in asks]
        except sa.exc.OperationalError as exc:  # the database is away: a 503 for each
            answers, later = [exc, *(copy.copy(exc) for _ in asks[1:])], []
        except Exception as exc:
            if len(asks) > 1:  # one of them: each alone, so that the others go ahead
                for ask in asks:
                    self._reserve_batch([ask])
                return
            answers, later = [exc], []
        for ask, answer in zip(asks, answers, strict=True):
            if answer is None:
                continue  # asked again below
            if isinstance(answer, QuotaExceeded):  # raised once its row is committed
                answer.request_id = ask.row["request_id"]
                log.info(
                    "request_id=%s quota refused for %s: %s",
                    answer.request_id,
                    ask.row["user"],
                    answer.message,
                )
            ask.answer(answer)
        for ask in later:
            ask.waited = True
            if self._batched:
                self._queue.put(("flush", _AskAgain(self._asks, ask)))
                self._urgent.set()
            else:  # a thread of its own: it may wait
                self.flush()
                self._reserve_batch([ask])

    def _reserve_in(
        self, conn: sa.Connection, ask: _Ask, later: list[_Ask]
    ) -> Reservation | QuotaExceeded | None:
        """One reservation, in the batch's transaction; None: to be asked again (`later`)."""
        user, limits, now = ask.row["user"], ask.limits, ask.row["ts"]
        today = self._counter(conn, user, now) if limits.daily_tokens else None
        refusal, held_up = self._check(conn, user, limits, now, ask.minimum, today)
        if held_up and not ask.waited and self._written < self._submitted:
            later.append(ask)
            return None
        return self._reserve_row(conn, ask.row, limits, ask.estimate, refusal, today)

    def _reserve_row(
        self,
        conn: sa.Connection,
        row: dict[str, Any],
        limits: Limits,
        estimate: int,
        refusal: QuotaExceeded | None,
        today: tuple[int, int, int] | None,
    ) -> Reservation | QuotaExceeded:
        """Insert the call's `row`: refused, or pending and holding its tokens (counted)."""
        if refusal:
            conn.execute(_INSERT, {**row, "status": "refused", "latency_ms": 0.0})
            return refusal
        user = row["user"]
        budget = None
        if limits.daily_tokens and today is not None:
            budget = limits.daily_tokens - today[0] - today[1]
        held = estimate if budget is None else min(estimate, budget)
        pending = {"status": "pending", "reserved_tokens": held, "holder": self._holder}
        result = conn.execute(_INSERT, row | pending)
        day = row["ts"].date()
        conn.execute(_HOLD_COUNTER, {"c_user": user, "c_day": day, "c_held": held})
        return Reservation(
            row_id=result.inserted_primary_key[0],
            token_budget=budget,
            request_id=row["request_id"],
            user=user,
            day=day,
            held=held,
        )

    def _counter(self, conn: sa.Connection, user: str, now: datetime) -> tuple[int, int, int]:
        """The user's (tokens spent today, tokens held, calls holding): one row read. Rebuilt
        from the day's rows (the record) when there is none yet, or it is of another day."""
        today = now.date()
        found = conn.execute(_COUNTER, {"user": user}).first()
        if found is not None and found.day == today:
            return int(found.spent), int(found.held), int(found.running)
        spent, held, running = self._today(conn, user, now)
        values = {"day": today, "spent": spent, "held": held, "running": running}
        if found is None:
            conn.execute(db.quota_counters.insert().values(user=user, **values))
        else:
            conn.execute(db.quota_counters.update().where(_C.user == user).values(**values))
        return spent, held, running

    def _check(
        self,
        conn: sa.Connection,
        user: str,
        limits: Limits,
        now: datetime,
        minimum: int,
        today: tuple[int, int, int] | None,
    ) -> tuple[QuotaExceeded | None, bool]:
        """The refusal, if any, and whether it is for tokens held by calls in progress."""
        if limits.rpm:
            # The rpm-th latest request of the last minute, if there is one: the limit is
            # reached, until it leaves the window. At most rpm rows are read, however many
            # calls the minute or the day had.
            since = now - timedelta(minutes=1)
            nth = conn.execute(
                _NTH_RECENT, {"user": user, "since": since, "skip": limits.rpm - 1}
            ).scalar()
            if nth is not None:
                wait = max(1, math.ceil((_aware(nth) + timedelta(minutes=1) - now).total_seconds()))
                return QuotaExceeded(
                    f"You reached your limit of {limits.rpm} requests per minute. "
                    f"Try again in {wait} s.",
                    retry_after=wait,
                ), False
        if limits.daily_tokens and today is not None:
            spent, held, running = today
            daily = limits.daily_tokens
            if daily - spent - held < minimum:
                if daily - spent >= minimum:
                    # It fits once the calls in progress settle (most hold more than they use).
                    return QuotaExceeded(
                        f"{held:,} of your {daily:,} tokens today are held by {running} "
                        f"call(s) in progress; this request needs about {minimum:,}. Try "
                        f"again in {HELD_RETRY} s.",
                        retry_after=HELD_RETRY,
                    ), True
                midnight = datetime.combine(
                    now.date() + timedelta(days=1), datetime.min.time(), UTC
                )
                wait = math.ceil((midnight - now).total_seconds())
                return QuotaExceeded(
                    f"Your daily quota of {daily:,} tokens has {max(daily - spent, 0):,} left, "
                    f"and this request needs about {minimum:,}. It resets at 00:00 UTC, in "
                    f"{wait // 3600} h {wait % 3600 // 60} min.",
                    retry_after=wait,
                ), False
        return None, False

    def _today(self, conn: sa.Connection, user: str, now: datetime) -> tuple[int, int, int]:
        """(tokens spent today, tokens held by calls in progress, how many such calls)."""
        u = db.usage.c
        start = datetime.combine(now.date(), datetime.min.time(), UTC)
        spent, held, running = conn.execute(
            sa.select(
                sa.func.coalesce(sa.func.sum(u.prompt_tokens + u.completion_tokens), 0),
                sa.func.coalesce(sa.func.sum(u.reserved_tokens), 0),
                sa.func.count().filter(u.reserved_tokens > 0),
            ).where(u.user == user, u.ts >= start)
        ).one()
        return int(spent), int(held), int(running)

    def finish(
        self,
        reservation: Reservation,
        *,
        status: str,
        model: str | None,
        provider: str,
        prompt_tokens: int,
        completion_tokens: int,
        latency_ms: float,
        images: int = 0,
        prompt_text: str | None = None,
        completion_text: str | None = None,
    ) -> None:
        """Settle a pending row with what the call really used (written in the background)."""
        cost = self.prices.cost(
            model,
            backend=provider,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            images=images,
        )
        content = self.log_content
        self._submit(
            "update",
            {
                "row_id": reservation.row_id,
                "rid": reservation.request_id,
                # The user's counters for the reservation's day: held -> spent.
                "c_user": reservation.user,
                "c_day": reservation.day,
                "c_held": reservation.held,
                "c_tokens": prompt_tokens + completion_tokens,
                "new_status": status,
                "new_model": _fit(model, MODEL_CHARS),
                "new_provider": _fit(provider, PROVIDER_CHARS),
                "new_prompt_tokens": prompt_tokens,
                "new_completion_tokens": completion_tokens,
                "new_latency_ms": round(latency_ms, 1),
                "new_cost_usd": cost,
                "new_prompt_text": prompt_text if content else None,
                "new_completion_text": completion_text if content else None,
            },
        )

    def record(
        self,
        *,
        user: str,
        function: str,
        model: str | None,
        provider: str,
        source: str,
        request_id: str,
        status: str,
        ts: datetime | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        latency_ms: float = 0.0,
        images: int = 0,
        prompt_text: str | None = None,
        completion_text: str | None = None,
    ) -> None:
        """A whole row for a call that held no reservation: a caller without quotas, or one
        that failed before reserving (invalid input). Written in the background."""
        cost = self.prices.cost(
            model,
            backend=provider,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            images=images,
        )
        values = {
            "ts": ts or _now(),
            "user": user,
            "source": source,
            "function": function,
            "model": _fit(model, MODEL_CHARS),
            "provider": _fit(provider, PROVIDER_CHARS),
            "status": status,
            "request_id": request_id,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "latency_ms": round(latency_ms, 1),
            "cost_usd": cost,
        }
        content = self.log_content
        values |= {
            "reserved_tokens": 0,
            "prompt_text": prompt_text if content else None,
            "completion_text": completion_text if content else None,
        }
        self._submit("insert", values)

    def release_stale(self, older_than: timedelta, *, since: timedelta | None = None) -> int:
        """Rows left pending by a process that died no longer hold tokens: those naming a
        process with no recent heartbeat (after STALE s), and those naming none (an older
        release's rows) after `older_than`. `since`: look only at rows that recent."""
        now = _now()
        u, p = db.usage.c, db.processes.c
        alive = sa.select(p.id).where(p.seen_at >= now - timedelta(seconds=STALE))
        dead = sa.or_(
            sa.and_(u.holder.is_(None), u.ts < now - older_than),
            sa.and_(
                u.holder.is_not(None),
                u.holder.not_in(alive.scalar_subquery()),
                u.ts < now - timedelta(seconds=STALE),
            ),
        )
        where = [u.status == "pending", dead]
        if since is not None:
            where.append(u.ts >= now - since)
        with self._begin() as conn:
            users = conn.execute(sa.select(u.user).where(*where).distinct()).scalars().all()
            if not users:
                return 0
            db.lock_user(conn, *users)  # against a check rebuilding a counter meanwhile
            done = conn.execute(
                db.usage.update()
                .where(*where, u.user.in_(users))
                .values(status="interrupted", reserved_tokens=0)
            )
            if done.rowcount:
                _forget_counters(conn, users)
        return done.rowcount

    def rows(
        self,
        *,
        start: date | None = None,
        end: date | None = None,
        users: list[str] | None = None,
        models: list[str] | None = None,
    ) -> pd.DataFrame:
        """Ledger rows (no content columns) in a date range, as a DataFrame."""
        self.flush()
        u = db.usage.c
        query = sa.select(*(getattr(u, c) for c in COLUMNS)).order_by(u.ts)
        if start:
            query = query.where(u.ts >= datetime.combine(start, datetime.min.time(), UTC))
        if end:
            query = query.where(
                u.ts < datetime.combine(end + timedelta(days=1), datetime.min.time(), UTC)
            )
        if users:
            query = query.where(u.user.in_(users))
        if models:
            query = query.where(u.model.in_(models))
        with db.reading(self.engine) as conn:
            frame = pd.DataFrame(conn.execute(query).all(), columns=COLUMNS)
        frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
        return frame


def _drain(ref: weakref.ref[Ledger], outcomes: queue.SimpleQueue[tuple[str, Any]]) -> None:
    """The writer thread: holds its ledger only while writing, so a ledger nobody uses can
    go (and its journal with it, to be replayed by another process)."""
    while True:
        taken = [outcomes.get()]
        ledger = ref()
        if ledger is None:
            return
        urgent = ledger._urgent
        del ledger
        if taken[0][0] != "flush":
            urgent.wait(LINGER)  # more arrive meanwhile, for the same transaction
        urgent.clear()
        while len(taken) < 500:
            try:
                taken.append(outcomes.get_nowait())
            except queue.Empty:
                break
        ledger = ref()
        if ledger is None:
            return
        ledger._write_taken(taken)
        del ledger


# PostgreSQL's reservations, a call each (SQLite's go through a ledger's reserving thread).
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="reserve")


def _reserving(ref: weakref.ref[Ledger], asks: queue.SimpleQueue[_Ask | None]) -> None:
    """The reserving thread: every reservation asked while it wrote the last ones, at once;
    until its ledger closes (None) or goes (what is still asked is answered with an error)."""
    while True:
        taken = [asks.get()]
        while len(taken) < 100:
            try:
                taken.append(asks.get_nowait())
            except queue.Empty:
                break
        ledger = ref()
        pending = [ask for ask in taken if ask is not None]
        if ledger is None or ledger._closed:
            for ask in pending:
                ask.answer(RuntimeError("the ledger is closed"))
        elif pending:
            ledger._reserve_batch(pending)
        if ledger is None or None in taken:
            return
        del ledger


def _settle_future(
    future: asyncio.Future[Reservation] | concurrent.futures.Future[Reservation],
    outcome: Reservation | BaseException,
) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _maintain(ref: weakref.ref[Ledger], stop: threading.Event) -> None:
    """The heartbeat thread, every HEARTBEAT seconds until its ledger closes or goes."""
    while not stop.wait(HEARTBEAT):
        ledger = ref()
        if ledger is None:
            return
        ledger._maintenance()
        del ledger


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were stored as UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _forget_counters(conn: sa.Connection, users: Any = None) -> None:
    """Drop these users' (or every user's) running counters: after held tokens were released
    or journaled rows replayed (a process died), each is rebuilt from the rows at its next
    quota check. The caller holds these users' locks."""
    stmt = db.quota_counters.delete()
    if users is not None:
        stmt = stmt.where(_C.user.in_(list(users)))
    conn.execute(stmt)
