"""Users with their own keys: the CLI, salted hashes, logins, roles, and revocation at once.

The app tests share one app on a database of their own (SQLite in a temp DATA_DIR); users are
managed with core.users.UserStore on that database, or with the CLI as a subprocess.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from gradio_client import Client
from gradio_client.exceptions import AppError

from core import db
from core.auth import REVOKED_WITHIN
from core.context import Core
from core.users import UserStore, hash_key, key_matches
from tests.conftest import ACCESS_KEY, Served, app_settings, logged, serve
from tests.upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
KEY = re.compile(r"dk_[A-Za-z0-9_\-]{40,}")
HELLO = [{"role": "user", "content": "hello there"}]
REVOKED = "disabled or replaced"


# ---- the CLI ----------------------------------------------------------------------------------


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m core.users ...` on DATA_DIR, from a folder with no .env and no keys around."""
    assert not (data_dir / ".env").exists()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(data_dir),
        "PYTHONPATH": str(ROOT),
        "DATA_DIR": str(data_dir),
    }
    return subprocess.run(
        [sys.executable, "-m", "core.users", *args],
        cwd=data_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def printed_key(result: subprocess.CompletedProcess[str]) -> str:
    """The one key a successful add or rotate printed (exactly once)."""
    assert result.returncode == 0, result.stderr
    keys = KEY.findall(result.stdout)
    assert len(keys) == 1, result.stdout
    assert "shown only this once" in result.stdout
    assert not KEY.search(result.stderr)
    return keys[0]


def store_of(data_dir: Path) -> UserStore:
    return UserStore(db.make_engine(db.database_url(data_dir, None)))


def user_rows(engine: sa.Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return {r.name: dict(r._mapping) for r in conn.execute(sa.select(db.users))}


def test_cli_add_prints_the_key_once_and_stores_only_a_salted_hash(tmp_path: Path) -> None:
    alice = printed_key(cli(tmp_path, "add", "alice"))
    added = cli(tmp_path, "add", "bob", "--admin", "--daily-tokens", "5000", "--rpm", "7")
    bob = printed_key(added)
    assert "bob (admin) created" in added.stdout
    assert alice != bob

    store = store_of(tmp_path)
    rows = user_rows(store.engine)
    assert set(rows) == {"alice", "bob"}
    assert (rows["bob"]["role"], rows["bob"]["daily_tokens"], rows["bob"]["rpm"]) == (
        "admin",
        5000,
        7,
    )
    assert (rows["alice"]["role"], rows["alice"]["daily_tokens"], rows["alice"]["rpm"]) == (
        "user",
        None,
        None,
    )
    salts = set()
    for name, key in (("alice", alice), ("bob", bob)):
        stored = rows[name]["key_hash"]
        scheme, salt, digest = stored.split("$")
        assert scheme == "sha256" and len(salt) >= 16
        salts.add(salt)
        # Nothing of the key is stored: not the key, not a piece of it, not its plain SHA-256.
        everything = " ".join(str(v) for v in rows[name].values())
        assert key not in everything and key[3:15] not in everything and key[-12:] not in everything
        assert hashlib.sha256(key.encode()).hexdigest() != digest
        assert key_matches(key, stored)
    assert len(salts) == 2  # every hash has its own salt
    # The same key hashed twice gives two different hashes, both of which check.
    again = hash_key(alice)
    assert again != rows["alice"]["key_hash"] and key_matches(alice, again)
    # Each key opens only its own user.
    assert store.authenticate("alice", alice).name == "alice"
    assert store.authenticate("bob", bob).is_admin
    assert store.authenticate("alice", bob) is None
    assert store.authenticate("bob", alice) is None
    store.engine.dispose()


def test_cli_list_shows_users_but_never_keys_or_hashes(tmp_path: Path) -> None:
    keys = [
        printed_key(cli(tmp_path, "add", "carol", "--rpm", "12")),
        printed_key(cli(tmp_path, "add", "dave@example.com", "--admin")),
    ]
    listed = cli(tmp_path, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "role", "status"]
    carol = next(line for line in lines if line.startswith("carol"))
    assert carol.split()[1:5] == ["user", "active", "default", "12"]
    dave = next(line for line in lines if line.startswith("dave@example.com"))
    assert dave.split()[1:5] == ["admin", "active", "default", "default"]
    hashes = [row["key_hash"] for row in user_rows(store_of(tmp_path).engine).values()]
    output = listed.stdout + listed.stderr
    assert "dk_" not in output and "sha256" not in output
    for secret in keys + hashes + [h.split("$")[1] for h in hashes]:
        assert secret not in output


def test_cli_disable_enable_rotate_and_limits(tmp_path: Path) -> None:
    old = printed_key(cli(tmp_path, "add", "erin", "--daily-tokens", "900"))
    store = store_of(tmp_path)

    disabled = cli(tmp_path, "disable", "erin")
    assert (disabled.returncode, disabled.stdout.strip()) == (0, "erin: disabled")
    assert store.authenticate("erin", old) is None
    assert "disabled" in cli(tmp_path, "list").stdout
    enabled = cli(tmp_path, "enable", "erin")
    assert (enabled.returncode, enabled.stdout.strip()) == (0, "erin: enabled")
    assert store.authenticate("erin", old) is not None

    rotated = cli(tmp_path, "rotate", "erin")
    new = printed_key(rotated)
    assert new != old and old not in rotated.stdout
    assert "old key no longer works" in rotated.stdout
    assert store.authenticate("erin", old) is None
    # Moved on twice: by the disable (its sessions stay ended) and by the rotation.
    assert store.authenticate("erin", new).key_version == 3

    limited = cli(tmp_path, "limits", "erin", "--rpm", "3", "--daily-tokens", "500")
    assert (limited.returncode, limited.stdout.strip()) == (0, "erin: daily tokens 500, rpm 3")
    assert (store.get("erin").daily_tokens, store.get("erin").rpm) == (500, 3)
    # A limit left out is kept; 0 goes back to the default.
    kept = cli(tmp_path, "limits", "erin", "--rpm", "5")
    assert kept.stdout.strip() == "erin: daily tokens 500, rpm 5"
    reset = cli(tmp_path, "limits", "erin", "--rpm", "0", "--daily-tokens", "0")
    assert reset.stdout.strip() == "erin: daily tokens default, rpm default"
    assert (store.get("erin").daily_tokens, store.get("erin").rpm) == (None, None)
    store.engine.dispose()


CLI_ERRORS = [
    (["add", "frank"], "A user named 'frank' already exists."),
    (["add", "has space"], "A user name is 1 to 64 letters"),
    (["add", "a/b"], "A user name is 1 to 64 letters"),
    (["add", "émile"], "A user name is 1 to 64 letters"),
    (["add", "x" * 65], "A user name is 1 to 64 letters"),
    (["add", "gus", "--rpm", "-1"], "requests per minute must be between 0 and 10^12"),
    (["add", "gus", "--daily-tokens", str(10**13)], "daily tokens must be between"),
    (["disable", "nobody"], "No user named 'nobody'."),
    (["rotate", "nobody"], "No user named 'nobody'."),
    (["limits", "nobody", "--rpm", "3"], "No user named 'nobody'."),
]


def test_cli_errors_exit_1_with_a_clear_message(tmp_path: Path) -> None:
    key = printed_key(cli(tmp_path, "add", "frank"))
    for args, message in CLI_ERRORS:
        result = cli(tmp_path, *args)
        assert result.returncode == 1, args
        assert result.stderr.startswith("error: ") and message in result.stderr, args
        assert "Traceback" not in result.stderr
        assert not KEY.search(result.stdout + result.stderr), args
    # Nothing changed: frank's key still works, nobody else was created.
    store = store_of(tmp_path)
    assert [u.name for u in store.list()] == ["frank"]
    assert store.authenticate("frank", key) is not None
    store.engine.dispose()


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in ([], ["add"], ["frobnicate", "x"], ["add", "x", "--rpm", "many"]):
        result = cli(tmp_path, *args)
        assert result.returncode == 2, args
        assert "usage: python -m core.users" in result.stderr


# ---- the app: logins and roles ----------------------------------------------------------------


@dataclass
class Team:
    """The module's app, its core, and every key handed out (to check none of them leaks)."""

    url: str
    core: Core
    data_dir: Path
    issued: list[str] = field(default_factory=list)

    def add(self, name: str, **options: Any) -> str:
        _, key = self.core.users.add(name, **options)
        self.issued.append(key)
        return key

    def rotate(self, name: str) -> str:
        _, key = self.core.users.rotate(name)
        self.issued.append(key)
        return key

    def login(self, name: str, key: str) -> Client:
        return Client(self.url, auth=(name, key), verbose=False, analytics_enabled=False)

    def browser(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


@pytest.fixture(scope="module")
def team(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    from ui.server import create_app

    data_dir = tmp_path_factory.mktemp("team-data")
    # Many deliberate wrong logins here: keep the lockout out of the way.
    settings = app_settings(upstream, DATA_DIR=str(data_dir), LOGIN_MAX_FAILURES="1000")
    app = create_app(settings)
    served = serve(app)
    try:
        yield Team(served.url, app.state.core, data_dir)
    finally:
        stop_now(served)
        app.state.core.ledger.engine.dispose()


def stop_now(served: Served) -> None:
    """Stop without waiting for clients' idle heartbeat streams."""
    served.server.should_exit = served.server.force_exit = True
    served.thread.join(timeout=10)


ARGS = {"usage": ["", "", "", ""], "users": [], "chat": [HELLO, "", 0.7, 0, []]}


def call(http: httpx.Client, api_name: str) -> httpx.Response:
    """A raw Gradio API call (POST, then read the event stream), as a browser script would."""
    job = http.post(f"/gradio_api/call/{api_name}", json={"data": ARGS[api_name]})
    if job.status_code != 200:
        return job
    return http.get(f"/gradio_api/call/{api_name}/{job.json()['event_id']}")


def completed(response: httpx.Response) -> bool:
    return response.status_code == 200 and "event: complete" in response.text


def form_login(http: httpx.Client, name: str, key: str) -> httpx.Response:
    return http.post("/login", data={"username": name, "password": key})


def test_a_users_own_key_signs_in_through_gradio_client(team: Team) -> None:
    key = team.add("dana", rpm=100)
    dana = team.login("dana", key)
    for _ in range(2):
        assert dana.predict(messages=HELLO, api_name="/chat") == "Echo: hello there"
    mine = dana.predict(api_name="/usage")
    assert mine["totals"]["requests"] == 2
    assert [row["user"] for row in mine["by_user"]] == ["dana"]


def test_a_users_own_key_signs_in_through_the_browser_form(team: Team) -> None:
    key = team.add("dana-browser")
    with team.browser() as http:
        assert call(http, "usage").status_code == 401  # not before signing in
        login = form_login(http, "dana-browser", key)
        assert login.status_code == 200 and login.json() == {"success": True}
        assert any(c.startswith("access-token") for c in http.cookies)
        answer = call(http, "chat")
        assert completed(answer) and "Echo: hello there" in answer.text
    [row] = team.core.ledger.rows(users=["dana-browser"]).to_dict("records")
    assert (row["status"], row["source"]) == ("ok", "api")


@pytest.mark.parametrize("case", ["wrong key", "other user's key", "hash as key", "owner name"])
def test_a_wrong_key_or_name_is_refused(team: Team, case: str) -> None:
    name = "ivy-" + re.sub(r"[^a-z]+", "-", case)
    key = team.add(name)
    other = team.add(f"{name}-other")
    stored = user_rows(team.core.users.engine)[name]["key_hash"]
    attempt = {
        "wrong key": (name, key[:-1] + ("A" if key[-1] != "A" else "B")),
        "other user's key": (name, other),
        "hash as key": (name, stored),
        "owner name": ("not-a-user", key),  # a user's key does not open another name
    }[case]
    with pytest.raises(ValueError, match="Could not login"):
        team.login(*attempt)
    with team.browser() as http:
        refused = form_login(http, *attempt)
        assert refused.status_code == 400
        assert not any(c.startswith("access-token") for c in http.cookies)
        assert call(http, "usage").status_code == 401
    assert team.login(name, key).predict(api_name="/usage")["totals"]["requests"] == 0


def test_the_owner_key_works_with_any_name_and_is_admin(team: Team) -> None:
    team.add("jack")
    for name in ("owner", "someone-new"):
        owner = team.login(name, ACCESS_KEY)
        names = {u["name"] for u in owner.predict(api_name="/users")}
        assert "jack" in names
        owner.predict(user="jack", api_name="/usage")  # an admin may look at anyone
    with team.browser() as http:
        assert form_login(http, "whoever", ACCESS_KEY).status_code == 200
        assert '"jack"' in call(http, "users").text


def test_a_user_is_refused_admin_endpoints_and_others_usage(team: Team) -> None:
    kate = team.login("kate", team.add("kate", rpm=100))
    team.add("leo")
    kate.predict(messages=HELLO, api_name="/chat")
    with pytest.raises(AppError, match="Only admins"):
        kate.predict(api_name="/users")
    with pytest.raises(AppError, match="only your own usage"):
        kate.predict(user="leo", api_name="/usage")
    # Her own usage, asked for with or without her name, has only her rows.
    for mine in (kate.predict(api_name="/usage"), kate.predict(user="kate", api_name="/usage")):
        assert [row["user"] for row in mine["by_user"]] == ["kate"]
        assert mine["totals"]["requests"] == len(team.core.ledger.rows(users=["kate"]))
    with team.browser() as http:
        form_login(http, "kate", team.rotate("kate"))
        refused = call(http, "users")
        assert "Only admins" in refused.text


def test_an_admin_user_lists_users_without_keys_or_hashes(team: Team) -> None:
    mia = team.login("mia", team.add("mia", role="admin"))
    team.add("ned", daily_tokens=1234, rpm=5)
    listed = mia.predict(api_name="/users")
    by_name = {u["name"]: u for u in listed}
    assert by_name["mia"]["role"] == "admin"
    assert by_name["ned"] | {"created": ""} == {
        "name": "ned",
        "role": "user",
        "disabled": False,
        "daily_tokens": 1234,
        "rpm": 5,
        "created": "",
    }
    text = repr(listed)
    assert "dk_" not in text and "sha256" not in text
    for row in user_rows(team.core.users.engine).values():
        assert row["key_hash"] not in text and row["key_hash"].split("$")[2] not in text
    # An admin may see anyone's usage.
    assert mia.predict(user="ned", api_name="/usage")["totals"]["requests"] == 0


def test_a_long_user_name_is_still_that_user(team: Team) -> None:
    """Names are up to 64 characters; a long one must not turn into someone else (or an admin)."""
    name = "n" + "o" * 62 + "a"
    assert len(name) == 64
    client = team.login(name, team.add(name, rpm=100))
    with pytest.raises(AppError, match="Only admins"):
        client.predict(api_name="/users")
    client.predict(messages=HELLO, api_name="/chat")
    assert [row["user"] for row in client.predict(api_name="/usage")["by_user"]] == [name]


# ---- revocation takes effect at once ----------------------------------------------------------


def test_disabling_ends_a_logged_in_gradio_client_at_once(team: Team) -> None:
    key = team.add("olga")
    olga = team.login("olga", key)
    assert olga.predict(messages=HELLO, api_name="/chat") == "Echo: hello there"
    team.core.users.set_disabled("olga", True)
    with pytest.raises(httpx.HTTPStatusError) as ended:
        olga.predict(messages=HELLO, api_name="/chat")
    assert ended.value.response.status_code == 401
    assert REVOKED in ended.value.response.json()["detail"]
    with pytest.raises(ValueError, match="Could not login"):
        team.login("olga", key)
    # Enabled again, the key signs in anew; the old session stays ended.
    team.core.users.set_disabled("olga", False)
    assert team.login("olga", key).predict(api_name="/usage")["totals"]["requests"] == 1
    with pytest.raises(httpx.HTTPStatusError, match="401 Unauthorized"):
        olga.predict(api_name="/usage")
    statuses = [r["status"] for r in team.core.ledger.rows(users=["olga"]).to_dict("records")]
    assert statuses == ["ok"]  # the refused session never reached the service


def test_rotating_ends_a_logged_in_gradio_client_at_once(team: Team) -> None:
    old = team.add("pia")
    pia = team.login("pia", old)
    pia.predict(api_name="/usage")
    new = team.rotate("pia")
    with pytest.raises(httpx.HTTPStatusError) as ended:
        pia.predict(api_name="/usage")
    assert ended.value.response.status_code == 401
    assert REVOKED in ended.value.response.json()["detail"]
    with pytest.raises(ValueError, match="Could not login"):
        team.login("pia", old)
    assert team.login("pia", new).predict(api_name="/usage")["totals"]["requests"] == 0


@pytest.mark.parametrize("how", ["disable", "rotate"])
def test_a_browser_session_gets_401_on_its_next_request(team: Team, how: str) -> None:
    name = f"quinn-{how}"
    key = team.add(name)
    with team.browser() as http:
        assert form_login(http, name, key).status_code == 200
        assert completed(call(http, "usage"))
        if how == "disable":
            team.core.users.set_disabled(name, True)
        else:
            team.rotate(name)
        ended = call(http, "usage")
        assert ended.status_code == 401
        assert REVOKED in ended.json()["detail"]
        # And it stays ended, on every route.
        assert http.get("/config").status_code == 401
        assert call(http, "usage").status_code == 401


@pytest.mark.parametrize(
    "decoy",
    [
        "access-token-decoy=nothing",  # another cookie with the session prefix, first
        'junk="unterminated',  # a cookie Python's SimpleCookie gives up on (Starlette does not)
        "junk=a\\b",
        "x y=1",
    ],
)
def test_a_revoked_session_cannot_hide_behind_another_cookie(team: Team, decoy: str) -> None:
    name = "rita-" + hashlib.sha256(decoy.encode()).hexdigest()[:8]
    key = team.add(name)
    with team.browser() as http:
        assert form_login(http, name, key).status_code == 200
        cookies = "; ".join(f"{k}={v}" for k, v in http.cookies.items())
    header = {"cookie": f"{decoy}; {cookies}"}
    with httpx.Client(base_url=team.url, headers=header, timeout=30) as http:
        assert completed(call(http, "usage"))  # the crafted header is accepted
        team.core.users.set_disabled(name, True)
        assert call(http, "usage").status_code == 401


def test_the_cli_on_the_apps_database_drives_the_live_app(team: Team) -> None:
    key = printed_key(cli(team.data_dir, "add", "sam", "--rpm", "50"))
    team.issued.append(key)
    sam = team.login("sam", key)
    sam.predict(messages=HELLO, api_name="/chat")
    assert cli(team.data_dir, "disable", "sam").returncode == 0
    # Another process changed the database: the app sees it within REVOKED_WITHIN seconds.
    time.sleep(REVOKED_WITHIN + 0.5)
    with pytest.raises(httpx.HTTPStatusError, match="401 Unauthorized"):
        sam.predict(api_name="/usage")
    assert cli(team.data_dir, "enable", "sam").returncode == 0
    new = printed_key(cli(team.data_dir, "rotate", "sam"))
    team.issued.append(new)
    with pytest.raises(ValueError, match="Could not login"):
        team.login("sam", key)
    assert team.login("sam", new).predict(api_name="/usage")["totals"]["requests"] == 1


# ---- secrets ----------------------------------------------------------------------------------


def test_no_key_or_hash_appears_in_any_response_or_log(team: Team) -> None:
    """Runs last: it also covers the log lines every test above produced."""
    admin_key = team.add("tom-admin", role="admin")
    user_key = team.add("uma", rpm=2)
    seen: list[str] = []
    uma = team.login("uma", user_key)
    for kwargs in (
        {"messages": HELLO, "api_name": "/chat"},
        {"messages": HELLO, "temperature": 9, "api_name": "/chat"},  # invalid
        {"messages": HELLO, "api_name": "/chat"},  # refused: 2 per minute
        {"api_name": "/users"},  # not an admin
        {"user": "tom-admin", "api_name": "/usage"},  # not hers
        {"api_name": "/usage"},
    ):
        try:
            seen.append(repr(uma.predict(**kwargs)))
        except AppError as exc:
            seen.append(str(exc))
    tom = team.login("tom-admin", admin_key)
    seen += [repr(tom.predict(api_name="/users")), repr(tom.predict(api_name="/usage"))]
    with team.browser() as http:
        seen.append(form_login(http, "uma", "dk_wrong").text)
        seen.append(form_login(http, "uma", user_key).text)
        seen += [call(http, "users").text, call(http, "usage").text, http.get("/health").text]
        team.rotate("uma")
        seen.append(call(http, "usage").text)
    seen.append(cli(team.data_dir, "list").stdout)

    everything = "\n".join(seen) + "\n" + logged()
    assert "uma" in everything and "login accepted" in logged()
    hashes = [row["key_hash"] for row in user_rows(team.core.users.engine).values()]
    assert team.issued and len(hashes) >= len(team.issued) // 2
    for secret in team.issued:
        assert secret not in everything
        assert secret[3:15] not in everything and secret[-12:] not in everything
    for stored in hashes:
        _, salt, digest = stored.split("$")
        assert stored not in everything and salt not in everything and digest not in everything
    assert ACCESS_KEY not in everything
