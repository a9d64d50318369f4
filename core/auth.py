"""Access keys: constant-time checks, and a lockout after repeated failed logins."""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time
from collections import deque

from core.config import Settings

log = logging.getLogger("core.auth")
_UNSAFE = re.compile(r"[^A-Za-z0-9 ._@+\-]")


class AccessKeyAuth:
    """Gradio's auth hook: any username, the configured access key as the password."""

    def __init__(self, settings: Settings) -> None:
        assert settings.access_key is not None, "load_settings always sets an access key"
        self._key = settings.access_key.get_secret_value().encode()

    def __call__(self, username: str, password: str) -> bool:
        ok = hmac.compare_digest((password or "").encode(), self._key)
        log.info("login %s for user %r", "accepted" if ok else "refused", display_name(username))
        return ok


def display_name(username: str | None) -> str:
    """A username safe to show and log: printable, short, never empty."""
    cleaned = _UNSAFE.sub("", (username or "").strip())[:40]
    return cleaned or "user"


class LoginLimiter:
    """Counts failed logins per client; too many within the window locks that client out."""

    def __init__(self, *, max_failures: int, window: float) -> None:
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str, now: float | None = None) -> float:
        """Seconds until `client` may try again (0 when it is not locked out)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            attempts = self._recent(client, now)
            if len(attempts) < self.max_failures:
                return 0.0
            return max(0.0, attempts[-self.max_failures] + self.window - now)

    def failure(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._recent(client, now).append(now)
            if len(self._failures) > 10_000:
                self._prune(now)
        if self.retry_after(client, now):
            log.warning(
                "login locked for client %s after %d failed attempts; retry in %.0f s",
                client,
                self.max_failures,
                self.retry_after(client, now),
            )

    def success(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)

    def _recent(self, client: str, now: float) -> deque[float]:
        attempts = self._failures.setdefault(client, deque(maxlen=self.max_failures * 4))
        while attempts and attempts[0] <= now - self.window:
            attempts.popleft()
        return attempts

    def _prune(self, now: float) -> None:
        for client in [c for c, a in self._failures.items() if not a or a[-1] <= now - self.window]:
            del self._failures[client]
