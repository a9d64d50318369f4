"""No answered call goes unrecorded when the process is stopped (issue 15): `python app.py` as a
real process, stopped with SIGTERM (what Docker and Railway send) while its ledger writer waits
on the database. Every call the clients got an answer for must have its row afterwards."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import ACCESS_KEY, free_port
from tests.upstream import FakeUpstream

ROOT = Path(__file__).resolve().parents[1]


def test_sigterm_while_the_ledger_waits_on_the_database_loses_no_row(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "ACCESS_KEY": ACCESS_KEY,
        "OPENAI_BASE_URL": upstream.url,
        "OPENAI_API_KEY": upstream.api_key,
        "DATA_DIR": str(tmp_path),
        "PORT": str(port),
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "UPSTREAM_MAX_RETRIES": "0",
    }
    log = (tmp_path / "app.log").open("w")
    app = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and app.poll() is None, "the app did not start"
            time.sleep(0.2)
        # Another process holds the database's write lock: the ledger writer has to wait.
        holder = sqlite3.connect(tmp_path / "dashboard.db", timeout=5, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        body = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]}
        auth = {"Authorization": f"Bearer {ACCESS_KEY}"}
        answered = [
            httpx.post(url + "/v1/chat/completions", headers=auth, json=body, timeout=30)
            for _ in range(20)
        ]
        assert all(a.status_code == 200 for a in answered)
        app.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        holder.execute("ROLLBACK")  # the database is free again while the app shuts down
        holder.close()
        app.wait(timeout=60)
    finally:
        if app.poll() is None:
            app.kill()
        log.close()
    with sqlite3.connect(tmp_path / "dashboard.db") as conn:
        ids = {row[0] for row in conn.execute("SELECT request_id FROM usage WHERE status = 'ok'")}
    assert ids >= {a.headers["x-request-id"] for a in answered}  # every answered call, recorded
    assert "ledger written before shutdown" in (tmp_path / "app.log").read_text()
