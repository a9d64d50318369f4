"""No secret in any response or log line: the upstream key and the access key stay private."""

from __future__ import annotations

import httpx
from gradio_client import Client
from gradio_client.exceptions import AppError

from tests.conftest import ACCESS_KEY, UPSTREAM_KEY, Served, logged
from tests.upstream import FakeUpstream

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
