"""One access line per call (issue 16): structured, the only line a call that goes well logs,
at INFO on the "access" logger; ACCESS_LOG=false turns it off. The app runs as `python app.py`
for the setting, and in-process (with the test session's log buffer) for the line."""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

import httpx

from core.log import Formatter
from tests.conftest import ACCESS_KEY, Served, logged
from tests.processes import launched
from tests.upstream import FakeUpstream

BODY = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "one line please"}]}


def test_a_call_logs_one_structured_line(running_app: Served) -> None:
    before = len(logged())
    answer = httpx.post(
        running_app.url + "/v1/chat/completions",
        json=BODY,
        headers={"Authorization": f"Bearer {ACCESS_KEY}"},
        timeout=30,
    )
    assert answer.status_code == 200
    request_id = answer.headers["x-request-id"]
    time.sleep(0.2)  # the line is written as the call ends, after the last byte
    # The test session logs at DEBUG (clients' own lines too): the app's at INFO and above.
    mine = [x for x in logged()[before:].splitlines() if request_id in x and " DEBUG " not in x]
    assert len(mine) == 1, mine
    line = mine[0]
    assert " INFO access: " in line
    fields = dict(part.split("=", 1) for part in line.split("access: ", 1)[1].split())
    assert fields["request_id"] == request_id
    assert (fields["user"], fields["source"], fields["function"]) == ("owner", "v1", "chat")
    assert fields["status"] == "ok" and fields["model"] == "gpt-4.1-mini"
    assert int(fields["prompt_tokens"]) > 0 and float(fields["latency_ms"]) >= 0
    # uvicorn's own line per request is off: no second line for the same call.
    assert not any('"POST /v1/chat/completions' in x for x in logged()[before:].splitlines())


def test_a_key_a_caller_puts_in_a_logged_field_is_redacted(running_app: Served) -> None:
    """The model name goes into the access line as the caller sent it: one shaped like a key
    is scrubbed there (the filter looks for the shapes' markers before it runs its regex)."""
    leaked = "sk-proj-" + secrets.token_urlsafe(40)
    before = len(logged())
    answer = httpx.post(
        running_app.url + "/v1/chat/completions",
        json={**BODY, "model": leaked},
        headers={"Authorization": f"Bearer {ACCESS_KEY}"},
        timeout=30,
    )
    request_id = answer.headers["x-request-id"]
    time.sleep(0.2)
    mine = [x for x in logged()[before:].splitlines() if request_id in x and " access: " in x]
    assert len(mine) == 1 and "model=[redacted]" in mine[0], mine
    assert leaked not in logged() and leaked[8:30] not in logged()


def test_access_log_false_logs_no_line_per_call(upstream: FakeUpstream, tmp_path: Path) -> None:
    overrides = {"DATA_DIR": str(tmp_path), "ACCESS_LOG": "false"}
    with launched(upstream, overrides, tmp_path / "app.log") as app:
        answer = httpx.post(
            app.url + "/v1/chat/completions",
            json=BODY,
            headers={"Authorization": f"Bearer {ACCESS_KEY}"},
            timeout=30,
        )
        assert answer.status_code == 200
        app.stop()
    text = (tmp_path / "app.log").read_text()
    assert "serving on" in text  # INFO lines are there
    assert "access:" not in text and answer.headers["x-request-id"] not in text


def test_a_request_refused_before_the_service_is_logged_too(running_app: Served) -> None:
    """A wrong or missing key, a body that is not JSON: one line each, so key guessing
    leaves a trace (uvicorn's own line is off)."""
    before = len(logged())
    url = running_app.url + "/v1/chat/completions"
    answers = [
        httpx.post(url, json=BODY, headers={"Authorization": "Bearer dk_9_wrong-key-wrong-key"}),
        httpx.post(url, json=BODY),
        httpx.post(url, content=b"{", headers={"Authorization": f"Bearer {ACCESS_KEY}"}),
    ]
    assert [a.status_code for a in answers] == [401, 401, 400]
    for answer in answers:
        request_id = answer.headers["x-request-id"]
        mine = [x for x in logged()[before:].splitlines() if request_id in x and " access: " in x]
        assert len(mine) == 1 and f"status={answer.status_code}" in mine[0], mine
    assert "wrong-key" not in logged()[before:]  # the key itself never


def test_a_failure_on_the_backends_side_is_a_warning(running_app: Served) -> None:
    """Still logged when the operator keeps only warnings (ACCESS_LOG=false)."""
    before = len(logged())
    answer = httpx.post(
        running_app.url + "/v1/chat/completions",
        json=BODY | {"model": "error-500"},
        headers={"Authorization": f"Bearer {ACCESS_KEY}"},
        timeout=30,
    )
    assert answer.status_code >= 500  # the upstream's 500, passed on as a bad gateway
    time.sleep(0.2)
    request_id = answer.headers["x-request-id"]
    mine = [x for x in logged()[before:].splitlines() if request_id in x and " access: " in x]
    assert len(mine) == 1 and " WARNING access: " in mine[0], mine


def test_the_time_formatted_once_a_second_is_the_time_of_each_record() -> None:
    """core.log's formatter keeps the formatted second; each line still shows its own time."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    ours, stdlib = Formatter(fmt), logging.Formatter(fmt)
    start = time.time()
    for created in (start, start + 0.25, start + 0.999, start + 1.0, start + 61.5, start - 3600):
        record = logging.LogRecord("access", logging.INFO, "", 0, "x=%s", ("y",), None)
        record.created, record.msecs = created, int((created - int(created)) * 1000)
        assert ours.format(record) == stdlib.format(record)
