"""Several replicas behind HAProxy on one PostgreSQL (issue 15), started by deploy/run.sh as an
operator would: real processes, the real load balancer, through its one address.

Needs haproxy and a PostgreSQL server (TEST_DATABASE_URL); .ci/run provides both."""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import sqlalchemy as sa

from core import db
from core.users import UserStore
from tests.conftest import ACCESS_KEY, free_port
from tests.upstream import FakeUpstream

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "deploy" / "run.sh"
SECRET = "a-test-session-secret-shared-by-every-replica-0123456789"


def _needs() -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    missing = [] if url else ["a PostgreSQL server (TEST_DATABASE_URL)"]
    if subprocess.run(["sh", "-c", "command -v haproxy"], capture_output=True).returncode:
        missing.append("haproxy (apt-get install haproxy)")
    if missing:
        message = f"needs {' and '.join(missing)}; .ci/run provides them"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    assert url
    return url


@dataclass
class Cluster:
    url: str
    env: dict[str, str]
    database: str
    users: UserStore

    def run(self, *args: str) -> None:
        subprocess.run([str(RUN), *args], env=self.env, check=True, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def cluster(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = _needs()
    # A database of its own, made and dropped here.
    name = "dashboard_deploy_" + secrets.token_hex(4)
    driver = base.replace("postgresql://", "postgresql+psycopg://")
    admin = sa.create_engine(driver, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    parts = urlsplit(base)
    database = urlunsplit(parts._replace(path=f"/{name}"))
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database,
        "SESSION_SECRET": SECRET,
        "ACCESS_KEY": ACCESS_KEY,
        "OPENAI_BASE_URL": upstream.url,
        "OPENAI_API_KEY": upstream.api_key,
        "CHAT_MODEL": "gpt-4.1-mini",
        "UPSTREAM_MAX_RETRIES": "0",
        "RUN_DIR": str(tmp_path_factory.mktemp("deploy")),
        "LB_PORT": str(port),
        "FIRST_PORT": str(_two_free_ports()),
        "PYTHON": str(ROOT / ".venv" / "bin" / "python"),
        "LOG_LEVEL": "INFO",
    }
    users = UserStore(db.make_engine(database))
    running = Cluster(f"http://127.0.0.1:{port}", env, database, users)
    try:
        running.run("start", "2")
        yield running
    finally:
        subprocess.run([str(RUN), "stop"], env=env, cwd=ROOT, timeout=60)
        running.users.engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def _two_free_ports() -> int:
    """A free port whose neighbour is free too (the replicas take consecutive ports)."""
    while True:
        first = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", first + 1))
            except OSError:
                continue
        return first


def login(cluster: Cluster, name: str = "ops") -> httpx.Client:
    http = httpx.Client(base_url=cluster.url, timeout=30)
    answer = http.post("/login", data={"username": name, "password": ACCESS_KEY})
    assert answer.status_code == 200, answer.text
    return http


def signed_in(http: httpx.Client) -> bool:
    answer = http.get("/config")
    return answer.status_code == 200 and "dependencies" in answer.json()


def on_replica(http: httpx.Client, replica: str) -> httpx.Client:
    """The same browser, sent by the load balancer's own cookie to `replica`."""
    cookies = httpx.Cookies(http.cookies)
    cookies.set("DASHBOARD_REPLICA", replica)
    return httpx.Client(base_url=http.base_url, cookies=cookies, timeout=30)


def test_a_browser_stays_on_one_replica_and_its_session_works_on_both(cluster: Cluster) -> None:
    http = login(cluster)
    replica = http.cookies.get("DASHBOARD_REPLICA")
    assert replica in ("replica1", "replica2")  # the balancer keeps this browser on one
    other = "replica2" if replica == "replica1" else "replica1"
    assert signed_in(on_replica(http, replica)) and signed_in(on_replica(http, other))


def test_a_restarted_replica_keeps_the_session(cluster: Cluster) -> None:
    http = on_replica(login(cluster, "restart-me"), "replica1")
    assert signed_in(http)
    before = http.get("/health").json()["process"]
    cluster.run("replica", "1")  # stopped and started again
    time.sleep(3)  # HAProxy's next health check (every 2 s) sends its browsers back to it
    assert signed_in(http)
    # ...and it was the restarted process that took the session.
    assert http.get("/health").json()["process"] not in (before, None)


def test_concurrent_calls_across_replicas_never_overshoot_a_quota(cluster: Cluster) -> None:
    name = "quota-" + secrets.token_hex(3)
    _, key = cluster.users.add(name, role="user", rpm=10)

    def call(_: int) -> int:
        return httpx.post(
            cluster.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=40) as pool:
        statuses = list(pool.map(call, range(40)))
    answered = statuses.count(200)
    assert answered == 10 and statuses.count(429) == 30, statuses
    time.sleep(1.5)  # each replica writes its outcomes in the background
    with cluster.users.engine.connect() as conn:
        rows = conn.execute(
            sa.select(db.usage.c.status, db.usage.c.request_id).where(db.usage.c.user == name)
        ).all()
    ok = [r for r in rows if r.status == "ok"]
    assert len(ok) == answered  # exactly one row for each answered call
    assert len({r.request_id for r in ok}) == answered


def test_streams_come_through_the_balancer_chunk_by_chunk(cluster: Cluster) -> None:
    body = {"model": "drip-0.2", "stream": True,
            "messages": [{"role": "user", "content": "one two three four five"}]}  # fmt: skip
    arrivals = []
    with httpx.stream(
        "POST",
        cluster.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {ACCESS_KEY}"},
        json=body,
        timeout=60,
    ) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) >= 5
    # Not held back and sent at once: the chunks arrive spread over the generation.
    assert arrivals[-1] - arrivals[0] > 0.5


def test_a_forged_forwarded_address_does_not_escape_the_lockout(cluster: Cluster) -> None:
    """HAProxy writes the client's address itself: a made-up X-Forwarded-For is dropped, so
    each guess counts against the real address (the test's), wherever it lands."""
    http = httpx.Client(base_url=cluster.url, timeout=30)
    statuses = [
        http.post(
            "/login",
            data={"username": "guesser", "password": f"wrong-{i}"},
            headers={"X-Forwarded-For": f"10.9.9.{i}"},
        ).status_code
        for i in range(12)
    ]
    assert 429 in statuses, statuses
