"""Several backends in one process (issue 14): two OpenAI-compatible fakes, a fake of Anthropic's
Messages API, a fake of Hugging Face's router, one server that is down, and the embedded model,
all named in one BACKENDS_FILE. Routed by model id and by backend/model, with fallbacks,
through /v1 (the official openai SDK), gradio_client and the health and metrics endpoints."""

from __future__ import annotations

import asyncio
import base64
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from gradio_client import Client

from core.backends import Backend, from_settings, load_backends, parse_backends
from core.config import load_settings
from core.errors import ConfigError
from core.providers import build_provider
from core.router import Router
from tests.conftest import ACCESS_KEY, LOG_STREAM
from tests.team import HF_CHAT, HF_EMBED, HF_IMAGE, KEYS, LOCAL, Team, running_team


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    with running_team(tmp_path_factory.mktemp("team")) as running:
        yield running


def last_row(team: Team) -> dict:
    return team.core.ledger.rows().iloc[-1].to_dict()


def chat(team: Team, model: str, text: str = "Hello there", **kwargs: object) -> str:
    reply = team.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **kwargs
    )
    return reply.choices[0].message.content or ""


# ---- routing ------------------------------------------------------------------------------


def test_every_backends_models_are_listed_with_the_backend_named(team: Team) -> None:
    listed = {m.id: m.model_extra["backend"] for m in team.client.models.list()}
    assert listed["gpt-4.1-mini"] == "openai"
    assert listed["claude-sonnet-4-5"] == "claude"
    assert listed["llama3.2"] == "ollama"  # what the server lists ("*")
    assert listed[HF_CHAT] == "hf"
    assert listed[LOCAL] == "local"
    assert listed["down-model"] == "down"  # named in the file: listed even while it is down
    # Every id listed routes back to its backend.
    for model_id, backend in listed.items():
        route = asyncio.run(team.core.service.router.resolve("chat", model_id))
        assert route.name == backend, model_id


@pytest.mark.parametrize(
    ("model", "backend", "reply"),
    [
        ("gpt-4.1-mini", "openai", "Echo: Hello there"),
        ("llama3.2", "ollama", "Echo: Hello there"),
        ("ollama/qwen2.5-coder", "ollama", "Echo: Hello there"),
        ("claude-sonnet-4-5", "claude", "Claude echo: Hello there"),
        ("claude/claude-sonnet-4-5", "claude", "Claude echo: Hello there"),
        (HF_CHAT, "hf", "HF echo: Hello there"),
        (f"hf/{HF_CHAT}", "hf", "HF echo: Hello there"),
    ],
)
def test_a_model_id_or_backend_prefix_picks_the_backend(
    team: Team, model: str, backend: str, reply: str
) -> None:
    assert chat(team, model) == reply
    row = last_row(team)
    assert (
        row["provider"] == backend and row["model"] == model.split("/", 1)[-1]
        if model.startswith(backend + "/")
        else row["provider"] == backend
    )


def test_the_embedded_model_is_one_backend_among_them(team: Team) -> None:
    text = chat(team, LOCAL, "Say hi", max_tokens=8, temperature=0)
    assert text
    assert last_row(team)["provider"] == "local"


def test_an_unknown_model_says_which_backends_were_asked(team: Team) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        chat(team, "no-such-model")
    message = info.value.message
    for name in ("openai", "claude", "ollama", "hf", "down", "local"):
        assert name in message
    assert info.value.code == "model_not_found"


def test_a_function_the_backend_does_not_serve_is_refused_by_name(team: Team) -> None:
    # The caller's to fix (a 400 the SDK does not retry), naming the backends that serve it.
    with pytest.raises(openai.BadRequestError) as info:
        team.client.embeddings.create(model="claude-sonnet-4-5", input="hi")
    assert "claude" in info.value.message and "embeddings" in info.value.message
    assert "openai" in info.value.message  # a backend that does


# ---- fallbacks ----------------------------------------------------------------------------


def test_a_failing_model_falls_back_and_the_ledger_names_who_answered(team: Team) -> None:
    before = _metric(
        team, 'dashboard_fallbacks_total{backend="claude",function="chat",to="openai"}'
    )
    assert chat(team, "claude-error-529") == "Echo: Hello there"  # the OpenAI fake's words
    row = last_row(team)
    assert (row["provider"], row["model"], row["status"]) == ("openai", "gpt-4.1-mini", "ok")
    after = _metric(team, 'dashboard_fallbacks_total{backend="claude",function="chat",to="openai"}')
    assert after == before + 1


def test_a_fallback_gets_the_whole_request_and_names_its_model(team: Team) -> None:
    """From Anthropic's typed path to an OpenAI-compatible server: tools and sampling go too."""
    team.openai.reset()
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    reply = team.client.chat.completions.create(
        model="claude-error-529",
        messages=[{"role": "user", "content": "Look it up"}],
        tools=tools,
        tool_choice="auto",
        top_p=0.5,
        max_tokens=30,
    )
    sent = [r for r in team.openai.requests if r["path"] == "/v1/chat/completions"][-1]["json"]
    assert sent["model"] == "gpt-4.1-mini"
    assert sent["tools"] == tools and sent["tool_choice"] == "auto" and sent["top_p"] == 0.5
    assert sent["max_tokens"] == 30
    assert reply.model == "gpt-4.1-mini"  # the model that answered, as OpenAI reports it


def test_a_fallback_streams_too(team: Team) -> None:
    stream = team.client.chat.completions.create(
        model="claude-error-529",
        messages=[{"role": "user", "content": "Stream it"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: Stream it"
    assert chunks[-1].usage is not None
    assert {c.model for c in chunks} == {"gpt-4.1-mini"}


def test_a_429_falls_back_to_the_embedded_model(team: Team) -> None:
    assert chat(team, "claude-error-429", "Say hi", max_tokens=4, temperature=0)
    assert last_row(team)["provider"] == "local"


def test_a_down_backend_falls_back_passing_bytes_through(team: Team) -> None:
    assert chat(team, "down-model") == "Echo: Hello there"
    assert last_row(team)["provider"] == "ollama"


def test_errors_that_are_the_callers_do_not_fall_back(team: Team) -> None:
    with pytest.raises(openai.BadRequestError):
        chat(team, "claude-error-400")
    assert last_row(team)["provider"] == "claude"


def test_the_dashboard_api_routes_and_falls_back_too(team: Team) -> None:
    client = Client(team.url, auth=("gradio-team", ACCESS_KEY), verbose=False)
    messages = [{"role": "user", "content": "From a script"}]
    assert client.predict(messages, "claude-sonnet-4-5", api_name="/chat") == (
        "Claude echo: From a script"
    )
    assert client.predict(messages, "claude-error-529", api_name="/chat") == "Echo: From a script"
    assert last_row(team)["provider"] == "openai"
    models = client.predict(api_name="/models")
    assert {"claude-sonnet-4-5", "llama3.2", LOCAL} <= {m["id"] for m in models}


# ---- Anthropic, through OpenAI's API ------------------------------------------------------


def test_an_openai_chat_request_reaches_anthropic_field_by_field(team: Team) -> None:
    team.claude.requests.clear()
    picture = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    reply = team.client.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{picture}"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ]},
        ],
        temperature=0.3,
        top_p=0.9,
        max_tokens=40,
        stop=["STOP"],
    )  # fmt: skip
    sent = team.claude.requests[-1]
    assert sent["model"] == "claude-sonnet-4-5"
    assert sent["system"] == "Be brief.\n\nAnswer in English."
    assert sent["max_tokens"] == 40 and sent["stop_sequences"] == ["STOP"]
    assert sent["temperature"] == 0.3 and sent["top_p"] == 0.9
    assert sent["stream"] is True
    assert sent["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": picture}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]}]  # fmt: skip
    answer = reply.choices[0]
    assert answer.message.content.startswith("Claude echo: What is this?")
    assert "[images: 2]" in answer.message.content
    assert answer.finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.model == "claude-sonnet-4-5"


def test_tool_calls_and_tool_results_round_trip_through_anthropic(team: Team) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    first = team.client.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=tools,
        tool_choice="required",
    )
    sent = team.claude.requests[-1]
    assert sent["tools"] == [{"name": "get_weather", "description": "The weather in a city",
                              "input_schema": tools[0]["function"]["parameters"]}]  # fmt: skip
    assert sent["tool_choice"] == {"type": "any"}
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name) == ("toolu_01A", "get_weather")
    assert call.function.arguments == '{"city": "Paris", "unit": "celsius"}'  # pieces joined

    second = team.client.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
        ],
        tools=tools,
    )
    sent = team.claude.requests[-1]
    assert sent["messages"][1] == {"role": "assistant", "content": [
        {"type": "text", "text": "Claude echo: Weather in Paris?"},
        {"type": "tool_use", "id": "toolu_01A", "name": "get_weather",
         "input": {"city": "Paris", "unit": "celsius"}}]}  # fmt: skip
    result = {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "18 C and sunny"}
    assert sent["messages"][2] == {"role": "user", "content": [result]}
    assert second.choices[0].message.content == "Tool said: 18 C and sunny"


def test_tool_calls_stream_in_openais_shape(team: Team) -> None:
    stream = team.client.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[{"type": "function", "function": {"name": "w", "parameters": {}}}],
        tool_choice={"type": "function", "function": {"name": "w"}},
        stream=True,
    )
    calls = [tc for c in stream if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(c.index, c.function.name) for c in calls] == [(0, "w")]
    assert team.claude.requests[-1]["tool_choice"] == {"type": "tool", "name": "w"}


def test_an_overloaded_error_inside_the_stream_falls_back_too(team: Team) -> None:
    """Anthropic reports overload as an error event after its 200: still a 5xx-like failure
    before the first byte, so the fallback answers; after the first byte, the stream is cut."""
    assert chat(team, "claude-overloaded-early") == "Echo: Hello there"
    assert last_row(team)["provider"] == "openai"
    with pytest.raises(openai.InternalServerError) as info:
        chat(team, "claude-cut-stream")  # words came, then the error: cut, not "your fault"
    assert info.value.status_code == 502


def test_answers_from_anthropic_carry_no_other_backends_fingerprint(team: Team) -> None:
    reply = team.client.chat.completions.create(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "Hi"}]
    )
    assert reply.system_fingerprint is None
    local = team.client.chat.completions.create(
        model=LOCAL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert local.system_fingerprint == "fp_embedded_llama_cpp"


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "user", "content": "Hi", "name": "ann"}, "messages.0.name"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "https://example.com/a.png", "detail": "high"}}]},
         "messages.0.content.0.image_url.detail"),
        ({"role": "user", "content": [{"type": "text", "text": "x", "cache": 1}]},
         "messages.0.content.0.cache"),
        ({"role": "user", "content": ""}, "messages.0.content"),
    ],
)  # fmt: skip
def test_message_fields_anthropic_has_no_equivalent_for_are_refused(
    team: Team, message: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        team.client.chat.completions.create(model="claude-sonnet-4-5", messages=[message])
    assert info.value.param == param


def test_a_system_message_after_the_conversation_began_is_refused(team: Team) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief"}]
    with pytest.raises(openai.BadRequestError) as info:
        team.client.chat.completions.create(model="claude-sonnet-4-5", messages=messages)
    assert info.value.param == "messages.1.role"
    with pytest.raises(openai.BadRequestError) as info:
        chat(team, "claude-sonnet-4-5", stop=[""])
    assert info.value.param == "stop"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}, "strict": True}}]
    with pytest.raises(openai.BadRequestError) as info:
        chat(team, "claude-sonnet-4-5", tools=tools)
    assert info.value.param == "tools.0.function.strict"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 1.5}, "temperature"),
        ({"logprobs": True}, "logprobs"),
        ({"seed": 7}, "seed"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_what_anthropic_has_no_equivalent_for_is_refused_by_name(
    team: Team, fields: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(team, "claude-sonnet-4-5", **fields)
    assert info.value.param == param


def test_anthropic_errors_come_back_in_openais_shape(team: Team) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(team, "claude-error-400")
    assert "Fake failure 400" in info.value.message
    stream = team.client.chat.completions.create(
        model="claude-cut-stream", messages=[{"role": "user", "content": "Go on"}], stream=True
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


# ---- Hugging Face ---------------------------------------------------------------------------


def test_hugging_face_chat_embeddings_and_images(team: Team) -> None:
    stream = team.client.chat.completions.create(
        model=HF_CHAT, messages=[{"role": "user", "content": "Hi HF"}], stream=True, max_tokens=20
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "HF echo: Hi HF"
    )
    sent = team.hf.requests[-1]["json"]
    assert sent["model"] == HF_CHAT and sent["max_tokens"] == 20

    vectors = team.client.embeddings.create(model=HF_EMBED, input=["one", "two"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 8
    assert team.hf.requests[-1]["path"].endswith(f"{HF_EMBED}/pipeline/feature-extraction")

    image = team.client.images.generate(model=HF_IMAGE, prompt="a red square", size="1024x1024")
    assert base64.b64decode(image.data[0].b64_json).startswith(b"\x89PNG")
    assert team.hf.requests[-1]["json"]["parameters"] == {"width": 1024, "height": 1024}
    assert last_row(team)["provider"] == "hf"


def test_hugging_face_tool_calls_arrive_whole(team: Team) -> None:
    reply = team.client.chat.completions.create(
        model=HF_CHAT,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[{"type": "function", "function": {"name": "weather", "parameters": {}}}],
    )
    call = reply.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("weather", '{"city": "Oslo"}')


# ---- health, prices, secrets ------------------------------------------------------------------


def test_one_backend_down_is_degraded_not_down(team: Team) -> None:
    health = httpx.get(team.url + "/health").json()
    assert health["status"] == "degraded"
    states = {b["name"]: b["reachable"] for b in health["backends"]}
    assert states == {"openai": True, "claude": True, "ollama": True, "hf": True,
                      "down": False, "local": True}  # fmt: skip
    keys = {b["name"]: b["key_set"] for b in health["backends"]}
    assert keys["openai"] and keys["claude"] and keys["hf"] and not keys["ollama"]
    assert chat(team, "gpt-4.1-mini")  # the others keep serving


def test_prices_per_backend_cost_their_calls(team: Team) -> None:
    chat(team, "claude-sonnet-4-5", "one two three")
    row = last_row(team)
    expected = (row["prompt_tokens"] * 3 + row["completion_tokens"] * 15) / 1_000_000
    assert row["cost_usd"] == pytest.approx(expected) and row["cost_usd"] > 0


def test_no_backend_key_appears_anywhere(team: Team) -> None:
    health = httpx.get(team.url + "/health").text
    with pytest.raises(openai.BadRequestError) as info:
        chat(team, "claude-error-400")
    for key in KEYS.values():
        assert key not in health and key not in str(info.value) and key not in LOG_STREAM.getvalue()


def _metric(team: Team, sample: str) -> float:
    text = httpx.get(team.url + "/metrics", headers={"Authorization": f"Bearer {ACCESS_KEY}"}).text
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


# ---- the file ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("backends: []", "backends: List should have at least 1 item"),
        ("backends:\n  - {name: a, kind: bedrock}", "backends[0] (a).kind"),
        ("backends:\n  - {name: a, kind: openai, api_key: sk-123}", "api_key_env"),
        ("backends:\n  - {name: a, kind: openai}\n  - {name: a, kind: local}", "unique"),
        ("backends:\n  - {name: a, kind: openai, base_url: ftp://x}", "backends[0] (a).base_url"),
        ("backends:\n  - {name: a, kind: openai, fallbacks: {m: [m]}}", "fall back to itself"),
        # A key pasted where the variable's NAME goes is refused, and not repeated.
        ("backends:\n  - {name: g, kind: openai, api_key_env: gsk_A1b2C3d4e5}", "api_key_env"),
        ("backends:\n  - {name: a, kind: openai, base_url: 'http://h/v1?key=AIzaSyX'}", "query"),
        ("backends:\n  - {name: a, kind: openai, base_url: 'https://u:pw@h/v1'}", "password"),
        ("backends:\n  - {name: a, kind: openai}\n  - {name: A, kind: local}", "unique"),
        # The ledger's provider column holds the name: 16 characters at most.
        (
            "backends:\n  - {name: openrouter-eu-west-1, kind: openai}",
            "backends[0] (openrouter-eu-west-1).name",
        ),
        ("backends:\n  - {name: a, kind: openai, kind: local}", "given twice"),
        ("backends: [", "not valid YAML"),
        ("- just a list", "'backends:'"),
    ],
)
def test_a_wrong_backends_file_says_what_and_where(text: str, said: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_backends(text)
    assert said in str(info.value)
    for secret in ("sk-123", "gsk_A1b2", "AIzaSyX", ":pw@"):
        assert secret not in str(info.value)


def test_the_file_may_be_toml(tmp_path: Path) -> None:
    toml = textwrap.dedent(
        """
        [[backends]]
        name = "claude"
        kind = "anthropic"
        api_key_env = "ANTHROPIC_API_KEY"
        models = ["claude-sonnet-4-5"]
        """
    )
    spec = parse_backends(toml, toml=True)
    assert spec.backends[0].name == "claude"
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="BACKENDS_FILE"):
        load_settings(environ={"BACKENDS_FILE": str(missing)}, env_file=None)


def test_a_backends_failure_names_the_backend(team: Team) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        chat(team, "claude-error-500")
    assert "claude" in info.value.message and "500" in info.value.message


def test_the_readmes_backends_file_is_valid_as_written() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("```yaml\nbackends:", 1)[1].split("```", 1)[0]
    spec = parse_backends("backends:" + block)
    assert [b.name for b in spec.backends] == ["openai", "claude", "ollama", "local"]
    assert spec.backends[1].fallbacks == {"claude-sonnet-4-5": ["openai/gpt-4.1-mini"]}


def test_the_issues_file_form_works_as_written() -> None:
    """The form the team asked for, with the ollama server listing everything."""
    text = """
backends:
  - name: openai
    kind: openai
    base_url: https://api.openai.com/v1
    api_key_env: OPENAI_API_KEY
    models: [gpt-4.1-mini, text-embedding-3-small, gpt-image-1]
  - name: claude
    kind: anthropic
    base_url: https://api.anthropic.com
    api_key_env: ANTHROPIC_API_KEY
    models: [claude-sonnet-4-5]
    fallbacks: {claude-sonnet-4-5: [openai/gpt-4.1-mini]}
  - name: ollama
    kind: openai
    base_url: http://localhost:11434/v1
    models: "*"            # whatever the server lists
  - name: local
    kind: local
"""
    spec = parse_backends(text)
    assert spec.backends[2].lists_everything() and spec.backends[3].kind == "local"


def test_a_key_variable_that_is_not_set_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "backends.yaml"
    path.write_text("backends:\n  - {name: claude, kind: anthropic, api_key_env: NOT_SET_KEY}")
    with pytest.raises(
        ConfigError, match="'claude' takes its key from NOT_SET_KEY, which is not set"
    ):
        load_backends(path, environ={})


def test_routing_rules_in_a_file(tmp_path: Path) -> None:
    """A file of one backend still routes by backend/model (only the variables' one backend
    takes every id as it is); an id a list names exactly wins over a backend-name prefix."""
    settings = load_settings(environ={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, env_file=None)
    text = """
backends:
  - {name: openai, kind: openai, base_url: "http://127.0.0.1:9/v1", models: [gpt-4o]}
  - {name: openrouter, kind: openai, base_url: "http://127.0.0.1:9/api/v1",
     models: [openai/gpt-4o, anthropic/claude-3.5-sonnet]}
"""
    backends = [Backend(spec=b) for b in parse_backends(text).backends]
    router = Router.of(backends, lambda b: build_provider(settings, b))
    resolve = lambda model: asyncio.run(router.resolve("chat", model))  # noqa: E731
    assert (resolve("openai/gpt-4o").name, resolve("openai/gpt-4o").model) == (
        "openrouter", "openai/gpt-4o")  # fmt: skip
    assert (resolve("gpt-4o").name, resolve("openrouter/openai/gpt-4o").model) == (
        "openai", "openai/gpt-4o")  # fmt: skip
    one = Router.of(backends[:1], lambda b: build_provider(settings, b))
    route = asyncio.run(one.resolve("chat", "openai/gpt-4o"))
    assert (route.name, route.model) == ("openai", "gpt-4o")  # the file's backend, by name
    shorthand = Router.of(from_settings(settings), lambda b: build_provider(settings, b))
    assert asyncio.run(shorthand.resolve("chat", "openai/gpt-4o")).model == "openai/gpt-4o"
