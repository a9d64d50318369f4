"""Users with their own access keys (only salted hashes are stored), and a CLI to manage them.

python -m core.users add NAME [--admin] [--daily-tokens N] [--rpm N]
python -m core.users list | disable NAME | enable NAME | rotate NAME | limits NAME ...
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from core import db
from core.errors import ConfigError, InvalidRequest

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+\-]{0,63}$")
KEY_PREFIX = "dk_"
Role = Literal["admin", "user"]
# Built once: SQLAlchemy memoizes a statement's cache key, so reusing it skips that work on
# every lookup (one or two per call).
_BY_NAME = sa.select(db.users).where(db.users.c.name == sa.bindparam("name"))
_BY_ID = sa.select(db.users).where(db.users.c.id == sa.bindparam("id"))


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: Role
    disabled: bool
    daily_tokens: int | None
    rpm: int | None
    key_version: int
    created_at: datetime

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Credential:
    """A user with their key's salted hash: what checking one of their keys needs."""

    user: User
    key_hash: str = field(repr=False)


class Unknown:
    """What memory answers when only the database could tell (nothing kept, or too old)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = Unknown()


def new_key(user_id: int) -> str:
    """dk_<user id>_<256 random bits>: the id finds the row, the salted hash checks the rest."""
    return f"{KEY_PREFIX}{user_id}_{secrets.token_urlsafe(32)}"


def key_user_id(key: str) -> int | None:
    """The user id a key names, or None if it is not one of ours."""
    if not key.startswith(KEY_PREFIX):
        return None
    user_id, _, rest = key[len(KEY_PREFIX) :].partition("_")
    return int(user_id) if user_id.isdigit() and rest else None


def hash_key(key: str, salt: str | None = None) -> str:
    """A salted SHA-256 of the key. Keys are 256 random bits, so a slow KDF adds nothing."""
    salt = salt or secrets.token_hex(16)
    digest = hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()
    return f"sha256${salt}${digest}"


def key_matches(key: str, stored: str) -> bool:
    try:
        _, salt, _ = stored.split("$", 2)
    except ValueError:
        return False
    return hmac.compare_digest(hash_key(key, salt), stored)


_DUMMY_HASH = hash_key("dummy")


def verify(found: Credential | None, key: str) -> User | None:
    """The user `found`, if enabled and `key` is theirs; else None. Constant time, and the
    same work when nobody was found: no timing oracle."""
    if found is None:
        key_matches(key, _DUMMY_HASH)
        return None
    if not key_matches(key, found.key_hash) or found.user.disabled:
        return None
    return found.user


def _check_limit(value: int | None, what: str) -> int | None:
    if value is not None and not 0 <= value <= 10**12:
        raise InvalidRequest(f"{what} must be between 0 and 10^12 (0 or empty: the default)")
    return value or None


class UserStore:
    """Users in the project's database; every change takes effect on the next request.

    Lookups that may use a recent answer (max_age) keep what they read in memory: users by
    name (a name that is no user is remembered too) and keys' hashes by user id. A change made
    here replaces this process's copy at once; other processes see it once theirs is older
    than the max_age their callers allow. `recall` and `recall_key` answer from memory alone,
    so that async callers read the database (in a thread) only when memory cannot answer."""

    MAX_KEPT = 10_000

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cache: dict[str, tuple[float, User | None]] = {}
        self._keys: dict[int, tuple[float, Credential]] = {}
        self._lock = threading.Lock()  # for changes to the copies (lookups need none)

    def add(
        self,
        name: str,
        *,
        role: Role = "user",
        daily_tokens: int | None = None,
        rpm: int | None = None,
    ) -> tuple[User, str]:
        """Create a user; returns the user and their key (shown once, never stored)."""
        if not NAME_PATTERN.match(name or ""):
            raise InvalidRequest(
                "A user name is 1 to 64 letters, digits or . _ @ + - (starting with a letter "
                "or digit)."
            )
        if role not in ("admin", "user"):
            raise InvalidRequest("role must be admin or user")
        values = {
            "name": name,
            "role": role,
            "key_hash": "",  # set below, once the id that the key embeds is known
            "key_version": 1,
            "disabled": False,
            "daily_tokens": _check_limit(daily_tokens, "daily tokens"),
            "rpm": _check_limit(rpm, "requests per minute"),
            "created_at": datetime.now(UTC),
        }
        with self.engine.begin() as conn:
            if conn.execute(sa.select(db.users.c.id).where(db.users.c.name == name)).first():
                raise InvalidRequest(f"A user named {name!r} already exists.")
            user_id = conn.execute(db.users.insert().values(**values)).inserted_primary_key[0]
            key = new_key(user_id)
            conn.execute(
                db.users.update().where(db.users.c.id == user_id).values(key_hash=hash_key(key))
            )
        user = self.get(name)
        assert user is not None
        return user, key

    def get(self, name: str, *, max_age: float = 0.0) -> User | None:
        """The user by name; with max_age, an answer read at most that many seconds ago will
        do (for lookups on every call; revocation checks always read afresh). "No such user"
        is such an answer too: on this process, adding the user replaces it at once."""
        if max_age and not isinstance(hit := self.recall(name, max_age), Unknown):
            return hit
        now = time.monotonic()
        found = self.credential(name)
        if found is None:
            self._keep(self._cache, name, (now, None))
        return found.user if found else None

    def recall(self, name: str, max_age: float) -> User | Unknown | None:
        """get(name, max_age=...) from memory alone: UNKNOWN when only the database can tell."""
        hit = self._cache.get(name)
        if hit is not None and time.monotonic() - hit[0] < max_age:
            return hit[1]
        return UNKNOWN

    def credential(self, name: str) -> Credential | None:
        """The user by name with their key's hash, read now (and remembered)."""
        now = time.monotonic()
        with db.reading(self.engine) as conn:
            row = conn.execute(_BY_NAME, {"name": name}).first()
        return self._remember(row, now)

    def list(self) -> list[User]:
        with db.reading(self.engine) as conn:
            rows = conn.execute(sa.select(db.users).order_by(db.users.c.name)).all()
        return [_user(r) for r in rows]

    def authenticate(self, name: str, key: str) -> User | None:
        """The enabled user with this name and key, else None (constant-time comparison)."""
        return verify(self.credential(name), key or "")

    def authenticate_key(self, key: str, *, max_age: float = 0.0) -> User | None:
        """The enabled user a bearer key belongs to, else None (no user name needed); with
        max_age, their hash read at most that many seconds ago will do."""
        return verify(self.key_credential(key, max_age=max_age), key or "")

    def recall_key(self, key: str, max_age: float) -> Credential | Unknown | None:
        """key_credential(key, max_age=...) from memory alone: UNKNOWN when only the
        database can tell (None at once for a key that is not one of ours)."""
        user_id = key_user_id(key or "")
        if user_id is None:
            return None
        hit = self._keys.get(user_id)
        if hit is not None and time.monotonic() - hit[0] < max_age:
            return hit[1]
        return UNKNOWN

    def key_credential(self, key: str, *, max_age: float = 0.0) -> Credential | None:
        """The user a key names (by its id, whether or not the key is right) with their key's
        hash; verify() checks the key against it."""
        if max_age and not isinstance(hit := self.recall_key(key, max_age), Unknown):
            return hit
        user_id = key_user_id(key or "")
        if user_id is None:
            return None
        now = time.monotonic()
        with db.reading(self.engine) as conn:
            row = conn.execute(_BY_ID, {"id": user_id}).first()
        return self._remember(row, now)

    def _remember(self, row: sa.Row | None, at: float) -> Credential | None:
        """A row just read as a Credential, kept for lookups by name and by key."""
        if row is None:
            return None
        found = Credential(_user(row), row.key_hash)
        self._keep(self._cache, found.user.name, (at, found.user))
        self._keep(self._keys, found.user.id, (at, found))
        return found

    def _keep(self, memory: dict, key: object, value: tuple[float, object]) -> None:
        """Keep a copy read at value[0], unless one read later is kept already: a read that
        began before a change (in another thread) must not undo the copy read after it."""
        with self._lock:
            kept = memory.get(key)
            if kept is not None and kept[0] > value[0]:
                return
            if len(memory) > self.MAX_KEPT:
                memory.clear()
            memory[key] = value

    def _forget(self, name: str) -> None:
        with self._lock:
            self._cache.pop(name, None)
            for user_id, (_, found) in list(self._keys.items()):
                if found.user.name == name:
                    del self._keys[user_id]

    def set_disabled(self, name: str, disabled: bool) -> User:
        """Disable (or enable) a user. Disabling also moves the key version on: every session
        signed in before it stays ended when the user is enabled again, used or not meanwhile
        (the key itself still works after enabling)."""
        if disabled:
            return self._update(name, disabled=True, key_version=db.users.c.key_version + 1)
        return self._update(name, disabled=False)

    def rotate(self, name: str) -> tuple[User, str]:
        """A new key for the user; the old one (and its sessions) stop working at once."""
        current = self.get(name)
        if current is None:
            raise InvalidRequest(f"No user named {name!r}.")
        key = new_key(current.id)
        self._update(name, key_hash=hash_key(key), key_version=db.users.c.key_version + 1)
        user = self.get(name)
        assert user is not None
        return user, key

    def set_limits(self, name: str, *, daily_tokens: int | None, rpm: int | None) -> User:
        return self._update(
            name,
            daily_tokens=_check_limit(daily_tokens, "daily tokens"),
            rpm=_check_limit(rpm, "requests per minute"),
        )

    def _update(self, name: str, **values: object) -> User:
        with self.engine.begin() as conn:
            done = conn.execute(db.users.update().where(db.users.c.name == name).values(**values))
        self._forget(name)
        if done.rowcount == 0:
            raise InvalidRequest(f"No user named {name!r}.")
        user = self.get(name)
        assert user is not None
        return user


def _user(row: sa.Row) -> User:
    return User(
        id=row.id,
        name=row.name,
        role=row.role,
        disabled=bool(row.disabled),
        daily_tokens=row.daily_tokens,
        rpm=row.rpm,
        key_version=row.key_version,
        created_at=row.created_at,
    )


def open_store() -> UserStore:
    """The store of the configured database (DATA_DIR / DATABASE_URL), migrated."""
    from core.config import load_settings

    settings = load_settings()
    engine = db.make_engine(db.database_url(settings.data_dir, settings.database_url))
    db.migrate(engine)
    return UserStore(engine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.users", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="create a user and print their key once")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may see all usage and manage users")
    add.add_argument(
        "--daily-tokens", type=int, help="tokens per day (default: DEFAULT_DAILY_TOKENS)"
    )
    add.add_argument("--rpm", type=int, help="requests per minute (default: DEFAULT_RPM)")
    sub.add_parser("list", help="list users (never keys)")
    for name, text in (("disable", "stop a user's key at once"), ("enable", "allow it again")):
        sub.add_parser(name, help=text).add_argument("name")
    sub.add_parser("rotate", help="replace a user's key; prints the new one once").add_argument(
        "name"
    )
    limits = sub.add_parser(
        "limits", help="set a user's limits (0: back to the defaults; a limit left out is kept)"
    )
    limits.add_argument("name")
    limits.add_argument("--daily-tokens", type=int)
    limits.add_argument("--rpm", type=int)
    args = parser.parse_args(argv)

    try:
        store = open_store()
        if args.command == "add":
            role: Role = "admin" if args.admin else "user"
            user, key = store.add(
                args.name, role=role, daily_tokens=args.daily_tokens, rpm=args.rpm
            )
            _print_key(user, key, "created")
        elif args.command == "list":
            print(
                f"{'name':<24} {'role':<6} {'status':<9} {'daily tokens':>12} {'rpm':>6}  created"
            )
            for u in store.list():
                status = "disabled" if u.disabled else "active"
                print(
                    f"{u.name:<24} {u.role:<6} {status:<9} {u.daily_tokens or 'default':>12} "
                    f"{u.rpm or 'default':>6}  {u.created_at:%Y-%m-%d}"
                )
        elif args.command in ("disable", "enable"):
            user = store.set_disabled(args.name, args.command == "disable")
            print(f"{user.name}: {'disabled' if user.disabled else 'enabled'}")
        elif args.command == "rotate":
            user, key = store.rotate(args.name)
            _print_key(user, key, "rotated; the old key no longer works")
        elif args.command == "limits":
            current = store.get(args.name)
            if current is None:
                raise InvalidRequest(f"No user named {args.name!r}.")
            user = store.set_limits(
                args.name,
                daily_tokens=current.daily_tokens
                if args.daily_tokens is None
                else args.daily_tokens,
                rpm=current.rpm if args.rpm is None else args.rpm,
            )
            print(
                f"{user.name}: daily tokens {user.daily_tokens or 'default'}, "
                f"rpm {user.rpm or 'default'}"
            )
    except (InvalidRequest, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except sa.exc.OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "unknown error"
        print(
            f"error: cannot open the database (DATA_DIR / DATABASE_URL): {reason}", file=sys.stderr
        )
        return 1
    return 0


def _print_key(user: User, key: str, what: str) -> None:
    print(f"{user.name} ({user.role}) {what}. Their key, shown only this once:\n\n    {key}\n")
    print("Sign in with that user name and key; scripts use the same pair.")


if __name__ == "__main__":
    raise SystemExit(main())
