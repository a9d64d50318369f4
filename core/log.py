"""Logging set-up: one format, and a filter that scrubs every configured secret."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TextIO

REDACTED = "[redacted]"


class RedactSecrets(logging.Filter):
    """Replace any configured secret in a log record's final text, wherever it came from."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def configure_logging(level: str, secrets: Iterable[str], stream: TextIO | None = None) -> None:
    """Log to stderr at LOG_LEVEL, scrubbing secrets from this app's and libraries' records."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # The SDK and httpx log request lines at INFO; keep them at WARNING unless debugging.
    for noisy in ("httpx", "httpx2", "openai", "httpcore", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
