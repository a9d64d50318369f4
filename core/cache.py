"""The response cache (CACHE=memory|database): answers that would come out the same again.

Two kinds of call are cached, and nothing else:
- embeddings, one entry per input (model, dimensions, encoding and the text or token ids), so
  a batch that repeats some texts sends only the new ones upstream;
- chat and completions with `temperature: 0` and a `seed`, keyed on the whole request.

A key always names the backend and model that would answer, the form of the answer (OpenAI's
bytes, streamed or not, or the service's typed chunks) and, unless CACHE_SHARED is set, the
user: one user's cached answer is never another's. Values are bytes (orjson), kept in this
process (memory: a bounded LRU) or in the database (shared by every replica)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from core import db

log = logging.getLogger("core.cache")

# How a caller asks (HTTP's Cache-Control): use a stored answer; fetch afresh and store it
# (no-cache); neither read nor write (no-store).
Use = Literal["use", "refresh", "skip"]
# What happened, for the response's X-Cache header and the ledger.
State = Literal["hit", "miss", "partial", "bypass"]


def use_from(cache_control: str | None, pragma: str | None = None) -> Use:
    """The caller's wish, from a request's Cache-Control header (and HTTP/1.0's Pragma)."""
    text = f"{cache_control or ''},{pragma or ''}"
    directives = {d.strip().lower().replace(" ", "") for d in text.split(",")}
    if "no-store" in directives:
        return "skip"
    if "no-cache" in directives or "max-age=0" in directives:
        return "refresh"
    return "use"


@dataclass
class Outcome:
    """Filled in by the service for the caller that passed it: what the cache did."""

    cache: State | None = None  # None: the call is not one the cache takes


class Store(Protocol):
    def get_many(self, keys: list[str]) -> dict[str, bytes]: ...
    def put_many(self, items: Mapping[str, bytes], ttl: float) -> None: ...


# What an entry costs besides its key and value: the tuple, the map's node, the objects'
# headers (measured: about 280 bytes on CPython 3.11). Counted, so that many small entries
# (embeddings of one dimension) cannot hold many times CACHE_MAX_MB.
ENTRY_BYTES = 300


def _size(key: str, value: bytes) -> int:
    return len(key) + len(value) + ENTRY_BYTES


class MemoryStore:
    """A least-recently-used map bounded by the memory its entries take, with an expiry per
    entry."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        now = time.monotonic()
        found = {}
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None:
                    continue
                if entry[0] <= now:
                    self._drop(key)
                    continue
                self._entries.move_to_end(key)
                found[key] = entry[1]
        return found

    def put_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        expires = time.monotonic() + ttl
        with self._lock:
            for key, value in items.items():
                if _size(key, value) > self.max_bytes:
                    continue  # would push out everything else
                self._drop(key)
                self._entries[key] = (expires, value)
                self._bytes += _size(key, value)
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= _size(key, entry[1])


class DatabaseStore:
    """Entries in the `response_cache` table, so every replica shares them."""

    PRUNE_EVERY = 60.0  # seconds between deletions of expired entries

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pruned = 0.0

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        table = db.response_cache
        now = datetime.now(UTC)
        with db.reading(self.engine) as conn:
            rows = conn.execute(
                sa.select(table.c.key, table.c.value).where(
                    table.c.key.in_(keys), table.c.expires_at > now
                )
            ).all()
        return {key: bytes(value) for key, value in rows}

    def put_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        table = db.response_cache
        now = datetime.now(UTC)
        expires = now + timedelta(seconds=ttl)
        with self.engine.begin() as conn:
            # Replace: portable across SQLite and PostgreSQL, and the pair is one transaction.
            conn.execute(table.delete().where(table.c.key.in_(list(items))))
            conn.execute(
                table.insert(),
                [{"key": k, "value": v, "expires_at": expires} for k, v in items.items()],
            )
            if time.monotonic() - self._pruned > self.PRUNE_EVERY:
                self._pruned = time.monotonic()
                conn.execute(table.delete().where(table.c.expires_at <= now))


@dataclass
class Lookup:
    """One call's keys, and what the store had for them."""

    keys: list[str]
    found: dict[str, bytes] = field(default_factory=dict)
    write: bool = True

    @property
    def complete(self) -> bool:
        return bool(self.keys) and all(k in self.found for k in self.keys)

    @property
    def state(self) -> State:
        if self.complete:
            return "hit"
        return "partial" if self.found else "miss"

    def missing(self) -> list[int]:
        """The positions of the keys the store did not have."""
        return [i for i, k in enumerate(self.keys) if k not in self.found]


class ResponseCache:
    def __init__(self, store: Store, *, ttl: float, shared: bool, database: bool) -> None:
        self.store = store
        self.ttl = ttl
        self.shared = shared
        self._database = database  # its calls wait on the network: never on the event loop

    def key(self, user: str, material: Mapping[str, Any]) -> str:
        """A key for `material` (sorted, so the order of a request's fields does not count)
        asked by `user` (not part of it when the operator shares the cache)."""
        scoped = {"user": None if self.shared else user, **material}
        return hashlib.sha256(orjson.dumps(scoped, option=orjson.OPT_SORT_KEYS)).hexdigest()

    async def look_up(self, keys: list[str], use: Use) -> Lookup:
        lookup = Lookup(keys, write=use != "skip")
        if use == "use":
            try:
                lookup.found = await self._run(self.store.get_many, keys)
            except sa.exc.SQLAlchemyError:
                log.warning("the response cache could not be read; asking the backend")
        return lookup

    async def store_many(self, items: Mapping[str, bytes]) -> None:
        if not items:
            return
        try:
            await self._run(self.store.put_many, items, self.ttl)
        except sa.exc.SQLAlchemyError:
            log.warning("the response cache could not be written; the answer was not cached")

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._database:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)


def build_cache(
    kind: str, *, engine: Engine | None, ttl: float, shared: bool, max_bytes: int
) -> ResponseCache | None:
    """The cache CACHE names (off: None). CACHE=database needs the app's database."""
    if kind == "memory":
        return ResponseCache(MemoryStore(max_bytes), ttl=ttl, shared=shared, database=False)
    if kind == "database":
        if engine is None:
            raise ValueError("CACHE=database needs the app's database")
        return ResponseCache(DatabaseStore(engine), ttl=ttl, shared=shared, database=True)
    return None
