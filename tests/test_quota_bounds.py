"""Quotas that bound the bill (over real HTTP through /v1 with users' own keys): whatever a
call asks for (n choices, tools, image parts, no max_tokens), what it can cost is held first;
a call that fits is never refused; the reply is capped only when the quota needs it."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from core.schemas import ChatRequest
from core.service import _payload
from tests.conftest import app_settings, serve
from tests.upstream import FakeUpstream

HI = [{"role": "user", "content": "Say hello to me please"}]  # five words


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream, tmp_path_factory) -> Iterator[Any]:
    from ui.server import create_app

    data_dir = tmp_path_factory.mktemp("quota-data")
    app = create_app(app_settings(upstream, DATA_DIR=str(data_dir), LOGIN_MAX_FAILURES="1000"))
    served = serve(app)
    yield served, app.state.core
    served.server.should_exit = served.server.force_exit = True
    served.thread.join(timeout=10)


def sdk_for(gateway: Any, name: str, daily: int) -> tuple[openai.OpenAI, Any]:
    served, core = gateway
    _, key = core.users.add(name, daily_tokens=daily)
    return openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0), core


def spent(core: Any, name: str) -> int:
    core.ledger.flush()
    rows = core.ledger.rows(users=[name])
    return int((rows["prompt_tokens"] + rows["completion_tokens"]).sum())


def last_upstream_body(upstream: FakeUpstream) -> dict[str, Any]:
    return [r for r in upstream.requests if r["path"] == "/v1/chat/completions"][-1]["json"]


def test_n_choices_share_what_is_left(gateway, upstream: FakeUpstream) -> None:
    sdk, core = sdk_for(gateway, "quota-n", 2_000)
    sdk.chat.completions.create(model="gpt-4.1-mini", messages=HI, n=20)
    sent = last_upstream_body(upstream)
    # Twenty replies of at most this many tokens each fit in the day: the bill is bounded.
    assert sent["n"] == 20 and 20 * sent["max_tokens"] <= 2_000
    assert spent(core, "quota-n") <= 2_000


TOOLS = [
    {"type": "function", "function": {"name": f"f{i}", "description": "x" * 200}}
    for i in range(100)
]
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}


@pytest.mark.parametrize(
    "extra", [{"tools": TOOLS}, {"messages": [{"role": "user", "content": [IMAGE] * 20}]}]
)
def test_tools_and_image_parts_count_before_the_call(gateway, upstream, extra) -> None:
    sdk, _ = sdk_for(gateway, f"quota-{next(iter(extra))}", 2_000)
    upstream.reset()
    with pytest.raises(openai.RateLimitError) as info:
        sdk.chat.completions.create(**{"model": "gpt-4.1-mini", "messages": HI, **extra})
    assert "needs about" in info.value.message
    assert upstream.requests == []  # refused before anything was sent


def test_a_call_that_fits_is_never_refused(gateway, upstream) -> None:
    sdk, core = sdk_for(gateway, "quota-fits", 40)
    reply = sdk.chat.completions.create(model="gpt-4.1-mini", messages=HI)
    assert reply.choices[0].message.content
    assert last_upstream_body(upstream)["max_tokens"] < 40  # capped: the quota needs it
    assert spent(core, "quota-fits") <= 40


def test_plenty_left_means_no_cap(gateway, upstream) -> None:
    sdk, _ = sdk_for(gateway, "quota-plenty", 10_000_000)
    sdk.chat.completions.create(model="gpt-4.1-mini", messages=HI)
    sent = last_upstream_body(upstream)
    assert "max_tokens" not in sent and "max_completion_tokens" not in sent


def test_tokens_held_by_running_calls_are_not_used_up(gateway) -> None:
    sdk, core = sdk_for(gateway, "quota-held", 10_000)

    def call(_: int) -> str:
        try:
            sdk.chat.completions.create(model="slow-0.5", messages=HI, max_tokens=3_000)
            return "ok"
        except openai.RateLimitError as exc:
            assert "in progress" in exc.message and "used up" not in exc.message
            assert int(exc.response.headers["retry-after"]) <= 5
            return "held"

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(call, range(6)))
    # Each holds about 3,000 of 10,000: three run at once, the others are told to wait.
    assert outcomes.count("ok") >= 3 and outcomes.count("held") >= 1
    assert spent(core, "quota-held") <= 10_000


def test_the_cap_goes_under_the_parameter_the_model_takes() -> None:
    req = ChatRequest.model_validate({"messages": HI, "model": "o3", "max_tokens": 50})
    assert b'"max_completion_tokens":50' in _payload(
        {"messages": HI}, req, stream=False, cap_param="max_completion_tokens"
    )
    assert b'"max_tokens":50' in _payload(
        {"messages": HI}, req, stream=False, cap_param="max_tokens"
    )
    # The client's own parameter wins.
    body = {"messages": HI, "max_completion_tokens": 900}
    assert b'"max_completion_tokens":50' in _payload(
        body, req, stream=False, cap_param="max_tokens"
    )


def test_each_prompt_of_a_completions_call_gets_its_share(gateway, upstream) -> None:
    sdk, core = sdk_for(gateway, "quota-prompts", 2_000)
    sdk.completions.create(model="gpt-3.5-turbo-instruct", prompt=["a"] * 10, n=2)
    sent = [r for r in upstream.requests if r["path"] == "/v1/completions"][-1]["json"]
    assert 10 * 2 * sent["max_tokens"] <= 2_000
    assert spent(core, "quota-prompts") <= 2_000


def test_every_name_for_the_reply_length_is_held_and_capped(gateway, upstream) -> None:
    sdk, _ = sdk_for(gateway, "quota-aliases", 2_000)
    sdk.chat.completions.create(
        model="gpt-4.1-mini",
        messages=HI,
        max_completion_tokens=10,
        extra_body={"max_tokens": 100_000, "n_predict": 100_000},
    )
    sent = last_upstream_body(upstream)
    assert sent["max_tokens"] == sent["n_predict"] == sent["max_completion_tokens"] < 2_000


def test_every_field_of_a_message_counts(gateway, upstream) -> None:
    sdk, _ = sdk_for(gateway, "quota-fields", 2_000)
    upstream.reset()
    big = {"role": "assistant", "content": "ok", "refusal": "word " * 5_000}
    odd = {"role": "assistant", "content": "ok", "reasoning_content": "word " * 5_000}
    for message in (big, odd):
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(model="gpt-4.1-mini", messages=[message, *HI])
    assert upstream.requests == []


def test_n_as_a_string_counts_and_nonsense_is_refused(gateway, upstream) -> None:
    sdk, _ = sdk_for(gateway, "quota-n-string", 2_000)
    sdk.chat.completions.create(model="gpt-4.1-mini", messages=HI, extra_body={"n": "20"})
    assert 20 * last_upstream_body(upstream)["max_tokens"] <= 2_000
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="gpt-4.1-mini", messages=HI, extra_body={"n": "lots"})
    assert info.value.param == "n"


def test_a_reply_without_usage_is_still_billed(gateway) -> None:
    sdk, core = sdk_for(gateway, "quota-no-usage", 2_000)
    reply = sdk.chat.completions.create(model="no-usage", messages=HI)
    assert reply.usage is None
    assert spent(core, "quota-no-usage") > 0


def test_extra_message_fields_reach_the_upstream(gateway, upstream) -> None:
    sdk, _ = sdk_for(gateway, "quota-extra-fields", 100_000)
    messages = [{"role": "assistant", "content": "hi", "reasoning_content": "thought"}, *HI]
    sdk.chat.completions.create(model="gpt-4.1-mini", messages=messages)
    assert last_upstream_body(upstream)["messages"][0]["reasoning_content"] == "thought"


FILE_BY_ID = {"type": "file", "file": {"file_id": "file-abc"}}
ASK = {"type": "text", "text": "What does this file say?"}


def test_a_file_by_id_is_refused_under_a_daily_quota_naming_the_part(gateway, upstream) -> None:
    sdk, _ = sdk_for(gateway, "quota-file-id", 1_000_000)
    upstream.reset()
    file_id = FILE_BY_ID["file"]
    # A file_data that is null or empty carries nothing: the upstream reads the file by id.
    for file in (file_id, {**file_id, "file_data": None}, {**file_id, "file_data": ""}):
        messages = [{"role": "user", "content": [ASK, {"type": "file", "file": file}]}]
        with pytest.raises(openai.BadRequestError) as info:
            sdk.chat.completions.create(model="gpt-4.1-mini", messages=messages)
        assert info.value.param == "messages[0].content[1].file.file_id"
        assert "file_data" in info.value.message
        assert "retry-after" not in info.value.response.headers
    assert upstream.requests == []
    # Its content instead: counted by its size, and sent.
    data = {"type": "file", "file": {"file_data": "data:text/plain;base64,aGk=", "filename": "a"}}
    sdk.chat.completions.create(
        model="gpt-4.1-mini", messages=[{"role": "user", "content": [ASK, data]}]
    )
    assert last_upstream_body(upstream)["messages"][0]["content"][1] == data


def test_a_file_by_id_goes_through_for_a_caller_without_a_quota(gateway, upstream) -> None:
    served, core = gateway
    _, key = core.users.add("quota-none-file-id")
    sdk = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
    messages = [{"role": "user", "content": [ASK, FILE_BY_ID]}]
    reply = sdk.chat.completions.create(model="gpt-4.1-mini", messages=messages)
    assert (reply.choices[0].message.content or "").startswith("Echo: What does this file say?")
    assert last_upstream_body(upstream)["messages"][0]["content"][1] == FILE_BY_ID


def test_a_call_bigger_than_the_whole_day_is_not_told_to_wait(gateway, upstream) -> None:
    sdk, core = sdk_for(gateway, "quota-never-fits", 50)
    upstream.reset()
    with pytest.raises(openai.RateLimitError) as info:
        sdk.chat.completions.create(model="gpt-4.1-mini", messages=HI, n=60)
    assert "retry-after" not in info.value.response.headers
    assert "daily quota of 50 tokens" in info.value.message and "00:00" not in info.value.message
    assert upstream.requests == []
    rows = core.ledger.rows(users=["quota-never-fits"])
    assert list(rows["status"]) == ["refused"]


def test_n_replies_without_usage_are_billed_for_each(gateway) -> None:
    sdk, core = sdk_for(gateway, "quota-n-no-usage", 1_000_000)
    reply = sdk.chat.completions.create(model="no-usage", messages=HI, n=2, max_tokens=5)
    assert reply.usage is None
    core.ledger.flush()
    [row] = core.ledger.rows(users=["quota-n-no-usage"]).to_dict("records")
    # Estimated from the answer's size, bounded by what n replies of max_tokens can be.
    assert row["completion_tokens"] == 2 * 5


@pytest.mark.parametrize("model", ["usage-negative", "usage-huge", "usage-text"])
@pytest.mark.parametrize("stream", [False, True])
def test_usage_that_is_no_count_is_not_believed(gateway, upstream, model, stream) -> None:
    """An upstream's usage with a negative count, one past any column, or text: the call is
    answered, settled on our own count (its hold released), and the user's next call fits."""
    name = f"quota-bad-usage-{model}-{stream}"
    sdk, core = sdk_for(gateway, name, 2_000)
    for _ in range(2):  # the second would be refused if the first still held its tokens
        if stream:
            chunks = sdk.chat.completions.create(
                model=model, messages=HI, max_tokens=1_500, stream=True
            )
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            reply = sdk.chat.completions.create(model=model, messages=HI, max_tokens=1_500)
            assert reply.choices[0].message.content
    core.ledger.flush()
    rows = core.ledger.rows(users=[name]).to_dict("records")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(0 < r["prompt_tokens"] + r["completion_tokens"] < 1_000 for r in rows)
    assert 0 < spent(core, name) < 2_000
