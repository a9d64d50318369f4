"""Databases for the ledger and quota tests: SQLite always, PostgreSQL with TEST_DATABASE_URL.

PostgreSQL runs are isolated in a fresh schema (dropped afterwards): the app's URL gets
`options=-csearch_path=<schema>`, so every table the migrations create lands there.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from core import db
from core.ledger import Ledger

PG_URL = os.environ.get("TEST_DATABASE_URL", "").strip()
needs_postgresql = pytest.mark.skipif(
    not PG_URL, reason="set TEST_DATABASE_URL to run on PostgreSQL"
)
# Use as `params=BACKENDS` on a fixture: the PostgreSQL runs show up as skipped, with the reason.
BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=needs_postgresql),
]


@dataclass
class Database:
    """A fresh, empty database: the settings that point the app at it, and an engine to read it."""

    backend: str
    overrides: dict[str, str]  # DATA_DIR, and DATABASE_URL for PostgreSQL
    engine: Engine
    # The ledgers of the apps and cores on this database: they write outcomes from a
    # background thread, so a read flushes them first.
    ledgers: list[Ledger] = field(default_factory=list)

    def usage(self, **where: Any) -> list[dict[str, Any]]:
        """Ledger rows (every column, content too) matching column == value, oldest first."""
        for ledger in self.ledgers:
            ledger.flush()
        query = sa.select(db.usage).order_by(db.usage.c.id)
        for column, value in where.items():
            query = query.where(db.usage.c[column] == value)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def users(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(db.users).order_by(db.users.c.id))
            return [dict(row._mapping) for row in rows]


def _driver_url(url: str) -> str:
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


@contextmanager
def fresh_database(backend: str, data_dir: Path) -> Iterator[Database]:
    """An empty database on `backend`, removed (PostgreSQL schema) or left in tmp (SQLite)."""
    if backend == "sqlite":
        engine = db.make_engine(db.database_url(data_dir, None))
        try:
            yield Database(backend, {"DATA_DIR": str(data_dir)}, engine)
        finally:
            engine.dispose()
        return
    assert PG_URL, "TEST_DATABASE_URL is not set"
    schema = "test_" + secrets.token_hex(6)
    admin = sa.create_engine(_driver_url(PG_URL), poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    app_url = url.render_as_string(hide_password=False)
    engine = db.make_engine(app_url)
    try:
        yield Database(backend, {"DATA_DIR": str(data_dir), "DATABASE_URL": app_url}, engine)
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
