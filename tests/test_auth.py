"""Auth and health: nothing but the login page and /health without the access key."""

from __future__ import annotations

import httpx
import pytest
from gradio_client import Client

from tests.conftest import ACCESS_KEY, UPSTREAM_KEY, Served, app_settings, serve

ENDPOINTS = ["chat", "completion", "generate_image", "embeddings", "models", "usage", "users"]


def test_health_is_public_and_secret_free(running_app: Served) -> None:
    response = httpx.get(f"{running_app.url}/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["provider"] == "openai"
    assert body["reachable"] is True
    assert body["version"]
    text = response.text
    assert UPSTREAM_KEY not in text and ACCESS_KEY not in text
    # Not even a fragment of either key.
    assert UPSTREAM_KEY[-8:] not in text and ACCESS_KEY[:8] not in text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/config"),
        ("GET", "/gradio_api/info"),
        ("GET", "/gradio_api/info?all_endpoints=true"),
        ("POST", "/gradio_api/queue/join"),
        ("GET", "/gradio_api/queue/data?session_hash=x"),
        ("POST", "/gradio_api/upload"),
        ("GET", "/gradio_api/file=/etc/hostname"),
        ("GET", "/monitoring"),
        *[("POST", f"/gradio_api/call/{name}") for name in ENDPOINTS],
        *[("POST", f"/gradio_api/run/{name}") for name in ENDPOINTS],
    ],
)
def test_everything_that_runs_code_or_serves_data_needs_login(running_app, method, path):
    response = httpx.request(method, running_app.url + path, json={"data": []})
    assert response.status_code == 401, response.text[:200]


def test_the_page_itself_is_only_the_login_form(running_app: Served) -> None:
    response = httpx.get(running_app.url + "/")
    assert response.status_code == 200
    assert "gpt-4.1-mini" not in response.text  # no app config leaks into the login page
    assert httpx.get(running_app.url + "/docs").status_code in (401, 404)
    assert httpx.get(running_app.url + "/openapi.json").status_code in (401, 404)


def test_a_wrong_key_is_refused(running_app: Served) -> None:
    with pytest.raises(ValueError, match="Could not login"):
        Client(running_app.url, auth=("tester", "not-the-key"), verbose=False)


def test_raw_http_with_a_login_cookie_works(running_app: Served) -> None:
    with httpx.Client(base_url=running_app.url) as http:
        login = http.post("/login", data={"username": "alice", "password": ACCESS_KEY})
        assert login.status_code == 200
        job = http.post("/gradio_api/call/models", json={"data": []})
        assert job.status_code == 200
        event_id = job.json()["event_id"]
        stream = http.get(f"/gradio_api/call/models/{event_id}")
        assert "gpt-4.1-mini" in stream.text


def test_login_lockout_after_five_failures(upstream, tmp_path) -> None:
    """A separate app and database (lockouts are shared through the database), so locking
    127.0.0.1 out does not disturb the other tests."""
    from ui.server import create_app

    settings = app_settings(upstream, LOGIN_LOCKOUT_SECONDS="900", DATA_DIR=str(tmp_path))
    served = serve(create_app(settings))
    try:
        with httpx.Client(base_url=served.url) as http:
            for _ in range(5):
                bad = http.post("/login", data={"username": "mallory", "password": "guess"})
                assert bad.status_code == 400
            # Now even the right key is refused for a while, with a clear reason.
            locked = http.post("/login", data={"username": "mallory", "password": ACCESS_KEY})
            assert locked.status_code == 429
            assert "Too many failed sign-ins" in locked.json()["detail"]
            assert int(locked.headers["retry-after"]) > 0
            # The rest of the app is unaffected: health still answers.
            assert http.get("/health").status_code == 200
    finally:
        served.stop()
    from tests.conftest import logged

    assert "sign-in locked for client 127.0.0.1" in logged()


def test_a_successful_login_does_not_reset_the_failure_count(upstream, tmp_path) -> None:
    """Any login may be a guess at the owner key, so one's own success clears nothing."""
    from ui.server import create_app

    served = serve(create_app(app_settings(upstream, DATA_DIR=str(tmp_path))))
    try:
        with httpx.Client(base_url=served.url) as http:
            for _ in range(3):
                http.post("/login", data={"username": "bob", "password": "typo"})
            assert http.post("/login", data={"username": "bob", "password": ACCESS_KEY}).is_success
            statuses = [
                http.post("/login", data={"username": "bob", "password": "typo"}).status_code
                for _ in range(3)
            ]
            assert statuses == [400, 400, 429]
    finally:
        served.stop()


def test_the_sign_in_form_is_tidied_and_empty_fields_are_not_guesses(upstream, tmp_path) -> None:
    """An empty name or key is refused with a message and counts toward no lockout; a key
    pasted with spaces around it works; multipart forms (Gradio's own page) are read too."""
    from ui.server import create_app

    settings = app_settings(upstream, LOGIN_MAX_FAILURES="2", DATA_DIR=str(tmp_path))
    served = serve(create_app(settings))
    try:
        with httpx.Client(base_url=served.url) as http:
            for form in ({"username": "", "password": ACCESS_KEY}, {"username": "  "},
                         {"username": "carol", "password": " "}, {}) * 3:  # fmt: skip
                empty = http.post("/login", data=form)
                assert empty.status_code == 400
                assert empty.json()["detail"] in ("Enter your user name.", "Enter your access key.")
            pasted = {"username": " carol ", "password": f" {ACCESS_KEY}\n"}
            spaced = http.post("/login", data=pasted)
            assert spaced.status_code == 200
            assert http.get("/config").status_code == 200  # signed in
        with httpx.Client(base_url=served.url) as http:
            multipart = {"username": (None, "dave"), "password": (None, ACCESS_KEY)}
            parts = http.post("/login", files=multipart)
            assert parts.status_code == 200
            huge = http.post("/login", data={"username": "x" * 20_000, "password": "y"})
            assert huge.status_code == 413
    finally:
        served.stop()


def test_the_login_page_is_ours_and_only_without_a_session(running_app: Served) -> None:
    with httpx.Client(base_url=running_app.url) as http:
        page = http.get("/")
        assert page.status_code == 200 and 'id="sign-in"' in page.text
        assert "Sign in with your user name and access key." in page.text
        assert http.post("/login", data={"username": "erin", "password": ACCESS_KEY}).is_success
        assert 'id="sign-in"' not in http.get("/").text  # the dashboard now


def test_a_sign_in_form_that_trickles_in_is_cut_off(running_app: Served, monkeypatch) -> None:
    """The guard reads the form itself (before the body limit's own deadlines): a form sent
    slowly ends with a 408 instead of holding the connection."""
    import socket

    from edge import sessions

    monkeypatch.setattr(sessions, "LOGIN_SECONDS", 1.0)
    host, port = running_app.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
            b"\r\nContent-Length: 40\r\n\r\nusername=a"
        )
        answer = conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408")
