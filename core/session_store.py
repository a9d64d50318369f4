"""Sessions as signed tokens (JWT, HS256 with SESSION_SECRET): what they carry, and the few
that end early (sign-out), written to the database so every replica knows.

A token names its user, the user's key version (or, for the owner key, a mark of that key),
when it was made and when it was last used; any replica that shares the secret accepts it,
and a restart keeps everyone signed in. Disabling a user or rotating a key still ends their
sessions at once: the key version is checked against the database on each request."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import jwt
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from core import db
from core.errors import ConfigError

log = logging.getLogger("core.session_store")
ALGORITHM = "HS256"
SECRET_FILE = "session_secret"
REFRESH_SECONDS = 3.0  # the ended-sessions list is read again at most this often
CLOCK_SKEW = 30  # seconds of difference between replicas' clocks a token tolerates


def session_secret(configured: str | None, data_dir: Path, *, shared_database: bool) -> bytes:
    """SESSION_SECRET, or one made once and kept in DATA_DIR (readable by this user only)."""
    if configured:
        return configured.encode()
    path = data_dir / SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        # Written whole under another name, then moved into place: a second process starting
        # at the same moment reads a whole secret (one of the two), never half of one.
        draft = data_dir / f".{SECRET_FILE}.{os.getpid()}"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(48))
        try:
            os.link(draft, path)  # fails if another process made it first: theirs wins
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    if shared_database:
        log.warning(
            "SESSION_SECRET is not set: sessions are signed with a secret kept in %s. Replicas "
            "sharing DATABASE_URL must share one secret, or each signs everyone else out: set "
            "the same SESSION_SECRET on all of them.",
            path,
        )
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise ConfigError(
            f"{path} holds a session secret shorter than 32 characters: delete it (a new one "
            "is made) or set SESSION_SECRET."
        )
    return secret.encode()


def key_mark(secret: bytes, key: str) -> str:
    """A mark of the owner key in its sessions: a new ACCESS_KEY ends the old key's sessions."""
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:16]


def encode(secret: bytes, claims: dict[str, object]) -> str:
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def decode(secret: bytes, token: str) -> dict[str, object] | None:
    """The claims of a token this secret signed and that has not expired, else None."""
    try:
        return jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "iat", "jti"]},
            leeway=CLOCK_SKEW,  # replicas' clocks may differ a little
        )
    except jwt.PyJWTError:
        return None


class EndedSessions:
    """Token ids signed out before they expired, from the database, read at most every few
    seconds (never on each request); adding one writes it at once."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ended: set[str] = set()
        self._mine: dict[str, float] = {}  # ended here: kept even before the database shows them
        self._read = 0.0
        self._reading = False
        self._lock = threading.Lock()

    def add(self, jti: str, expires: float) -> None:
        """End `jti` here at once, and for every replica once the database has it (a
        database that does not answer is logged, not raised: the sign-out still happens
        here, and the cookie is still cleared)."""
        with self._lock:
            self._mine[jti] = expires
        try:
            self._write(jti, expires)
        except sa.exc.SQLAlchemyError:
            log.warning("could not write a sign-out for the other replicas (database down)")

    def _write(self, jti: str, expires: float) -> None:
        at = datetime.fromtimestamp(expires, UTC)
        with self.engine.begin() as conn:
            exists = conn.execute(
                sa.select(db.ended_sessions.c.jti).where(db.ended_sessions.c.jti == jti)
            )
            if exists.first() is None:
                conn.execute(db.ended_sessions.insert().values(jti=jti, expires_at=at))
            # Those that expired need no entry any more.
            conn.execute(
                db.ended_sessions.delete().where(db.ended_sessions.c.expires_at < datetime.now(UTC))
            )

    def stale(self) -> bool:
        return not self._reading and time.monotonic() - self._read > REFRESH_SECONDS

    def refresh(self) -> None:
        """Read the list again (blocking: call it off the event loop). One read at a time;
        while the database does not answer, the last list is kept and read again later."""
        with self._lock:
            if self._reading:
                return
            self._reading = True
        try:
            now = datetime.now(UTC)
            with db.reading(self.engine) as conn:
                rows = conn.execute(
                    sa.select(db.ended_sessions.c.jti).where(db.ended_sessions.c.expires_at >= now)
                ).scalars()
                ended = set(rows)
            wall = time.time()
            with self._lock:
                self._mine = {j: at for j, at in self._mine.items() if at > wall}
                self._ended = ended
        except sa.exc.SQLAlchemyError:
            log.warning("could not read the ended sessions (database down): keeping the last list")
        finally:
            self._read = time.monotonic()
            self._reading = False

    def __contains__(self, jti: object) -> bool:
        return jti in self._ended or jti in self._mine
