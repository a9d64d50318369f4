"""The project's database: SQLAlchemy Core on SQLite (embedded default) or PostgreSQL.

Migrations are an append-only list; each runs once, in order, recorded in schema_version.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger("core.db")

metadata = sa.MetaData()

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("key_hash", sa.String(128), nullable=False),
    sa.Column("key_version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("daily_tokens", sa.Integer, nullable=True),
    sa.Column("rpm", sa.Integer, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

usage = sa.Table(
    "usage",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
    sa.Column("user", sa.String(64), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("function", sa.String(16), nullable=False),
    sa.Column("model", sa.String(128), nullable=True),
    sa.Column("provider", sa.String(16), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
    # Tokens held by a call still running, so concurrent calls see each other's budget.
    sa.Column("reserved_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("latency_ms", sa.Float, nullable=True),
    sa.Column("cost_usd", sa.Float, nullable=False, server_default="0"),
    sa.Column("request_id", sa.String(40), nullable=False),
    sa.Column("prompt_text", sa.Text, nullable=True),
    sa.Column("completion_text", sa.Text, nullable=True),
    # The process (core.db.processes) whose call holds reserved_tokens, while it is pending:
    # when that process stops beating, its holds are released by the processes still running.
    sa.Column("holder", sa.String(40), nullable=True),
    sa.Index("ix_usage_user_ts", "user", "ts"),
    sa.Index("ix_usage_ts", "ts"),
)

# Saved chats, one row each, owned by one user; the messages and settings are JSON text.
conversations = sa.Table(
    "conversations",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("user", sa.String(64), nullable=False),
    sa.Column("title", sa.String(200), nullable=False),
    sa.Column("model", sa.String(256), nullable=True),
    sa.Column("settings", sa.Text, nullable=False),
    sa.Column("messages", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_conversations_user_updated", "user", "updated_at"),
)

# Named chat setups a user saves and loads: a system prompt with its model and settings.
presets = sa.Table(
    "presets",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user", sa.String(64), nullable=False),
    sa.Column("name", sa.String(80), nullable=False),
    sa.Column("model", sa.String(256), nullable=True),
    sa.Column("settings", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("user", "name", name="uq_presets_user_name"),
)

# Signed-out sessions (their token id), until the token would have expired anyway: sessions
# are signed tokens any replica accepts, so ending one early is written down for all.
ended_sessions = sa.Table(
    "ended_sessions",
    metadata,
    sa.Column("jti", sa.String(64), primary_key=True),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
)

# Failed sign-ins, so that every replica's lockout counts every replica's failures.
sign_in_failures = sa.Table(
    "sign_in_failures",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("bucket", sa.String(64), nullable=False),
    sa.Column("ts", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("replica", sa.String(32), nullable=False),
)

# Every running process, with the last time it said it is alive (every few seconds).
processes = sa.Table(
    "processes",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False, index=True),
)

# Cached answers (CACHE=database), by a hash of who asked what; shared by the replicas.
response_cache = sa.Table(
    "response_cache",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
)

# Each user's running totals for today, so that a quota check reads one row whatever the day's
# history: tokens spent (settled rows), tokens held by calls in progress, and how many calls.
# Updated in the transactions that change the rows; rebuilt from the rows (the record) when
# missing or of another day.
quota_counters = sa.Table(
    "quota_counters",
    metadata,
    sa.Column("user", sa.String(64), primary_key=True),
    sa.Column("day", sa.Date, nullable=False),
    sa.Column("spent", sa.BigInteger, nullable=False),
    sa.Column("held", sa.BigInteger, nullable=False),
    sa.Column("running", sa.Integer, nullable=False),
)

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("description", sa.String(200), nullable=False),
)


def _v1(conn: Connection) -> None:
    users.create(conn)
    usage.create(conn)


def _v2(conn: Connection) -> None:
    conversations.create(conn)


def _v3(conn: Connection) -> None:
    presets.create(conn)


def _v4(conn: Connection) -> None:
    ended_sessions.create(conn)


def _v5(conn: Connection) -> None:
    sign_in_failures.create(conn)


def _v6(conn: Connection) -> None:
    processes.create(conn)
    # v1 creates `usage` from today's definition: a new database has the column already.
    if "holder" not in {c["name"] for c in sa.inspect(conn).get_columns("usage")}:
        conn.execute(sa.text("ALTER TABLE usage ADD COLUMN holder VARCHAR(40)"))


def _v7(conn: Connection) -> None:
    response_cache.create(conn)


def _v8(conn: Connection) -> None:
    quota_counters.create(conn)


# Append only: never edit or reorder a released migration; add a new one.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "users and usage ledger", _v1),
    (2, "saved conversations", _v2),
    (3, "chat presets", _v3),
    (4, "ended sessions (signed session tokens)", _v4),
    (5, "failed sign-ins shared by replicas", _v5),
    (6, "ledger holds name their process; process heartbeats", _v6),
    (7, "response cache", _v7),
    (8, "running quota counters per user", _v8),
]


def database_url(data_dir: Path, url: str | None) -> str:
    """DATABASE_URL if set, else SQLite in DATA_DIR."""
    if url:
        return url
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(data_dir / 'dashboard.db').resolve()}"


def make_engine(url: str) -> Engine:
    """An engine whose transactions serialize writers, so quota checks are atomic."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if not url.startswith("sqlite"):
        # connect_timeout: a database that is down is reported in seconds, not minutes.
        return sa.create_engine(
            url,
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=20,
            connect_args={"connect_timeout": 5},
        )
    engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        # Let SQLAlchemy's BEGIN below, not the driver, open transactions.
        dbapi_conn.isolation_level = None
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")
        dbapi_conn.execute("PRAGMA busy_timeout=30000")

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock up front: check-then-insert cannot interleave. A
        # deferred transaction that reads and then writes would get SQLITE_BUSY at once
        # instead of waiting, so every transaction is IMMEDIATE, but those of reading():
        # they only read, and in WAL mode a reader never waits for (nor blocks) the writer.
        # Straight to the driver: this runs for every transaction, and SQLAlchemy's execution
        # machinery around a statement with no result costs more than the statement.
        begin = "BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE"
        conn.connection.driver_connection.execute(begin)

    return engine


READ_ONLY = "dashboard_read_only"  # an execution option: this connection's transactions only read


def reading(engine: Engine) -> Connection:
    """A connection for reads only (use it as `with reading(engine) as conn:`).

    On SQLite its transactions begin DEFERRED, so they neither take nor wait for the write
    lock: a writer holding it for seconds (another process, a long migration) does not hold
    up key lookups, session checks or the usage page. Anything that writes, or reads in order
    to write, must use engine.begin() (IMMEDIATE): a deferred transaction cannot wait for the
    lock once it has read. On PostgreSQL it is an ordinary connection."""
    conn = engine.connect()
    conn.execution_options(**{READ_ONLY: True})
    return conn


def migrate(engine: Engine) -> int:
    """Apply pending migrations; return the schema version now in force."""
    with engine.begin() as conn:
        schema_version.create(conn, checkfirst=True)
        done = set(conn.execute(sa.select(schema_version.c.version)).scalars())
        for version, description, apply in MIGRATIONS:
            if version in done:
                continue
            log.info("applying migration %d: %s", version, description)
            apply(conn)
            conn.execute(schema_version.insert().values(version=version, description=description))
        return max(version for version, _, _ in MIGRATIONS)


def lock_user(conn: Connection, *names: str) -> None:
    """Serialize quota checks and counter updates for these users, in one order (SQLite's
    BEGIN IMMEDIATE already serializes all)."""
    if conn.dialect.name == "postgresql":
        # Ordered by the lock's own key, not the name: two names with one key (a collision)
        # taken in name order by one transaction and the other way by another would deadlock.
        for key in sorted({_lock_key(name) for name in names}):
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def _lock_key(name: str) -> int:
    """A user's advisory lock: 63 bits of the name's SHA-256 (every process agrees)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1
