"""No secret in any response or log line: the upstream key and the access key stay private."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from core import errors
from core.log import redact
from core.service import Service
from core.users import new_key
from tests.conftest import ACCESS_KEY, UPSTREAM_KEY, Served, app_settings, logged, serve
from tests.upstream import FakeUpstream

if TYPE_CHECKING:
    from ui.server import Server

HELLO = [{"role": "user", "content": "hello"}]


def test_keys_never_appear_in_responses_or_logs(
    running_app: Served, client: Client, upstream: FakeUpstream
) -> None:
    seen: list[str] = []
    calls = [
        {"messages": HELLO, "api_name": "/chat"},
        {"messages": HELLO, "model": "error-401", "api_name": "/chat"},
        {"messages": HELLO, "model": "error-400", "api_name": "/chat"},
        {"messages": HELLO, "model": "cut-stream", "api_name": "/chat"},
        {"messages": HELLO, "temperature": 7, "api_name": "/chat"},
        {"prompt": "x", "model": "error-500", "api_name": "/completion"},
        {"texts": ["a", "b"], "api_name": "/embeddings"},
        {"prompt": "cat", "api_name": "/generate_image"},
        {"api_name": "/models"},
    ]
    for call in calls:
        try:
            seen.append(repr(client.predict(**call)))
        except AppError as exc:
            seen.append(str(exc))
    with httpx.Client(base_url=running_app.url) as http:
        seen.append(http.get("/health").text)
        seen.append(http.post("/login", data={"username": "x", "password": "wrong"}).text)
        seen.append(http.get("/").text)
    # The upstream really received the key, so its absence elsewhere means something.
    assert any(
        r["headers"].get("authorization") == f"Bearer {UPSTREAM_KEY}" for r in upstream.requests
    )
    everything = "\n".join(seen) + logged()
    assert "request_id=" in logged()
    for secret in (UPSTREAM_KEY, ACCESS_KEY):
        assert secret not in everything
        assert secret[-12:] not in everything


def test_the_log_filter_scrubs_a_secret_a_library_might_log() -> None:
    import logging

    logging.getLogger("some.library").warning("headers: Authorization: Bearer %s", UPSTREAM_KEY)
    assert UPSTREAM_KEY not in logged()
    assert "Authorization: Bearer [redacted]" in logged()


# ---- redaction by shape: keys nobody configured ----------------------------------------------

CREDENTIALS = ("up-user-" + secrets.token_hex(4), "up-pass-" + secrets.token_hex(8))


@pytest.fixture(scope="module")
def basic_app(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Server, Served, FakeUpstream]]:
    """The app on its own upstream that wants the Basic credentials in OPENAI_BASE_URL (and
    with its own login lockout, so the wrong logins here lock nothing else out)."""
    from ui.server import create_app

    user, password = CREDENTIALS
    with FakeUpstream(basic=CREDENTIALS) as up:
        base_url = up.url.replace("http://", f"http://{user}:{password}@")
        data_dir = str(tmp_path_factory.mktemp("basic-data"))
        app = create_app(app_settings(up, OPENAI_BASE_URL=base_url, DATA_DIR=data_dir))
        served = serve(app)
        try:
            yield app, served, up
        finally:
            served.stop()


def test_a_key_typed_into_the_user_name_field_is_not_logged(basic_app) -> None:
    _, served, _ = basic_app
    key = new_key(5)
    before = len(logged())
    with httpx.Client(base_url=served.url) as http:
        refused = http.post("/login", data={"username": key, "password": "not-the-key"})
    assert refused.status_code == 400
    new = logged()[before:]
    assert "[redacted]" in new  # the refused login was logged, without the name it was given
    assert key not in logged() and key[-20:] not in logged()


def test_anything_shaped_like_a_key_is_redacted_whoever_logs_it() -> None:
    token = secrets.token_urlsafe
    keys = [
        new_key(7),
        "sk-" + token(36),
        "sk-proj-" + token(96),
        "sk-ant-api03-" + token(72),
        "hf_" + secrets.token_hex(17),
    ]
    bearer = token(24)
    basic = base64.b64encode(f"alice:{token(12)}".encode()).decode()
    user, password = "u" + secrets.token_hex(6), "p" + token(12)
    library = logging.getLogger("some.library")
    for key in keys:
        library.warning("calling with key=%s", key)
    library.info("headers {'authorization': 'Bearer %s'}", bearer)
    library.info("Authorization: Basic %s", basic)
    library.info("connecting to postgresql://%s:%s@db.internal:5432/app", user, password)
    try:
        raise RuntimeError(f"the server said: bad key {keys[1]}")
    except RuntimeError:
        library.exception("request failed")  # the traceback quotes the key
    text = logged()
    for secret in [*keys, bearer, basic, user, password]:
        assert secret not in text
    assert "key=[redacted]" in text
    assert "'Bearer [redacted]'" in text and "Authorization: Basic [redacted]" in text
    assert "postgresql://[redacted]@db.internal:5432/app" in text
    assert "RuntimeError: the server said: bad key [redacted]" in text


@pytest.mark.parametrize(
    "text",
    [
        "model=gpt-4.1-mini status=ok",
        "task-scheduler-for-every-night-of-the-week",
        "Basic auth is off; the bearer or basic header was missing",
        "mail bob@example.com about https://example.com/a?b=c@d",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


def test_an_upstream_error_echoing_a_key_is_scrubbed(service: Service) -> None:
    leaked = "sk-proj-" + secrets.token_urlsafe(48)
    request = {"messages": [{"role": "user", "content": f"my key {leaked}"}], "model": "error-echo"}

    async def run() -> None:
        async for _ in service.chat_stream(request):
            pass

    with pytest.raises(errors.UpstreamRejected) as info:
        asyncio.run(run())
    message = str(info.value)
    assert "Could not process the message 'my key [redacted]'" in message
    assert leaked not in message


# ---- credentials in OPENAI_BASE_URL ------------------------------------------------------------


def test_credentials_in_the_base_url_are_sent_as_basic_auth_and_never_shown(basic_app) -> None:
    app, served, up = basic_app
    user, password = CREDENTIALS
    up.reset()
    client = Client(served.url, auth=("tester", ACCESS_KEY), verbose=False, analytics_enabled=False)
    # Chat (aiohttp), the /v1 passthrough (aiohttp) and embeddings (the SDK) all get through.
    assert client.predict(messages=HELLO, api_name="/chat") == "Echo: hello"
    v1 = httpx.post(
        f"{served.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {ACCESS_KEY}"},
        json={"model": "gpt-4.1-mini", "messages": HELLO},
        timeout=30,
    )
    assert v1.status_code == 200, v1.text
    assert v1.json()["choices"][0]["message"]["content"] == "Echo: hello"
    embedded = client.predict(texts=["a", "b"], api_name="/embeddings")
    assert len(embedded["vectors"]) == 2
    seen = {r["path"]: r["headers"].get("authorization") for r in up.requests}
    assert set(seen) >= {"/v1/chat/completions", "/v1/embeddings"}
    assert set(seen.values()) == {up.authorization}
    assert up.authorization.startswith("Basic ")

    health = httpx.get(f"{served.url}/health")
    assert health.json()["reachable"] is True
    assert health.json()["base_url"] == up.url  # shown, without the user info
    header = app.state.core.service.describe()
    assert header == f"OpenAI-compatible at {up.url}"
    everything = "\n".join([health.text, header, logged()])
    for secret in (user, password, f"{user}:{password}", up.authorization.split()[1]):
        assert secret not in everything
