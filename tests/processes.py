"""`python app.py` as its own process, for tests of what only a real process shows: signals,
kill -9, settings read at start, what it logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import ACCESS_KEY, free_port
from tests.upstream import FakeUpstream

ROOT = Path(__file__).resolve().parents[1]

# The app, with the ledger's heartbeat sped up (seconds between beats, and of silence before
# a process counts as dead), so that a test need not wait the default 30 s.
FAST_HEARTBEAT = (
    "import runpy, sys; import core.ledger as ledger; "
    "ledger.HEARTBEAT, ledger.STALE = float(sys.argv[1]), float(sys.argv[2]); "
    "sys.argv = ['app.py']; runpy.run_path('app.py', run_name='__main__')"
)


@dataclass
class App:
    """`python app.py` in its own process."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


@contextmanager
def launched(
    upstream: FakeUpstream, overrides: dict[str, str], log: Path, *, heartbeat: str = ""
) -> Iterator[App]:
    """The app on a free port of 127.0.0.1, once /health answers; killed if still running
    at the end. `heartbeat`: "BEAT STALE" in seconds, for a faster heartbeat."""
    port = free_port()
    env = {
        **os.environ,
        "ACCESS_KEY": ACCESS_KEY,
        "OPENAI_BASE_URL": upstream.url,
        "OPENAI_API_KEY": upstream.api_key,
        "PORT": str(port),
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "UPSTREAM_MAX_RETRIES": "0",
        "LOG_LEVEL": "INFO",
        **overrides,
    }
    command = [sys.executable, "app.py"]
    if heartbeat:
        command = [sys.executable, "-c", FAST_HEARTBEAT, *heartbeat.split()]
    with log.open("a") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out)
    app = App(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(app.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, "the app exited:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the app did not start"
            time.sleep(0.2)
        yield app
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
