"""Access keys: constant-time checks, and a lockout after repeated failed logins."""

from __future__ import annotations

import asyncio
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
from core.users import Credential, Unknown, User, UserStore, key_user_id, verify

log = logging.getLogger("core.auth")
_UNSAFE = re.compile(r"[^A-Za-z0-9 ._@+\-]")
REVOKED_WITHIN = 2.0  # seconds: how soon every replica sees a disabled user or a new key
RESOLVED_WITHIN = 1.0  # seconds: how old a copy of a session's user may be to name its caller


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


# Set by the web edge around POST /login with the client's address and what the sign-in needs
# from the database ("found": a SignIn, read in a thread beforehand, since Gradio calls its
# auth hook on the event loop); the hook fills in the principal (so the edge learns which key
# the new session belongs to without parsing the form) or the lockout that refused it.
LOGIN_CAPTURE: ContextVar[dict[str, Any] | None] = ContextVar("login_capture")


@dataclass(frozen=True)
class SignIn:
    """What a sign-in as `username` needs from the database, read before it is decided: so
    the decision (lockout included) is one synchronous step with no database wait in it."""

    username: str
    credential: Credential | None  # the user of that name, with their key's hash
    owner_as: User | None  # the user display_name(username) names: who the owner key signs in as


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
        """Gradio's auth hook, called on the event loop; the web edge passes the client's
        address and the user looked up beforehand (off the loop) in LOGIN_CAPTURE."""
        holder = LOGIN_CAPTURE.get(None) or {}
        client = holder.get("client", "unknown")
        try:
            principal = self.login(username, password, client=client, found=holder.get("found"))
        except LockedOut as exc:
            holder["locked"] = exc
            return False
        if principal is not None:
            holder["principal"] = principal  # the web edge binds the new session to this key
        return principal is not None

    def look_up(self, username: str) -> SignIn:
        """What a sign-in as `username` needs from the database, read now (blocking: the web
        edge calls it in a thread before Gradio's auth hook, which then decides from it)."""
        if self.users is None:
            return SignIn(username, None, None)
        found = self.users.credential(username)
        name = display_name(username)
        if name == username:
            owner_as = found.user if found is not None else None
        else:
            owner_as = self.users.get(name)
        return SignIn(username, found, owner_as)

    def login(
        self, username: str, key: str, *, client: str, found: SignIn | None = None
    ) -> Principal | None:
        """A sign-in with a name and key from `client`, counted against its lockout.

        Every wrong key counts, whatever the name: any login may be a guess at the owner key,
        so a success (one's own) clears nothing. While the address is locked out only users'
        own keys (256 random bits: guessing them is hopeless) are checked, never the owner
        key, so a team behind one address keeps working while a guesser waits.

        `found`: look_up(username), read beforehand; without it, it is read here (blocking).
        """
        if found is None or found.username != username:
            found = self.look_up(username)
        # The name field may hold a key typed in the wrong box: redact before cleaning it up.
        hidden = redact(username or "", [self._key.decode()]) != (username or "")
        name = REDACTED if hidden else display_name(username)
        if wait := self.lockout.retry_after(client):
            user = verify(found.credential, key or "") if self.users else None
            if user is None:
                raise LockedOut(wait)
            principal: Principal | None = self._principal(user)
        else:
            principal = self._signed_in(found, key)
            if principal is None:
                self.lockout.failure(client, name.lower())
        log.info("login %s for user %r", "accepted" if principal else "refused", name)
        return principal

    def authenticate(self, username: str, key: str) -> Principal | None:
        """The caller for this name and key, or None (blocking: reads the database)."""
        return self._signed_in(self.look_up(username), key)

    def _signed_in(self, found: SignIn, key: str) -> Principal | None:
        if hmac.compare_digest((key or "").encode(), self._key):
            if found.owner_as is None:
                return Principal(name=display_name(found.username), role="admin")
            return self._principal(found.owner_as)
        if self.users is None:
            return None
        user = verify(found.credential, key or "")
        return self._principal(user) if user else None

    def authenticate_bearer(self, key: str, *, client: str = "unknown") -> Principal | None:
        """The caller for an `Authorization: Bearer` key alone (/v1, /metrics), counted
        against the client's lockout like a login; raises LockedOut while it is locked.
        Blocking (it may read the key's user); async code calls authenticate_bearer_async."""
        found = self.users.key_credential(key, max_age=REVOKED_WITHIN) if self.users else None
        return self._bearer(key, client, found)

    async def authenticate_bearer_async(
        self, key: str, *, client: str = "unknown"
    ) -> Principal | None:
        """authenticate_bearer, never waiting on the database on the event loop: a user's key
        whose user was read within REVOKED_WITHIN seconds is checked from memory, inline (no
        thread hop on the hot path); otherwise the key's user is read in a thread first."""
        found = self.users.recall_key(key, REVOKED_WITHIN) if self.users else None
        if isinstance(found, Unknown):
            assert self.users is not None
            found = await asyncio.to_thread(self.users.key_credential, key)
        return self._bearer(key, client, found)

    def _bearer(self, key: str, client: str, found: Credential | None) -> Principal | None:
        """The decision on a bearer key, with its user (if any) already read: the lockout is
        checked and counted in this one synchronous step, with no wait in between."""
        locked = self.lockout.retry_after(client)
        if not locked and hmac.compare_digest((key or "").encode(), self._key):
            return Principal(name="owner", role="admin")
        user = verify(found, key or "") if self.users else None
        if user is not None:
            return self._principal(user)  # users' own keys work even while locked out
        if locked:
            raise LockedOut(locked)
        target = f"user #{user_id}" if (user_id := key_user_id(key or "")) else "owner key"
        self.lockout.failure(client, target)
        return None

    def resolve(self, username: str | None) -> Principal:
        """The caller behind a logged-in session's user name (blocking: it may read the user;
        async code uses the caller the session guard resolved, or resolve_async).

        A name that is a database user is that user (so the owner key cannot hide a user's
        usage under their name); any other logged-in name was let in by the owner key.
        """
        name = display_name(username)
        # Every call resolves its caller: a second-old answer will do here, because the
        # session guard already checked this session's key afresh on this request.
        user = self.users.get(name, max_age=RESOLVED_WITHIN) if self.users else None
        return self._caller(name, user)

    def resolve_cached(self, username: str | None) -> Principal | None:
        """resolve() from memory alone: None when only the database could tell."""
        name = display_name(username)
        if self.users is None:
            return self._caller(name, None)
        user = self.users.recall(name, RESOLVED_WITHIN)
        return None if isinstance(user, Unknown) else self._caller(name, user)

    async def resolve_async(self, username: str | None) -> Principal:
        """resolve() without a database wait on the event loop (a thread reads, if needed)."""
        cached = self.resolve_cached(username)
        return cached if cached is not None else await asyncio.to_thread(self.resolve, username)

    def _caller(self, name: str, user: User | None) -> Principal:
        return Principal(name=name, role="admin") if user is None else self._principal(user)

    def check_active(self, principal: Principal) -> None:
        """Refuse a caller whose key was disabled or rotated since they signed in (blocking:
        it may read the user; async code calls check_active_async)."""
        if principal.user_id is None or self.users is None:
            return
        # Read again after at most REVOKED_WITHIN seconds (at once on the replica that made
        # the change: it forgets its own copy), not on every request of every session.
        # A copy older than this session (a key rotated elsewhere, then signed in with here)
        # must not end it: only a fresh read may.
        cached = self.users.get(principal.name, max_age=REVOKED_WITHIN)
        if _revoked(principal, cached) and _revoked(principal, self.users.get(principal.name)):
            raise Revoked()

    async def check_active_async(self, principal: Principal) -> None:
        """check_active without a database wait on the event loop: a copy of the user read
        within REVOKED_WITHIN seconds that shows the key still valid answers inline; anything
        else (no copy, too old, or one that says revoked, which only a fresh read may
        confirm) is checked in a thread."""
        if principal.user_id is None or self.users is None:
            return
        cached = self.users.recall(principal.name, REVOKED_WITHIN)
        if isinstance(cached, Unknown) or _revoked(principal, cached):
            await asyncio.to_thread(self.check_active, principal)

    async def session_caller(self, username: str, principal: Principal) -> Principal:
        """The caller behind a live session on this request, from the session's user name
        (as resolve()) and its token's principal: raises Revoked if the key it signed in
        with was disabled or rotated since (as check_active). From memory when it can
        answer; else one thread hop reads the database (never the event loop)."""
        if principal.user_id is not None and self.users is not None:
            cached = self.users.recall(principal.name, REVOKED_WITHIN)
            if isinstance(cached, Unknown) or _revoked(principal, cached):
                return await asyncio.to_thread(self._session_caller, username, principal)
            if cached is not None and display_name(username) == principal.name:
                return self._principal(cached)  # the copy that was just checked names it
        return await self.resolve_async(username)

    def _session_caller(self, username: str, principal: Principal) -> Principal:
        self.check_active(principal)
        return self.resolve(username)

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


def _revoked(principal: Principal, user: User | None) -> bool:
    """Whether `user` (as read) no longer honours the key `principal` signed in with."""
    return user is None or user.disabled or user.key_version != principal.key_version


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
        if client not in self._failures and client not in self._others:
            return 0.0  # no failure from there: most calls, with no lock and nothing kept
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
