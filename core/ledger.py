"""The usage ledger: one row per call, and per-user quotas enforced in the same transaction."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from core import db
from core.endpoints import ENDPOINTS
from core.errors import QuotaExceeded
from core.pricing import PriceTable

log = logging.getLogger("core.ledger")
HELD_RETRY = 2  # seconds: tokens held by calls in progress come back when they settle
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
_SETTLE = (
    db.usage.update()
    .where(db.usage.c.id == sa.bindparam("row_id"))
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


# The columns' sizes (core.db.usage): PostgreSQL refuses a longer value, and the row with it.
MODEL_CHARS = db.usage.c.model.type.length or 128
PROVIDER_CHARS = db.usage.c.provider.type.length or 16


def _fit(value: str | None, size: int) -> str | None:
    return value[:size] if value else value


def _now() -> datetime:
    return datetime.now(UTC)


class Ledger:
    def __init__(self, engine: Engine, *, prices: PriceTable, log_content: bool = False) -> None:
        self.engine = engine
        self.prices = prices
        self.log_content = log_content
        # SQLite allows one writer; waiting writers poll with sleeps of up to 100 ms. Queueing
        # this process's writers on a lock instead hands the database over at once.
        self._write = threading.Lock() if engine.dialect.name == "sqlite" else nullcontext()
        # Outcomes are written by one thread, in batches, off the request path; reads flush it.
        # The writer never takes the submitters' lock, so handing an outcome over never waits.
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._submitting = threading.Lock()
        self._submitted = 0  # outcomes handed over, counted with their put
        self._written = 0  # of those, how many are written (set by the writer only)
        self._writer: threading.Thread | None = None

    def _submit(self, kind: str, params: dict[str, Any]) -> None:
        with self._submitting:
            if self._writer is None:
                self._writer = threading.Thread(target=self._drain, name="ledger", daemon=True)
                self._writer.start()
            self._submitted += 1
            self._queue.put((kind, params))

    def _write_batch(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """One transaction, one executemany per kind, with statements built once."""
        inserts = [params for kind, params in batch if kind == "insert"]
        updates = [params for kind, params in batch if kind == "update"]
        with self._begin() as conn:
            if inserts:
                conn.execute(_INSERT, inserts)
            if updates:
                conn.execute(_SETTLE, updates)

    def _drain(self) -> None:
        while True:
            taken = [self._queue.get()]
            while len(taken) < 500:
                try:
                    taken.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            batch = [item for item in taken if item[0] != "flush"]
            if batch:
                self._write_surely(batch)
            self._written += len(batch)  # only this thread writes it
            for kind, done in taken:
                if kind == "flush":  # everything queued before the marker is written now
                    done.set()

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
        done.wait(timeout)

    @contextmanager
    def _begin(self) -> Iterator[sa.Connection]:
        with self._write, self.engine.begin() as conn:
            yield conn

    def reserve(
        self,
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
    ) -> Reservation:
        """Check the user's quotas and insert a pending row, atomically; refuse with a row too.

        `estimate` is what the call may use at most; `minimum` what it needs at least (its
        prompt), so a call that cannot fit in today's budget is refused up front.
        """
        self.flush()  # settled calls free the tokens they held
        now = _now()
        with self._begin() as conn:
            db.lock_user(conn, user)  # SQLite's BEGIN IMMEDIATE already serializes writers
            refusal = self._check(conn, user, limits, now, minimum)
            row = {
                "ts": now,
                "user": user,
                "source": source,
                "function": function,
                "model": _fit(model, MODEL_CHARS),
                "provider": _fit(provider, PROVIDER_CHARS),
                "status": "refused" if refusal else "pending",
                "request_id": request_id,
            }
            if refusal:
                conn.execute(db.usage.insert().values(**row, latency_ms=0.0))
            else:
                budget = self._budget(conn, user, limits, now)
                held = estimate if budget is None else min(estimate, budget)
                result = conn.execute(db.usage.insert().values(**row, reserved_tokens=held))
                row_id = result.inserted_primary_key[0]
        if refusal:
            log.info("request_id=%s quota refused for %s: %s", request_id, user, refusal.message)
            refusal.request_id = request_id
            raise refusal
        return Reservation(row_id=row_id, token_budget=budget)

    def _check(
        self, conn: sa.Connection, user: str, limits: Limits, now: datetime, minimum: int
    ) -> QuotaExceeded | None:
        u = db.usage.c
        if limits.rpm:
            since = now - timedelta(minutes=1)
            recent = conn.execute(
                sa.select(sa.func.count(), sa.func.min(u.ts)).where(
                    u.user == user,
                    u.ts >= since,
                    # Refused calls and answers from the response cache cost no request.
                    u.status.not_in(("refused", "cached")),
                    u.function.in_(QUOTA_FUNCTIONS),
                )
            ).one()
            if recent[0] >= limits.rpm:
                oldest = _aware(recent[1])
                wait = max(1, math.ceil((oldest + timedelta(minutes=1) - now).total_seconds()))
                return QuotaExceeded(
                    f"You reached your limit of {limits.rpm} requests per minute. "
                    f"Try again in {wait} s.",
                    retry_after=wait,
                )
        if limits.daily_tokens:
            spent, held, running = self._today(conn, user, now)
            daily = limits.daily_tokens
            if daily - spent - held < minimum:
                if daily - spent >= minimum:
                    # It fits once the calls in progress settle (most hold more than they use).
                    return QuotaExceeded(
                        f"{held:,} of your {daily:,} tokens today are held by {running} "
                        f"call(s) in progress; this request needs about {minimum:,}. Try "
                        f"again in {HELD_RETRY} s.",
                        retry_after=HELD_RETRY,
                    )
                midnight = datetime.combine(
                    now.date() + timedelta(days=1), datetime.min.time(), UTC
                )
                wait = math.ceil((midnight - now).total_seconds())
                return QuotaExceeded(
                    f"Your daily quota of {daily:,} tokens has {max(daily - spent, 0):,} left, "
                    f"and this request needs about {minimum:,}. It resets at 00:00 UTC, in "
                    f"{wait // 3600} h {wait % 3600 // 60} min.",
                    retry_after=wait,
                )
        return None

    def _budget(self, conn: sa.Connection, user: str, limits: Limits, now: datetime) -> int | None:
        """Tokens the user may still spend today, counting what running calls hold."""
        if not limits.daily_tokens:
            return None
        spent, held, _ = self._today(conn, user, now)
        return limits.daily_tokens - spent - held

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

    def release_stale(self, older_than: timedelta) -> int:
        """Rows left pending by a process that died no longer hold tokens."""
        with self._begin() as conn:
            done = conn.execute(
                db.usage.update()
                .where(db.usage.c.status == "pending", db.usage.c.ts < _now() - older_than)
                .values(status="interrupted", reserved_tokens=0)
            )
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
        with self.engine.connect() as conn:
            frame = pd.DataFrame(conn.execute(query).all(), columns=COLUMNS)
        frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
        return frame


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were stored as UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)
