"""A database outage (issue 15), made for real: PostgreSQL refuses every connection to the app's
database for a while. Calls that need it (a quota) get a 503 in OpenAI's shape with a request
id; calls that do not are answered; /health says degraded; and once the database is back, every
answered call has its ledger row. Needs TEST_DATABASE_URL (.ci/run provides PostgreSQL)."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import sqlalchemy as sa

from core import service as service_module
from core.auth import REVOKED_WITHIN
from tests.conftest import ACCESS_KEY, app_settings, serve
from tests.upstream import FakeUpstream

BODY = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def outage(upstream: FakeUpstream, tmp_path, monkeypatch) -> Iterator[tuple]:
    base = os.environ.get("TEST_DATABASE_URL")
    if not base:
        if os.environ.get("CI"):
            pytest.fail("needs TEST_DATABASE_URL (PostgreSQL); .ci/run provides it")
        pytest.skip("set TEST_DATABASE_URL to run on PostgreSQL")
    name = "dashboard_outage_" + secrets.token_hex(4)
    admin = sa.create_engine(
        base.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    url = urlunsplit(urlsplit(base)._replace(path=f"/{name}"))
    monkeypatch.setattr(service_module, "PING_TTL", 0.5)  # /health looks again quickly
    from ui.server import create_app

    app = create_app(app_settings(upstream, DATABASE_URL=url, DATA_DIR=str(tmp_path)))
    served = serve(app)

    def down() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
                ),
                {"n": name},
            )

    def up() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true"))

    try:
        yield served.url, app.state.core, down, up
    finally:
        up()
        served.stop()
        app.state.core.ledger.engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def test_an_outage_is_a_503_with_a_request_id_and_no_answered_call_is_lost(outage) -> None:
    url, core, down, up = outage
    _, key = core.users.add("quota-user", role="user", rpm=100)
    owner = {"Authorization": f"Bearer {ACCESS_KEY}"}
    assert httpx.post(url + "/v1/chat/completions", headers=owner, json=BODY).status_code == 200
    browser = httpx.Client(base_url=url, timeout=30)
    assert (
        browser.post("/login", data={"username": "quota-user", "password": key}).status_code == 200
    )
    down()
    try:
        limited = httpx.post(
            url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json=BODY,
            timeout=30,
        )
        assert limited.status_code == 503
        error = limited.json()["error"]
        assert "database" in error["message"] and limited.headers["x-request-id"]
        # A call that needs no database (the owner has no quota) is answered as usual.
        answered = [
            httpx.post(url + "/v1/chat/completions", headers=owner, json=BODY, timeout=30)
            for _ in range(5)
        ]
        assert all(a.status_code == 200 for a in answered)
        deadline = time.monotonic() + 15
        health = httpx.get(url + "/health").json()
        while health["status"] != "degraded" and time.monotonic() < deadline:
            time.sleep(0.3)
            health = httpx.get(url + "/health").json()
        assert health["status"] == "degraded" and health["database"] == "not answering"
        # The dashboard says why instead of failing (once its two-second copy of the user is
        # too old to trust); signing out still ends the session here and clears the cookie.
        time.sleep(REVOKED_WITHIN + 0.5)
        assert browser.get("/config").status_code == 503
        # A key whose copy is too old to trust cannot be checked: a 503 on /v1/models too.
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert models.status_code == 503 and models.headers["x-request-id"]
        assert models.headers["x-request-id"] in models.json()["error"]["message"]
        out = browser.post("/logout", headers={"origin": url})
        assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]
    finally:
        up()
    # Back: the rows that waited are written (the writer kept them and tried again).
    wanted = {a.headers["x-request-id"] for a in answered}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        written = set(core.ledger.rows(users=["owner"])["request_id"])
        if wanted <= written:
            break
        time.sleep(0.5)
    assert wanted <= written
