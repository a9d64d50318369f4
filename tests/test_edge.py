"""The edge against a hostile signed-in user and other sites, over real HTTP.

One app for the module trusts 127.0.0.1 as a proxy (FORWARDED_ALLOW_IPS), so each test can
speak from its own client address through X-Forwarded-For and the lockouts stay apart.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import pytest

from tests.conftest import ACCESS_KEY, Served, app_settings, logged, serve
from tests.upstream import FakeUpstream

if TYPE_CHECKING:
    from ui.server import Server

ORIGIN = "https://tools.example.com"  # the one foreign origin the module's app allows
EVIL = "https://evil.example.net"


@dataclass
class Edge:
    url: str
    app: Server
    served: Served
    data_dir: Path

    @property
    def core(self) -> Any:
        return self.app.state.core

    def http(self, ip: str, **headers: str) -> httpx.Client:
        """A client that speaks from `ip` (through the trusted local proxy header)."""
        return httpx.Client(
            base_url=self.url, timeout=15, headers={"x-forwarded-for": ip, **headers}
        )

    def login(self, name: str, ip: str, key: str = ACCESS_KEY) -> httpx.Client:
        http = self.http(ip)
        answer = http.post("/login", data={"username": name, "password": key})
        assert answer.status_code == 200, answer.text
        return http


@pytest.fixture(scope="module")
def edge(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    from ui.server import create_app

    data_dir = tmp_path_factory.mktemp("edge-data")
    settings = app_settings(
        upstream,
        DATA_DIR=str(data_dir),
        FORWARDED_ALLOW_IPS="127.0.0.1",
        ALLOWED_ORIGINS=ORIGIN,
        UPLOAD_QUOTA_MB="1",
        MAX_REQUEST_BYTES="65536",
    )
    app = create_app(settings)
    served = serve(app)
    yield Edge(served.url, app, served, data_dir)
    served.server.should_exit = served.server.force_exit = True
    served.thread.join(timeout=10)


def join(http: httpx.Client, fn_index: int, data: list[Any]) -> httpx.Response:
    body = {"data": data, "fn_index": fn_index, "session_hash": "s" + os.urandom(6).hex()}
    return http.post("/gradio_api/queue/join", json=body)


def upload(http: httpx.Client, name: str, content: bytes) -> httpx.Response:
    return http.post("/gradio_api/upload", files={"files": (name, content, "text/plain")})


def file_data(path: str) -> dict[str, Any]:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


# ---- files ----------------------------------------------------------------------------------


def test_no_event_accepts_a_file_path_it_was_not_given(edge: Edge, tmp_path: Path) -> None:
    """Every event in /config, with hostile paths in every input: refused, quickly."""
    from gradio.utils import get_upload_folder

    http = edge.login("mallory", "10.1.0.1")
    cache = Path(get_upload_folder())
    inside = cache / "planted"
    inside.mkdir(exist_ok=True)
    link = inside / "passwd.txt"
    if not link.exists():
        link.symlink_to("/etc/passwd")  # a symlink inside the cache pointing out of it
    hostile = [
        "/proc/self/environ",
        str(edge.data_dir / "dashboard.db"),
        str(cache / ".." / ".." / "etc" / "passwd"),
        "/dev/zero",
        str(link),
        "http://127.0.0.1:9/x.txt",
    ]
    config = http.get("/config").json()
    assert len(config["dependencies"]) > 20
    for dependency in config["dependencies"]:
        width = len(dependency["inputs"])
        for path in hostile:
            as_history = [{"role": "user", "content": [{"type": "file", "file": file_data(path)}]}]
            for value in (file_data(path), as_history):
                started = time.monotonic()
                answer = join(http, dependency["id"], [value] * max(width, 1))
                assert answer.status_code == 403, (dependency["api_name"], path, answer.text)
                assert time.monotonic() - started < 5
    # The gr.api endpoints take the same refusal.
    refused = http.post("/gradio_api/call/embeddings", json={"data": [file_data(hostile[0])]})
    assert refused.status_code == 403
    # Nothing of the server's was copied into the cache to be served back.
    assert not any("environ" in p.name for p in cache.rglob("*"))
    secret = os.environ.get("PATH", "")[:40]
    for path in cache.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert secret.encode() not in path.read_bytes()[:4096]


def test_gradio_itself_refuses_paths_outside_its_upload_folder(edge: Edge) -> None:
    """The second line: Gradio's own check, which a mounted app only gets from has_launched."""
    import asyncio

    from gradio import processing_utils
    from gradio.context import LocalContext
    from gradio.exceptions import InvalidPathError

    routes = edge.app.dashboard.routes
    mounted = next(r for r in routes if hasattr(getattr(r, "app", None), "get_blocks"))
    demo = mounted.app.get_blocks()
    block = next(b for b in demo.blocks.values() if type(b).__name__ == "File")
    reset = LocalContext.blocks.set(demo)
    try:
        with pytest.raises(InvalidPathError):
            asyncio.run(
                processing_utils.async_move_files_to_cache(
                    file_data("/etc/passwd"), block, check_in_upload_folder=True
                )
            )
    finally:
        LocalContext.blocks.reset(reset)


def test_uploads_are_private_to_their_session(edge: Edge) -> None:
    alice = edge.login("alice-files", "10.1.1.1")
    bob = edge.login("bob-files", "10.1.1.2")
    answer = upload(alice, "texts.txt", b"first line\nsecond line\n")
    assert answer.status_code == 200
    (path,) = answer.json()
    assert alice.get(f"/gradio_api/file={path}").content == b"first line\nsecond line\n"
    # Another user who learns the path can neither read it nor name it in an event.
    assert bob.get(f"/gradio_api/file={path}").status_code == 404
    embed = _fn_index(alice, "embed")
    assert join(bob, embed, ["", file_data(path), "", 0]).status_code == 403
    # Nor can another session of the same user (uploads belong to the session).
    again = edge.login("alice-files", "10.1.1.1")
    assert join(again, embed, ["", file_data(path), "", 0]).status_code == 403
    # The owner's session can use it: the Embeddings tab reads the file.
    job = join(alice, embed, ["", file_data(path), "text-embedding-3-small", 0])
    assert job.status_code == 200
    events = alice.get(f"/gradio_api/queue/data?session_hash={_hash(job)}").text
    assert "2 texts" in events


def test_generated_files_are_private_to_their_user(edge: Edge) -> None:
    carol = edge.login("carol-files", "10.1.2.1")
    dave = edge.login("dave-files", "10.1.2.2")
    job = carol.post(
        "/gradio_api/call/generate_image", json={"data": ["a red square", "", "auto", "auto", 1]}
    )
    stream = carol.get(f"/gradio_api/call/generate_image/{job.json()['event_id']}").text
    line = next(x for x in stream.splitlines() if x.startswith("data:") and "path" in x)
    (image,) = orjson.loads(line[5:])[0]
    url = f"/gradio_api/file={image['path']}"
    assert carol.get(url).content.startswith(b"\x89PNG")
    assert dave.get(url).status_code == 404
    # Remote URLs are never fetched for anyone.
    assert carol.get("/gradio_api/file=https://example.com/x.png").status_code == 404


def test_uploads_count_against_a_quota_and_go_with_the_session(edge: Edge) -> None:
    erin = edge.login("erin-files", "10.1.3.1")
    first = upload(erin, "a.txt", b"a" * 600_000)
    assert first.status_code == 200
    stored = Path(first.json()[0])
    assert stored.exists()
    over = upload(erin, "b.txt", b"b" * 600_000)
    assert over.status_code == 413
    assert "UPLOAD_QUOTA_MB" in over.json()["detail"]
    signed_out = erin.post("/logout", headers={"origin": edge.url})
    assert signed_out.status_code == 303
    assert not stored.exists()


# ---- other sites -----------------------------------------------------------------------------


def test_another_site_can_neither_read_nor_write(edge: Edge) -> None:
    frank = edge.login("frank-cors", "10.2.0.1")
    read = frank.get("/config", headers={"origin": EVIL})
    assert "access-control-allow-origin" not in read.headers
    assert "access-control-allow-credentials" not in read.headers
    preflight = frank.options(
        "/gradio_api/queue/join",
        headers={"origin": EVIL, "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 403
    assert "access-control-allow-origin" not in preflight.headers
    # A form post or fetch from another site is refused before it reaches the app.
    usage_event = _fn_index(frank, "run")  # the admin's "add user" button
    body = {"data": ["evil-admin", True, 0, 0], "fn_index": usage_event, "session_hash": "x"}
    forged = frank.post("/gradio_api/queue/join", json=body, headers={"origin": EVIL})
    assert forged.status_code == 403
    assert edge.core.users.get("evil-admin") is None
    login = edge.http("10.2.0.2").post(
        "/login", data={"username": "x", "password": ACCESS_KEY}, headers={"origin": EVIL}
    )
    assert login.status_code == 403
    # The dashboard's own origin and the operator's listed one work.
    own = frank.post("/gradio_api/call/models", json={"data": []}, headers={"origin": edge.url})
    assert own.status_code == 200
    listed = frank.get("/config", headers={"origin": ORIGIN})
    assert listed.headers["access-control-allow-origin"] == ORIGIN
    assert listed.headers["access-control-allow-credentials"] == "true"


def test_session_cookies_are_lax_httponly_and_secure_over_https(edge: Edge) -> None:
    plain = edge.http("10.2.1.1").post("/login", data={"username": "g", "password": ACCESS_KEY})
    cookies = plain.headers.get_list("set-cookie")
    assert len(cookies) == 1, cookies  # no "-unsecure" twin
    assert "SameSite=Lax" in cookies[0] and "HttpOnly" in cookies[0]
    assert "Secure" not in cookies[0]
    https = edge.http("10.2.1.2", **{"x-forwarded-proto": "https"})
    secure = https.post("/login", data={"username": "g", "password": ACCESS_KEY})
    (cookie,) = secure.headers.get_list("set-cookie")
    assert "Secure" in cookie and "SameSite=Lax" in cookie and "unsecure" not in cookie


def test_the_v1_api_answers_browser_preflights_without_credentials(edge: Edge) -> None:
    http = edge.http("10.2.2.1")
    preflight = http.options(
        "/v1/chat/completions",
        headers={
            "origin": EVIL,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    assert "access-control-allow-credentials" not in preflight.headers
    answer = http.post(
        "/v1/chat/completions",
        json={"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]},
        headers={"origin": EVIL, "authorization": f"Bearer {ACCESS_KEY}"},
    )
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "*"


def test_pages_may_not_load_images_or_post_forms_elsewhere(edge: Edge) -> None:
    policy = edge.http("10.2.3.1").get("/").headers["content-security-policy"]
    assert "img-src 'self' data: blob:;" in policy
    assert "form-action 'self'" in policy


# ---- guessing --------------------------------------------------------------------------------


def test_wrong_bearer_keys_lock_the_address_out(edge: Edge) -> None:
    http = edge.http("10.3.0.1")
    for _ in range(5):
        wrong = http.get("/v1/models", headers={"authorization": "Bearer not-the-key-000"})
        assert wrong.status_code == 401
    locked = http.get("/v1/models", headers={"authorization": f"Bearer {ACCESS_KEY}"})
    assert locked.status_code == 429
    assert int(locked.headers["retry-after"]) > 0
    assert locked.json()["error"]["type"] == "rate_limit_exceeded"
    assert http.get("/metrics", headers={"authorization": "Bearer x"}).status_code == 429
    # The same address cannot sign in to the dashboard either; another address can.
    login = http.post("/login", data={"username": "h", "password": ACCESS_KEY})
    assert login.status_code == 429
    ok = edge.http("10.3.0.2").get("/v1/models", headers={"authorization": f"Bearer {ACCESS_KEY}"})
    assert ok.status_code == 200


def test_signing_in_as_oneself_does_not_reset_guesses_at_another_name(edge: Edge) -> None:
    http = edge.http("10.3.1.1")
    for _ in range(4):
        assert http.post("/login", data={"username": "boss", "password": "guess-1"}).status_code
    mine = http.post("/login", data={"username": "ivan", "password": ACCESS_KEY})
    assert mine.status_code == 200
    assert http.post("/login", data={"username": "boss", "password": "guess-2"}).status_code == 400
    assert http.post("/login", data={"username": "boss", "password": "guess-3"}).status_code == 429


def test_concurrent_guesses_cannot_slip_past_the_limit(edge: Edge) -> None:
    def guess(i: int) -> int:
        with edge.http("10.3.2.1") as http:
            return http.post("/login", data={"username": "x", "password": f"g{i}"}).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=30) as pool:
        statuses = list(pool.map(guess, range(60)))
    assert statuses.count(400) <= 5
    assert statuses.count(429) >= 55


def test_forwarded_headers_are_ignored_unless_the_proxy_is_trusted(upstream, tmp_path) -> None:
    from ui.server import create_app

    settings = app_settings(upstream, DATA_DIR=str(tmp_path), LOGIN_MAX_FAILURES="2")
    served = serve(create_app(settings))
    try:
        for ip in ("1.1.1.1", "2.2.2.2"):
            with httpx.Client(base_url=served.url, headers={"x-forwarded-for": ip}) as http:
                http.post("/login", data={"username": "x", "password": "wrong"})
        # Both counted against the real address: a made-up one does not get a fresh start.
        with httpx.Client(base_url=served.url, headers={"x-forwarded-for": "3.3.3.3"}) as http:
            assert http.post("/login", data={"username": "x", "password": "w"}).status_code == 429
    finally:
        served.stop()


# ---- bounded resources -----------------------------------------------------------------------


def test_request_bodies_are_capped_before_parsing(edge: Edge) -> None:
    http = edge.http("10.4.0.1", authorization=f"Bearer {ACCESS_KEY}")
    big = {"model": "text-embedding-3-small", "input": ["word " * 20_000]}
    answer = http.post("/v1/embeddings", json=big)
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "text-embedding-3-small", "input": ["'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"]}'

    streamed = http.post("/v1/embeddings", content=chunks())
    assert streamed.status_code == 413
    assert http.get("/health").status_code == 200


def test_streams_and_events_need_a_session(edge: Edge) -> None:
    http = edge.http("10.4.1.1")
    for path in ("/gradio_api/heartbeat/anything", "/gradio_api/queue/data?session_hash=x"):
        started = time.monotonic()
        assert http.get(path).status_code == 401
        assert time.monotonic() - started < 5
    assert http.post("/gradio_api/cancel", json={"event_id": "x"}).status_code == 401


def test_silent_and_slow_connections_are_closed(edge: Edge, monkeypatch) -> None:
    from edge.proxy import GuardedHttpToolsProtocol

    monkeypatch.setattr(GuardedHttpToolsProtocol, "header_timeout", 1.0)
    port = int(edge.url.rsplit(":", 1)[1])
    for opening in (b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"):  # silent; headers unfinished
        with socket.create_connection(("127.0.0.1", port), timeout=8) as sock:
            sock.sendall(opening)
            started = time.monotonic()
            assert sock.recv(1024) == b""  # closed by the server
            assert time.monotonic() - started < 6


def test_an_unknown_queue_session_logs_one_line(edge: Edge) -> None:
    http = edge.login("judy", "10.4.2.1")
    before = len(logged().splitlines())
    for _ in range(3):
        http.get("/gradio_api/queue/data?session_hash=nobody-has-this")
    client = (" httpx: ", " httpcore")  # this test's own client logs at DEBUG
    new = [x for x in logged().splitlines()[before:] if not any(c in x for c in client)]
    assert len(new) <= 3, new  # one line per request, at most
    assert not any("Traceback" in line for line in new)


def test_sessions_end_when_idle_and_when_too_old(edge: Edge) -> None:
    sessions = edge.app.state.sessions
    http = edge.login("kim", "10.4.3.1")
    assert http.get("/config").status_code == 200
    idle, lifetime = sessions.idle, sessions.lifetime
    try:
        sessions.idle = 0.5
        time.sleep(0.8)
        assert http.get("/config").status_code == 401
        sessions.idle = idle
        http = edge.login("kim", "10.4.3.1")
        sessions.lifetime = 0.5
        time.sleep(0.8)
        assert http.get("/config").status_code == 401
    finally:
        sessions.idle, sessions.lifetime = idle, lifetime


def test_logout_ends_only_this_session_and_only_by_post(edge: Edge) -> None:
    here = edge.login("leo", "10.4.4.1")
    there = edge.login("leo", "10.4.4.2")
    page = here.get("/logout")
    assert page.status_code == 200 and 'method="post"' in page.text
    assert here.get("/config").status_code == 200  # a GET ended nothing
    assert here.post("/logout", headers={"origin": edge.url}).status_code == 303
    assert here.get("/config").status_code == 401
    assert there.get("/config").status_code == 200


def test_metrics_label_only_known_models(edge: Edge) -> None:
    http = edge.http("10.4.5.1", authorization=f"Bearer {ACCESS_KEY}")
    for i in range(30):
        body = {"model": f"made-up-{i}", "messages": [{"role": "user", "content": "x"}]}
        http.post("/v1/chat/completions", json=body)
    text = http.get("/metrics").text
    assert "made-up-" not in text
    assert 'model="other"' in text


def test_a_v1_stream_ends_when_its_user_is_disabled(edge: Edge, monkeypatch) -> None:
    from gateway import routes

    monkeypatch.setattr(routes, "RECHECK_SECONDS", 0.0)
    _, key = edge.core.users.add("mona")
    http = edge.http("10.4.6.1", authorization=f"Bearer {key}")
    words = " ".join(f"w{i}" for i in range(60))
    body = {
        "model": "gpt-4.1-mini",
        "stream": True,
        "messages": [{"role": "user", "content": words}],
    }
    events = []
    with http.stream("POST", "/v1/chat/completions", json=body) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            events.append(line)
            if len(events) == 6:
                edge.core.users.set_disabled("mona", True)
    text = "\n".join(events)
    assert "disabled or replaced" in text
    assert "w59" not in text and "[DONE]" not in text


def _fn_index(http: httpx.Client, name: str) -> int:
    config = http.get("/config").json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == name)


def _hash(job: httpx.Response) -> str:
    return orjson.loads(job.request.content)["session_hash"]


def test_uploads_and_outputs_are_deleted_after_their_time(edge: Edge, monkeypatch) -> None:
    from edge import files

    registry = next(
        m.kwargs["registry"] for m in edge.app.dashboard.user_middleware if m.cls is files.FileGuard
    )
    monkeypatch.setattr(files, "SWEEP_EVERY", 0.0)
    monkeypatch.setattr(registry, "ttl", 0.3)
    nina = edge.login("nina-files", "10.4.7.1")
    (path,) = upload(nina, "old.txt", b"old").json()
    time.sleep(0.5)
    assert nina.get(f"/gradio_api/file={path}").status_code == 404  # the sweep ran first
    assert not Path(path).exists()
    assert registry.used_bytes("nina-files") == 0


def test_a_user_cannot_guess_the_owner_key_between_their_own_sign_ins(edge: Edge) -> None:
    _, key = edge.core.users.add("olive")
    http = edge.http("10.3.3.1")
    statuses = []
    for _ in range(3):
        statuses += [
            http.post("/login", data={"username": "olive", "password": f"owner?{i}"}).status_code
            for i in range(4)
        ]
        assert http.post("/login", data={"username": "olive", "password": key}).status_code == 200
    assert statuses.count(400) == 5 and statuses[-1] == 429


def test_a_locked_address_still_lets_users_own_keys_in(edge: Edge) -> None:
    _, key = edge.core.users.add("pat")
    http = edge.http("10.3.4.1")
    for _ in range(5):
        http.get("/v1/models", headers={"authorization": "Bearer wrong-guess-123"})
    # Someone behind the same address guessed: the owner key is no longer even checked...
    owner = http.get("/v1/models", headers={"authorization": f"Bearer {ACCESS_KEY}"})
    assert owner.status_code == 429
    assert http.post("/login", data={"username": "x", "password": ACCESS_KEY}).status_code == 429
    # ...but a user's own key (256 random bits) still works, by bearer and by login.
    assert http.get("/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
    assert http.post("/login", data={"username": "pat", "password": key}).status_code == 200
    assert http.get("/v1/models", headers={"authorization": "Bearer dk_1_nope"}).status_code == 429


def test_ipv6_addresses_count_by_their_64() -> None:
    from core.auth import Lockout

    lockout = Lockout(max_failures=3, window=60)
    for i in range(3):
        lockout.failure(f"2001:db8:1:2::{i + 1}", "x")
    assert lockout.retry_after("2001:db8:1:2:ffff::9") > 0
    assert lockout.retry_after("2001:db8:1:3::1") == 0


def test_json_that_only_a_lenient_parser_reads_is_refused(edge: Edge) -> None:
    http = edge.login("quinn-json", "10.1.4.1")
    embed = _fn_index(http, "embed")
    body = orjson.dumps({"data": ["", file_data("/etc/passwd"), "", 0], "fn_index": embed})
    nan = body[:-1] + b', "x": NaN}'
    for raw in (nan, body.decode().encode("utf-16")):
        answer = http.post("/gradio_api/queue/join", content=raw)
        assert answer.status_code == 400, answer.text


def test_no_body_is_read_before_the_session_check(edge: Edge) -> None:
    port = int(edge.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /gradio_api/queue/join HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n"
            b"Content-Type: application/json\r\n\r\n{"
        )
        assert b" 401 " in sock.recv(4096).split(b"\r\n", 1)[0]


def test_only_the_upload_route_skips_the_body_cap(edge: Edge) -> None:
    http = edge.login("rita-body", "10.4.8.1")
    for path in ("/gradio_api/upload_progress", "/gradio_api/uploadx"):
        answer = http.post(path, content=(b"x" * 10_000 for _ in range(20)))
        assert answer.status_code == 413, path


def test_concurrent_uploads_cannot_overshoot_the_quota(edge: Edge) -> None:
    http = edge.login("sam-files", "10.1.5.1")

    def send(i: int) -> int:
        return upload(http, f"part{i}.txt", bytes([65 + i]) * 300_000).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        statuses = list(pool.map(send, range(10)))
    assert statuses.count(200) <= 3  # 1 MB quota, 300 KB each
    assert edge.core and statuses.count(413) >= 7


def test_gradios_token_table_stays_bounded_and_every_session_keeps_working(edge: Edge) -> None:
    """Sessions are signed tokens: none is kept here, but Gradio checks its own table, which
    holds at most max_known of them; one that was dropped comes back on its next use."""
    sessions = edge.app.state.sessions
    known = sessions.max_known
    sessions.max_known = 5
    try:
        clients = [edge.login(f"tom-{i}", "10.4.9.1") for i in range(8)]
        assert len(sessions) <= 5
        for http in clients:
            assert "dependencies" in http.get("/config").json()  # signed in, every one
        assert len(sessions) <= 5
    finally:
        sessions.max_known = known


def test_the_owner_key_typed_as_a_user_name_is_not_logged(upstream, tmp_path) -> None:
    """Cleaning a name for the log (dropping / and =) must not turn the key into a string
    that no longer matches the secret the log filter knows."""
    from core.auth import Authenticator

    key = "Xq3/9fPz+Lm2=Rt8vN0a/KbY7wE1sD4h"
    auth = Authenticator(app_settings(upstream, ACCESS_KEY=key, DATA_DIR=str(tmp_path)))
    assert auth.login(key + "x", "wrong", client="10.3.5.1") is None
    assert "Xq39fPz" not in logged() and "9fPz" not in logged()
