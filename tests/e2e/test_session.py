"""Signing in and out, and the page at a phone's width, in a real browser."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from tests.conftest import ACCESS_KEY
from tests.e2e.conftest import DESKTOP, MOBILE, open_dashboard, screenshot

pytestmark = pytest.mark.e2e
NewContext = Callable[..., BrowserContext]


def sign_in(page: Page, user: str | None, key: str) -> None:
    """Fill the login form (user name unless None, then key) and submit it."""
    if user is not None:
        page.get_by_label("User name").fill(user)
    page.get_by_label("Access key").fill(key)
    page.get_by_role("button", name="Login").click()


def test_login_refuses_a_wrong_key_and_accepts_the_right_one(new_context: NewContext) -> None:
    page = new_context(user=None).new_page()
    page.goto("/")
    expect(page.get_by_role("button", name="Login")).to_be_visible()
    screenshot(page, "login", full_page=False)

    sign_in(page, "alice", "not-the-access-key")
    expect(page.get_by_role("alert")).to_have_text("Wrong user name or access key.")
    expect(page.get_by_label("User name")).to_have_value("alice")  # kept for the next try
    expect(page.get_by_text("Signed in as")).to_have_count(0)
    screenshot(page, "login-wrong-key", full_page=False)

    sign_in(page, None, f"{ACCESS_KEY} ")  # pasted with a trailing space
    expect(page.get_by_text("Signed in as alice")).to_be_visible()
    expect(page.get_by_role("tab", name="Chat")).to_be_visible()


def test_the_login_page_says_what_is_wrong(browser, upstream, tmp_path) -> None:
    """An empty name is refused with a message (not counted); a locked-out address sees the
    lockout and its wait, not a blank page. Its own app: the lockout must not touch others."""
    from tests.conftest import app_settings, serve
    from ui.server import create_app

    served = serve(create_app(app_settings(upstream, LOGIN_MAX_FAILURES="2",
                                           DATA_DIR=str(tmp_path))))  # fmt: skip
    context = browser.new_context(base_url=served.url, viewport=DESKTOP)
    try:
        page = context.new_page()
        page.goto("/")
        for _ in range(3):
            sign_in(page, "", ACCESS_KEY)
            expect(page.get_by_role("alert")).to_have_text("Enter your user name.")
        for _ in range(2):
            sign_in(page, "mallory", "a-guess")
            expect(page.get_by_role("alert")).to_have_text("Wrong user name or access key.")
        sign_in(page, "mallory", "another-guess")
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("Too many failed sign-ins from your address")
        expect(alert).to_contain_text("Try again in about")
        screenshot(page, "login-locked-out", full_page=False)
    finally:
        context.close()
        served.stop()


def test_logout_returns_to_the_login_page(new_context: NewContext) -> None:
    page = open_dashboard(new_context(user="leaving"))
    elsewhere = open_dashboard(new_context(user="leaving"))  # the same name on another device
    page.get_by_role("link", name="Log out").click()
    # A GET only asks (a link on another site cannot sign anyone out); the button POSTs.
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name="Login")).to_be_visible()
    expect(page.get_by_text("Signed in as")).to_have_count(0)
    # The session is really gone: a reload shows the login page again, not the dashboard.
    page.reload()
    expect(page.get_by_role("button", name="Login")).to_be_visible()
    # Only this browser's session ended, not every session of that user name.
    elsewhere.reload()
    expect(elsewhere.get_by_text("Signed in as leaving")).to_be_visible()


def test_the_dashboard_fits_a_phone(new_context: NewContext, tmp_path: Path) -> None:
    page = open_dashboard(new_context(viewport=MOBILE, has_touch=True, is_mobile=True))
    page.get_by_role("textbox", name="Message").fill("Hello from a phone")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_test_id("bot").last).to_contain_text("Echo: Hello from a phone")
    # The message box and its buttons stay on the first screen, all on one line (Stop takes
    # Send's place while a reply streams).
    for name in ("Send", "New chat"):
        expect(page.get_by_role("button", name=name)).to_be_in_viewport()
    screenshot(page, "mobile-chat", full_page=False)
    # No label spills out of its button ("Attach images" used to, past the screen's edge).
    spilled = page.evaluate(
        """[...document.querySelectorAll('.button-row button')]
             .filter((b) => b.offsetParent && b.scrollWidth > b.clientWidth + 1)
             .map((b) => b.innerText)"""
    )
    assert spilled == [], spilled
    # The model picker and system prompt come right after the chat (whose conversation scrolls
    # in its own box), before the list of saved chats: one screen's scroll away at most.
    picker = page.get_by_role("combobox", name="Model").first.bounding_box()
    system = page.get_by_label("System prompt").bounding_box()
    chats = page.locator("#chat-history").bounding_box()
    assert picker and system and chats
    assert picker["y"] < MOBILE["height"] * 2 and system["y"] < chats["y"]

    # Every tab is one tap away (not in a "..." menu), and none scrolls sideways.
    for name in ("Chat", "Completion", "Images", "Embeddings", "Models"):
        page.get_by_role("tab", name=name).click()
        expect(page.get_by_role("tab", name=name)).to_have_attribute("aria-selected", "true")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= MOBILE["width"], f"{name} is {width}px wide on a 390px screen"
        page.screenshot(path=tmp_path / f"{name}.png", full_page=True)


def test_usage_plots_stack_on_a_phone(new_context: NewContext) -> None:
    page = open_dashboard(new_context(viewport=MOBILE, has_touch=True, is_mobile=True))
    page.get_by_role("tab", name="Usage").click()
    page.get_by_role("button", name="Show").click()
    tokens = page.locator("#tokens-plot")
    cost = page.locator("#cost-plot")
    expect(tokens).to_be_visible()
    first, second = tokens.bounding_box(), cost.bounding_box()
    assert first and second
    assert second["y"] >= first["y"] + first["height"] - 1  # one under the other
    assert first["width"] > MOBILE["width"] * 0.8  # each the screen's width, titles whole
    screenshot(page, "mobile-usage")
