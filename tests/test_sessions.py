"""Signed sessions (issue 15): two app processes' worth of servers on one database and one
secret, as two replicas or one app before and after a restart. A session made by one is
accepted by the other; sign-out, a disabled user and a new owner key end it everywhere."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ACCESS_KEY, Served, app_settings, serve
from tests.upstream import FakeUpstream


@dataclass
class Replica:
    url: str
    app: object
    served: Served

    def http(self, cookies: httpx.Cookies | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, cookies=cookies, timeout=10)


def start(upstream: FakeUpstream, data: Path, **extra: str) -> Replica:
    from ui.server import create_app

    app = create_app(app_settings(upstream, DATA_DIR=str(data), **extra))
    served = serve(app)
    return Replica(served.url, app, served)


@pytest.fixture
def pair(upstream: FakeUpstream, tmp_path: Path) -> Iterator[tuple[Replica, Replica]]:
    first, second = start(upstream, tmp_path), start(upstream, tmp_path)
    yield first, second
    first.served.stop()
    second.served.stop()


def signed_in(http: httpx.Client) -> bool:
    answer = http.get("/config")
    return answer.status_code == 200 and "dependencies" in answer.json()


def login(replica: Replica, name: str, key: str = ACCESS_KEY) -> httpx.Client:
    http = replica.http()
    assert http.post("/login", data={"username": name, "password": key}).status_code == 200
    return http


def test_a_session_made_on_one_replica_works_on_the_other(pair) -> None:
    first, second = pair
    here = login(first, "ada")
    there = second.http(here.cookies)
    assert signed_in(there)
    assert there.post("/gradio_api/queue/join", json={}).status_code != 401


def test_a_restart_keeps_everyone_signed_in(upstream, tmp_path: Path) -> None:
    before = start(upstream, tmp_path)
    http = login(before, "bob")
    cookies = http.cookies
    before.served.stop()
    after = start(upstream, tmp_path)  # same DATA_DIR: the same secret file, the same database
    try:
        assert signed_in(after.http(cookies))
    finally:
        after.served.stop()


def test_sign_out_on_one_replica_ends_the_session_on_the_other(pair) -> None:
    first, second = pair
    here = login(first, "cleo")
    there = second.http(here.cookies)
    assert signed_in(there)
    assert here.post("/logout", headers={"origin": first.url}).status_code == 303
    deadline = time.monotonic() + 5  # the other reads signed-out sessions every few seconds
    while signed_in(there) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not signed_in(there)


def test_a_disabled_user_is_signed_out_everywhere_at_once(pair) -> None:
    first, second = pair
    core = first.app.state.core
    key = core.users.add("dora", role="user")[1]
    here = login(first, "dora", key)
    there = second.http(here.cookies)
    assert signed_in(there)
    core.users.set_disabled("dora", True)
    time.sleep(2.5)  # key versions are read again after at most two seconds
    assert not signed_in(there) and not signed_in(here)


def test_a_forged_or_altered_token_is_refused(pair) -> None:
    first, _ = pair
    http = login(first, "eve")
    name, token = next(iter(http.cookies.items()))
    head, body, signature = token.split(".")
    forged = first.http(httpx.Cookies({name: f"{head}.{body}.{signature[::-1]}"}))
    assert not signed_in(forged)
    unsigned = first.http(httpx.Cookies({name: f"{head}.{body}."}))
    assert not signed_in(unsigned)


def test_a_new_owner_key_ends_the_old_keys_sessions(upstream, tmp_path: Path) -> None:
    before = start(upstream, tmp_path)
    cookies = login(before, "fay").cookies
    before.served.stop()
    after = start(upstream, tmp_path, ACCESS_KEY="a-brand-new-owner-key-42")
    try:
        assert not signed_in(after.http(cookies))
    finally:
        after.served.stop()


def test_the_cookie_is_renewed_while_in_use_and_the_new_one_works(pair) -> None:
    first, second = pair
    sessions = first.app.state.sessions
    every = sessions.refresh_every
    sessions.refresh_every = 0.0
    try:
        http = login(first, "gus")
        old = dict(http.cookies)
        answer = http.get("/config")
        assert "set-cookie" in answer.headers
        assert dict(http.cookies) != old  # the client took the new one
        assert signed_in(second.http(http.cookies))
    finally:
        sessions.refresh_every = every


def test_failed_sign_ins_on_one_replica_lock_the_address_out_on_the_other(pair) -> None:
    first, second = pair
    limit = first.app.state.core.settings.login_max_failures
    ip = {"x-forwarded-for": "10.77.0.1"}  # tests' apps do not trust proxies: all one address
    for _ in range(limit):
        answer = first.http().post(
            "/login", data={"username": "mallory", "password": "wrong-guess"}, headers=ip
        )
        assert answer.status_code in (400, 401)
    deadline = time.monotonic() + 6  # shared in the background, every couple of seconds
    status = 0
    while time.monotonic() < deadline:
        # The owner key itself: refused only because of the first replica's failures (it
        # counts as no failure here, and a locked-out address may not try the owner key).
        status = (
            second.http()
            .post("/login", data={"username": "mallory", "password": ACCESS_KEY})
            .status_code
        )
        if status == 429:
            break
        time.sleep(0.5)
    assert status == 429


def test_a_users_sessions_stay_ended_after_disable_and_enable_even_unused(pair) -> None:
    """Disabling ends every session signed in before, whether or not one was used while the
    user was disabled: enabling the user again does not bring them back."""
    first, second = pair
    core = first.app.state.core
    key = core.users.add("hal", role="user")[1]
    there = second.http(login(first, "hal", key).cookies)
    assert signed_in(there)
    core.users.set_disabled("hal", True)
    core.users.set_disabled("hal", False)  # no request in between
    time.sleep(2.5)  # the other replica reads key versions again within two seconds
    assert not signed_in(there)
    assert signed_in(second.http(login(second, "hal", key).cookies))  # the key still works


def test_a_session_secret_file_too_short_stops_the_start(tmp_path: Path) -> None:
    from core.errors import ConfigError
    from core.session_store import SECRET_FILE, session_secret

    made = session_secret(None, tmp_path, shared_database=False)
    assert len(made) >= 32 and oct((tmp_path / SECRET_FILE).stat().st_mode)[-3:] == "600"
    assert session_secret(None, tmp_path, shared_database=False) == made  # kept
    (tmp_path / SECRET_FILE).write_text("abc")
    with pytest.raises(ConfigError, match="shorter than 32"):
        session_secret(None, tmp_path, shared_database=False)
