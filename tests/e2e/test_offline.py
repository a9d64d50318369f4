"""The offline default in a browser: the embedded demo model says what it is where people chat,
and what it cannot do is shown as unavailable before anyone tries (issue 12)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from core.config import load_settings
from tests.conftest import ACCESS_KEY, serve
from tests.e2e.conftest import DESKTOP, screenshot

pytestmark = [pytest.mark.e2e, pytest.mark.local_model]


@pytest.fixture(scope="module")
def offline_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ui.server import create_app

    data_dir = tmp_path_factory.mktemp("offline-data")
    # No key, no URL: the embedded model, as a fresh install starts.
    settings = load_settings(
        environ={"ACCESS_KEY": ACCESS_KEY, "DATA_DIR": str(data_dir)}, env_file=None
    )
    served = serve(create_app(settings))
    yield served.url
    served.stop()


@pytest.fixture
def offline(browser: Browser, offline_url: str) -> Iterator[Page]:
    context = browser.new_context(base_url=offline_url, viewport=DESKTOP)
    assert context.request.post("/login", form={"username": "alice", "password": ACCESS_KEY}).ok
    page = context.new_page()
    page.goto("/")
    expect(page.get_by_text("Signed in as")).to_be_visible()
    yield page
    context.close()


def test_the_demo_model_says_what_it_is_where_people_chat(offline: Page) -> None:
    notice = offline.locator("#chat-notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("Offline demo model")
    expect(notice).to_contain_text("SmolLM2-135M")
    for setting in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "LOCAL_MODEL_PATH"):
        expect(notice).to_contain_text(setting)
    offline.get_by_role("textbox", name="Message").fill("Say hello.")
    offline.get_by_role("button", name="Send").click()
    expect(offline.get_by_test_id("bot")).to_have_count(1, timeout=60_000)
    expect(offline.locator("#chat-status")).to_contain_text("tokens", timeout=60_000)
    screenshot(offline, "offline-chat")


def test_images_are_shown_unavailable_before_anyone_tries(offline: Page) -> None:
    offline.get_by_role("tab", name="Images").click()
    notice = offline.locator("#images-notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("no image model")
    expect(notice).to_contain_text("OPENAI_API_KEY")
    expect(offline.get_by_role("button", name="Generate")).to_be_disabled()
    picker = offline.get_by_role("combobox", name="Model").locator("visible=true")
    expect(picker).to_have_value("")  # no chat model offered as an image model
    screenshot(offline, "offline-images")


def test_the_models_tab_lists_what_the_backend_honours(offline: Page) -> None:
    offline.get_by_role("tab", name="Models").click()
    offline.get_by_text("Request fields this backend honours").click()
    honours = offline.locator("#models-honours")
    expect(honours).to_contain_text("response_format")
    expect(honours).to_contain_text("top_logprobs")
    expect(honours).to_contain_text("not served")  # images
    screenshot(offline, "offline-models")


def test_stop_in_mid_stream_on_the_embedded_model_leaves_no_error(offline: Page) -> None:
    """Three tries: Stop once the reply has begun keeps the words so far, marked stopped."""
    # Greedy (temperature 0): this question's reply is long every time, so Stop lands mid-way.
    temperature = offline.get_by_label("number input for Temperature")
    temperature.fill("0")
    temperature.press("Enter")
    for _ in range(3):
        offline.get_by_role("button", name="New chat").click()
        ask = "Count from 1 to 300, separated by commas."
        offline.get_by_role("textbox", name="Message").fill(ask)
        offline.get_by_role("button", name="Send").click()
        bot = offline.get_by_test_id("bot").first
        expect(bot).not_to_have_text("", timeout=60_000)
        offline.get_by_role("button", name="Stop").click()
        status = offline.locator("#chat-status")
        expect(status).to_contain_text("Stopped. The partial reply is kept.")
        expect(bot).to_contain_text("(stopped)")
        expect(offline.get_by_role("button", name="Send")).to_be_visible()
        expect(offline.locator(".error").locator("visible=true")).to_have_count(0)
        expect(offline.get_by_test_id("toast-body")).to_have_count(0)
    screenshot(offline, "offline-chat-stopped")


def test_an_image_on_the_embedded_model_is_refused_clearly_and_kept(
    offline: Page, tmp_path
) -> None:
    from tests.e2e.test_chat_images import attach, png

    offline.get_by_role("button", name="New chat").click()
    attach(offline, png(tmp_path / "red.png"))
    offline.get_by_role("textbox", name="Message").fill("What is in this picture?")
    offline.get_by_role("button", name="Send").click()
    status = offline.locator("#chat-status")
    expect(status).to_contain_text("does not support images")
    expect(status).to_contain_text("OPENAI_BASE_URL")
    # Nothing lost: the message and the image wait to be sent again.
    expect(offline.get_by_role("textbox", name="Message")).to_have_value("What is in this picture?")
    expect(offline.locator("#chat-attached")).to_contain_text("1 image attached")
