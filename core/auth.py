"""Access keys: constant-time checks, and a lockout after repeated failed logins."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import queue
import re
import secrets
import threading
import time
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from core import db
from core.config import Settings
from core.errors import RateLimited, ServiceError
from core.ledger import Limits
from core.log import REDACTED, redact
from core.users import User, UserStore, key_user_id

log = logging.getLogger("core.auth")
_UNSAFE = re.compile(r"[^A-Za-z0-9 ._@+\-]")
REVOKED_WITHIN = 2.0  # seconds: how soon every replica sees a disabled user or a new key


@dataclass(frozen=True)
class Principal:
    """Who is calling: a database user, or the owner (ACCESS_KEY, an admin with no quotas)."""

    name: str
    role: Literal["admin", "user"]
    limits: Limits = field(default_factory=Limits)
    user_id: int | None = None
    key_version: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# Set by the web edge around POST /login with the client's address; the hook fills in the
# principal (so the edge learns which key the new session belongs to without parsing the form)
# or the lockout that refused it.
LOGIN_CAPTURE: ContextVar[dict[str, Any] | None] = ContextVar("login_capture")

SYSTEM = Principal(name="system", role="admin")  # core used from a script, without a login


class Authenticator:
    """Checks keys (the owner's ACCESS_KEY and users' own keys) and resolves sessions to callers.

    Also Gradio's auth hook: `auth=authenticator` calls it with (username, key).
    """

    def __init__(self, settings: Settings, users: UserStore | None = None) -> None:
        assert settings.access_key is not None, "load_settings always sets an access key"
        self._key = settings.access_key.get_secret_value().encode()
        self.users = users
        self.defaults = Limits(
            daily_tokens=settings.default_daily_tokens or None, rpm=settings.default_rpm or None
        )
        self.lockout = Lockout(
            max_failures=settings.login_max_failures,
            window=settings.login_lockout_seconds,
            engine=users.engine if users is not None else None,
        )

    def __call__(self, username: str, password: str) -> bool:
        """Gradio's auth hook; the web edge passes the client's address in LOGIN_CAPTURE."""
        holder = LOGIN_CAPTURE.get(None)
        client = (holder or {}).get("client", "unknown")
        try:
            principal = self.login(username, password, client=client)
        except LockedOut as exc:
            if holder is not None:
                holder["locked"] = exc
            return False
        if principal is not None and holder is not None:
            holder["principal"] = principal  # the web edge binds the new session to this key
        return principal is not None

    def login(self, username: str, key: str, *, client: str) -> Principal | None:
        """A sign-in with a name and key from `client`, counted against its lockout.

        Every wrong key counts, whatever the name: any login may be a guess at the owner key,
        so a success (one's own) clears nothing. While the address is locked out only users'
        own keys (256 random bits: guessing them is hopeless) are checked, never the owner
        key, so a team behind one address keeps working while a guesser waits.
        """
        # The name field may hold a key typed in the wrong box: redact before cleaning it up.
        hidden = redact(username or "", [self._key.decode()]) != (username or "")
        name = REDACTED if hidden else display_name(username)
        if wait := self.lockout.retry_after(client):
            user = self.users.authenticate(username, key or "") if self.users else None
            if user is None:
                raise LockedOut(wait)
            principal: Principal | None = self._principal(user)
        else:
            principal = self.authenticate(username, key)
            if principal is None:
                self.lockout.failure(client, name.lower())
        log.info("login %s for user %r", "accepted" if principal else "refused", name)
        return principal

    def authenticate(self, username: str, key: str) -> Principal | None:
        """The caller for this name and key, or None."""
        if hmac.compare_digest((key or "").encode(), self._key):
            return self.resolve(username)
        if self.users is None:
            return None
        user = self.users.authenticate(username, key or "")
        return self._principal(user) if user else None

    def authenticate_bearer(self, key: str, *, client: str = "unknown") -> Principal | None:
        """The caller for an `Authorization: Bearer` key alone (/v1, /metrics), counted
        against the client's lockout like a login; raises LockedOut while it is locked."""
        locked = self.lockout.retry_after(client)
        if not locked and hmac.compare_digest((key or "").encode(), self._key):
            return Principal(name="owner", role="admin")
        user = self.users.authenticate_key(key) if self.users else None
        if user is not None:
            return self._principal(user)  # users' own keys work even while locked out
        if locked:
            raise LockedOut(locked)
        target = f"user #{user_id}" if (user_id := key_user_id(key or "")) else "owner key"
        self.lockout.failure(client, target)
        return None

    def resolve(self, username: str | None) -> Principal:
        """The caller behind a logged-in session's user name.

        A name that is a database user is that user (so the owner key cannot hide a user's
        usage under their name); any other logged-in name was let in by the owner key.
        """
        name = display_name(username)
        # Every call resolves its caller: a second-old answer will do here, because the
        # session guard already checked this session's key afresh on this request.
        user = self.users.get(name, max_age=1.0) if self.users else None
        if user is None:
            return Principal(name=name, role="admin")
        return self._principal(user)

    def check_active(self, principal: Principal) -> None:
        """Refuse a caller whose key was disabled or rotated since they signed in."""
        if principal.user_id is None or self.users is None:
            return

        # Read again after at most REVOKED_WITHIN seconds (at once on the replica that made
        # the change: it forgets its own copy), not on every request of every session.
        def revoked(user: User | None) -> bool:
            return user is None or user.disabled or user.key_version != principal.key_version

        # A copy older than this session (a key rotated elsewhere, then signed in with here)
        # must not end it: only a fresh read may.
        cached = self.users.get(principal.name, max_age=REVOKED_WITHIN)
        if revoked(cached) and revoked(self.users.get(principal.name)):
            raise Revoked()

    def _principal(self, user: User) -> Principal:
        limits = Limits(
            daily_tokens=user.daily_tokens or self.defaults.daily_tokens,
            rpm=user.rpm or self.defaults.rpm,
        )
        return Principal(
            name=user.name,
            role=user.role,
            limits=limits,
            user_id=user.id,
            key_version=user.key_version,
        )


class Revoked(ServiceError):
    """The key behind this session was disabled or rotated."""

    status = 401
    default_message = "Your access key was disabled or replaced. Sign in again."


def _bucket(client: str) -> str:
    """The unit a lockout counts: an IPv4 address, or an IPv6 address's /64 (one host
    usually holds a whole /64, so single addresses would be fresh starts without end)."""
    if ":" not in client:
        return client
    try:
        return str(ipaddress.IPv6Network(f"{client}/64", strict=False))
    except ValueError:
        return client


def display_name(username: str | None) -> str:
    """A username safe to show and log: printable, short, never empty."""
    # As long as a user name may be (core.users.NAME_PATTERN), so every user's name passes
    # unchanged: resolve() looks the user up by this, and a name it cannot find is the owner.
    cleaned = _UNSAFE.sub("", (username or "").strip())[:64]
    return cleaned or "user"


class LockedOut(RateLimited):
    """Too many failed sign-ins (logins or bearer keys) from this address: wait."""

    default_message = "Too many failed sign-ins from your address."

    def __init__(self, retry_after: float) -> None:
        minutes = max(1, round(retry_after / 60))
        super().__init__(
            f"Too many failed sign-ins from your address. Try again in about {minutes} minute(s).",
            retry_after=retry_after,
        )


class Lockout:
    """Failed sign-ins per client address (an IPv6 address counts as its /64), each noted
    with the name it was aimed at (for the log).

    Logins and bearer keys (/v1, /metrics) count together. Too many failures within the
    window lock the address out; failures only age out, no success clears them (any login
    can be a guess at the owner key). Callers check and count in one synchronous step (no
    await in between), so concurrent guesses cannot all slip past the first failure.

    With a database (`engine`), every replica counts every replica's failures: each failure
    is written in the background, and the others' are read at most every SHARE_EVERY seconds,
    also in the background, so a check never waits on the database.
    """

    SHARE_EVERY = 2.0
    MAX_TRACKED = 10_000  # addresses, before aged-out ones are forgotten

    def __init__(self, *, max_failures: int, window: float, engine: Engine | None = None) -> None:
        self.max_failures = max_failures
        self.window = window
        self.engine = engine
        self.replica = secrets.token_hex(8)
        self._failures: dict[str, deque[tuple[float, str]]] = {}
        self._pruned = 0.0
        self._others: dict[str, list[float]] = {}  # other replicas' failures (wall clock)
        self._lock = threading.Lock()
        self._read = 0.0
        self._reading = False
        self._writes: queue.SimpleQueue[tuple[str, float]] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None

    def retry_after(self, client: str, now: float | None = None) -> float:
        """Seconds until `client` may try again (0 when it is not locked out)."""
        client = _bucket(client)
        now = time.time() if now is None else now
        self._share()
        with self._lock:
            times = [t for t, _ in self._recent(client, now)]
            times += [t for t in self._others.get(client, ()) if t > now - self.window]
            if len(times) < self.max_failures:
                return 0.0
            times.sort()
            return max(0.0, times[-self.max_failures] + self.window - now)

    def check(self, client: str) -> None:
        """Raise LockedOut while `client` is locked out."""
        if wait := self.retry_after(client):
            raise LockedOut(wait)

    def failure(self, client: str, name: str, now: float | None = None) -> None:
        client = _bucket(client)
        now = time.time() if now is None else now
        with self._lock:
            self._recent(client, now).append((now, name))
            if len(self._failures) > self.MAX_TRACKED and now - self._pruned > 10:
                self._prune(now)
        if self.engine is not None:
            self._writes.put((client, now))
            self._start_writer()
        if wait := self.retry_after(client, now):
            log.warning(
                "sign-in locked for client %s after %d failed attempts; retry in %.0f s",
                client,
                self.max_failures,
                wait,
            )

    def _recent(self, client: str, now: float) -> deque[tuple[float, str]]:
        attempts = self._failures.setdefault(client, deque(maxlen=self.max_failures * 4))
        while attempts and attempts[0][0] <= now - self.window:
            attempts.popleft()
        return attempts

    def _prune(self, now: float) -> None:
        """Forget addresses whose failures aged out (at most every ten seconds: a flood of
        made-up addresses must not make each failure scan them all); past a hard cap, the
        addresses tracked longest go first."""
        self._pruned = now
        stale = [c for c, a in self._failures.items() if not a or a[-1][0] <= now - self.window]
        for client in stale:
            del self._failures[client]
        for client in list(self._failures)[: max(0, len(self._failures) - 10 * self.MAX_TRACKED)]:
            del self._failures[client]

    # ---- sharing through the database (background threads only) ---------------------------

    def _start_writer(self) -> None:
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, name="lockout", daemon=True)
                self._writer.start()

    def _write(self) -> None:
        assert self.engine is not None
        while True:
            bucket, at = self._writes.get()
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        db.sign_in_failures.insert().values(
                            bucket=bucket[:64], ts=datetime.fromtimestamp(at, UTC),
                            replica=self.replica,
                        )
                    )  # fmt: skip
            except Exception:
                log.exception("could not share a failed sign-in with the other replicas")

    def _share(self) -> None:
        """Read the other replicas' recent failures, in the background, when it is time."""
        if self.engine is None or self._reading or time.monotonic() - self._read < self.SHARE_EVERY:
            return
        self._reading = True
        threading.Thread(target=self._read_others, name="lockout-read", daemon=True).start()

    def _read_others(self) -> None:
        assert self.engine is not None
        try:
            since = datetime.fromtimestamp(time.time() - self.window, UTC)
            f = db.sign_in_failures.c
            with self.engine.begin() as conn:
                conn.execute(db.sign_in_failures.delete().where(f.ts < since))
                rows = conn.execute(
                    sa.select(f.bucket, f.ts).where(f.ts >= since, f.replica != self.replica)
                ).all()
            others: dict[str, list[float]] = {}
            for bucket, at in rows:
                at = at if at.tzinfo else at.replace(tzinfo=UTC)
                others.setdefault(bucket, []).append(at.timestamp())
            with self._lock:
                self._others = others
        except Exception:
            log.exception("could not read the other replicas' failed sign-ins")
        finally:
            self._read = time.monotonic()
            self._reading = False
