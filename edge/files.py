"""Files: which file a request may send or read, and how much a user may store.

Gradio copies any path named in an event's input into its cache and serves it back (on a
mounted app its own check is off unless the edge turns it on), so the edge keeps a registry:
- a file a user uploads belongs to that session; a file the server writes for a user
  (a generated image, a CSV export) belongs to that user;
- an event, API call or stream input may name only files its session may use: any other
  path (/proc/self/environ, the database, ../, /dev/zero, a symlink, a URL) is refused before
  Gradio reads the body;
- /gradio_api/file= serves a file only to its owner (others get 404);
- uploads count against UPLOAD_QUOTA_MB per user and go when their session ends or after
  UPLOAD_TTL_MINUTES; generated files go after the same time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from edge.http import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    header,
    read_body,
    refuse,
    replay,
)
from edge.sessions import SCOPE_KEY, Session

log = logging.getLogger("edge.files")
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")
UPLOAD_ROUTE = "/gradio_api/upload"
SWEEP_EVERY = 60.0


@dataclass
class StoredFile:
    path: str
    user: str
    session: str | None  # the uploading session; None for a file the server wrote
    size: int
    expires: float


class FileRegistry:
    """Owners of the files under Gradio's cache folder; thread-safe."""

    def __init__(self, root: str | Path, *, quota_bytes: int, ttl: float) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.quota_bytes = quota_bytes
        self.ttl = ttl
        self._files: dict[str, list[StoredFile]] = {}
        self._reserved: dict[str, int] = {}  # bytes of uploads still arriving, per user
        self._lock = threading.Lock()
        self._swept = time.monotonic()

    def resolve(self, path: str) -> str | None:
        """The real path of a file under the cache folder, or None for anything else."""
        if not path or "\x00" in path or "://" in path:
            return None
        try:
            real = Path(path).resolve()
        except (OSError, RuntimeError):
            return None
        return str(real) if real.is_relative_to(self.root) else None

    def write(self, data: bytes, name: str, *, user: str) -> str:
        """Write a file the server made for `user` (in a fresh unguessable folder); its path."""
        folder = self.root / f"out-{secrets.token_hex(16)}"
        folder.mkdir()
        path = folder / Path(name).name
        path.write_bytes(data)
        self._add(StoredFile(str(path), user, None, len(data), self._expiry()))
        return str(path)

    def add_upload(self, path: str, *, session: Session, size: int) -> None:
        if real := self.resolve(path):
            self._add(StoredFile(real, session.user, session.token, size, self._expiry()))

    def may_use(self, path: str, *, session: Session) -> bool:
        """May this session name `path` in an input: its own upload, or its user's output."""
        real = self.resolve(path)
        with self._lock:
            records = self._files.get(real or "", [])
            return any(
                r.user == session.user and r.session in (None, session.token) for r in records
            )

    def may_read(self, path: str, *, user: str) -> bool:
        real = self.resolve(path)
        with self._lock:
            return any(r.user == user for r in self._files.get(real or "", []))

    def used_bytes(self, user: str) -> int:
        with self._lock:
            return self._used(user)

    def reserve(self, user: str, size: int) -> bool:
        """Hold `size` bytes of the user's quota for an upload in progress (checked and held
        in one step, so concurrent uploads cannot all pass the same check); False if full."""
        with self._lock:
            if self._used(user) + size > self.quota_bytes:
                return False
            self._reserved[user] = self._reserved.get(user, 0) + size
            return True

    def release(self, user: str, size: int) -> None:
        with self._lock:
            left = self._reserved.get(user, 0) - size
            if left > 0:
                self._reserved[user] = left
            else:
                self._reserved.pop(user, None)

    def _used(self, user: str) -> int:
        stored = sum(r.size for rs in self._files.values() for r in rs if r.user == user)
        return stored + self._reserved.get(user, 0)

    def end_session(self, session: Session) -> None:
        """Forget (and delete) the uploads of a session that ended."""
        self._drop(lambda r: r.session == session.token)

    def sweep(self) -> None:
        """Delete what expired; at most once a minute, so calling it often costs nothing."""
        now = time.monotonic()
        if now - self._swept < SWEEP_EVERY:
            return
        self._swept = now
        self._drop(lambda r: r.expires <= now)

    def _expiry(self) -> float:
        return time.monotonic() + self.ttl

    def _add(self, record: StoredFile) -> None:
        with self._lock:
            self._files.setdefault(record.path, []).append(record)

    def _drop(self, gone: Any) -> None:
        orphans = []
        with self._lock:
            for path, records in list(self._files.items()):
                kept = [r for r in records if not gone(r)]
                if kept:
                    self._files[path] = kept
                else:
                    del self._files[path]
                    orphans.append(path)
        for path in orphans:  # no one holds them any more
            with contextlib.suppress(OSError):
                os.unlink(path)
            folder = Path(path).parent
            if folder != self.root and folder.name.startswith("out-"):
                shutil.rmtree(folder, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # Gradio's per-upload folder, once empty


class FileGuard:
    def __init__(self, app: ASGIApp, *, registry: FileRegistry, max_bytes: int) -> None:
        self.app = app
        self.files = registry
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/gradio_api/"):
            await self.app(scope, receive, send)
            return
        session: Session | None = scope.get(SCOPE_KEY)
        self.files.sweep()
        if session is None:  # only public paths get here without one: no files there
            await self.app(scope, receive, send)
        elif path.startswith(FILE_ROUTES):
            await self._serve(scope, receive, send, session)
        elif path.startswith("/gradio_api/proxy="):
            await refuse(scope, send, 404, "Not found.")
        elif path.rstrip("/") == UPLOAD_ROUTE and scope["method"] == "POST":
            await self._upload(scope, receive, send, session)
        elif scope["method"] == "POST":
            await self._check_inputs(scope, receive, send, session)
        else:
            await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, session: Session):
        prefix = next(p for p in FILE_ROUTES if scope["path"].startswith(p))
        wanted = scope["path"][len(prefix) :]
        if not self.files.may_read(wanted, user=session.user):
            await refuse(scope, send, 404, "File not found.")
            return
        await self.app(scope, receive, send)

    async def _check_inputs(self, scope: Scope, receive: Receive, send: Send, session: Session):
        """Refuse any event input that names a file this session may not use."""
        body, complete = await read_body(receive)
        if not complete or len(body) > self.max_bytes:  # BodyLimit already capped it
            return
        try:
            data = orjson.loads(body) if body.strip() else None
        except orjson.JSONDecodeError:
            # Gradio would parse it more leniently (NaN, UTF-16), past this check: refuse.
            await refuse(scope, send, 400, "The request body must be JSON in UTF-8.")
            return
        for named in file_paths(data):
            if not self.files.may_use(named, session=session):
                log.warning("refused a file input %r from user %r", named[:200], session.user)
                await refuse(scope, send, 403, "A file in the request is not one you uploaded.")
                return
        await self.app(scope, replay(body, receive), send)

    async def _upload(self, scope: Scope, receive: Receive, send: Send, session: Session):
        length = header(scope, b"content-length")
        if length is None or not length.isdigit():
            await refuse(scope, send, 411, "An upload needs a Content-Length.")
            return
        size = int(length)
        if not self.files.reserve(session.user, size):
            used, quota = self.files.used_bytes(session.user), self.files.quota_bytes
            message = (
                f"Upload refused: you store {used / 1e6:.1f} MB of your {quota / 1e6:.0f} MB "
                "(UPLOAD_QUOTA_MB). Uploads go when you sign out or after UPLOAD_TTL_MINUTES."
            )
            await refuse(scope, send, 413, message)
            return
        try:
            await self._store(scope, receive, send, session, size)
        finally:
            self.files.release(session.user, size)  # now counted by its records, if stored

    async def _store(self, scope: Scope, receive: Receive, send: Send, session: Session, size: int):
        start: Message | None = None
        chunks: list[bytes] = []

        async def hold(message: Message) -> None:
            """Keep the answer until its paths are registered, so the client cannot use one
            before the registry knows it is theirs."""
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            if start is not None and start["status"] == 200:
                try:
                    paths = [p for p in orjson.loads(body) if isinstance(p, str)]
                except (orjson.JSONDecodeError, TypeError):
                    paths = []
                for path in paths:
                    self.files.add_upload(path, session=session, size=size // len(paths))
            if start is not None:
                await send(start)
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, hold)


def file_paths(data: Any) -> list[str]:
    """Every value an input names as a file: the `path` of any object that has one (Gradio
    treats such objects as FileData), and plain strings are not paths."""
    found: list[str] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("path"), str):
                found.append(item["path"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found
