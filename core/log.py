"""Logging set-up: one format, and a filter that scrubs secrets: configured ones and any key."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from typing import TextIO

REDACTED = "[redacted]"
# Anything shaped like a credential, known to us or not, in one pass of one regex: the log
# filter runs it on every record. A key typed into the wrong field is still a key. Every
# branch starts with a literal, which keeps the scan fast (sk-'s word boundary is checked
# behind it: "task-..." is no key).
_SHAPES = re.compile(
    "|".join(
        (
            r"dk_\d+_[A-Za-z0-9_-]{16,}",  # our users' keys (core.users.new_key)
            r"sk-(?<=\bsk-)[A-Za-z0-9_-]{20,}",  # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-)
            r"hf_[A-Za-z0-9]{30,}",  # Hugging Face
            r"(?P<auth>(?:[Bb]earer|Basic) )[A-Za-z0-9._~+/=-]{8,}",  # any Authorization value
            r"(?P<url>://)[^\s/?#\"'<>,]+(?=@)",  # user:password@ in a URL (up to the last @)
        )
    )
)


def _replace(match: re.Match[str]) -> str:
    return (match["auth"] or match["url"] or "") + REDACTED


# The literal each branch of _SHAPES starts with ("earer " for Bearer and bearer, "asic " for
# Basic): a text with none of them has nothing the regex could match, and most log lines
# (the access line of every call) have none. Looking for six substrings costs a fraction of
# the scan.
_MARKERS = ("dk_", "sk-", "hf_", "earer ", "asic ", "://")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without the given secrets and without anything shaped like a key or password."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    if not any(marker in text for marker in _MARKERS):
        return text
    return _SHAPES.sub(_replace, text)


class RedactSecrets(logging.Filter):
    """Redact secrets in a log record's final text, and its traceback, wherever it came from."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def scrub(self, text: str) -> str:
        return redact(text, self.secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        # Formatted once: the formatter's getMessage() then has nothing left to do.
        record.msg, record.args = self.scrub(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            # An exception's message may quote a request: format it here, where it can be
            # scrubbed (the formatter reuses exc_text as it is).
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        return True


class Formatter(logging.Formatter):
    """The one format, with the time formatted once a second rather than for every record
    (the access line is written for every call)."""

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        cached_second, cached = self._second  # read once: another thread may replace it
        if cached_second == second:
            stamp = cached
        else:
            stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (second, stamp)
        return self.default_msec_format % (stamp, record.msecs)


def configure_logging(
    level: str, secrets: Iterable[str], stream: TextIO | None = None, *, access: bool = True
) -> None:
    """Log to stderr at LOG_LEVEL, scrubbing secrets from this app's and libraries' records."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # The format names no source line, thread or process: do not look them up for every
    # record (the logging HOWTO's "Optimization" section names these switches).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # The SDK and httpx log request lines at INFO; keep them at WARNING unless debugging.
    # One line per call (core.service), unless the operator wants none.
    logging.getLogger("access").setLevel(logging.NOTSET if access else logging.WARNING)
    for noisy in ("httpx", "httpx2", "openai", "httpcore", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
