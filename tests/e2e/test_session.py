"""Signing in and out, and the page at a phone's width, in a real browser."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from tests.conftest import ACCESS_KEY
from tests.e2e.conftest import MOBILE, open_dashboard, screenshot

pytestmark = pytest.mark.e2e
NewContext = Callable[..., BrowserContext]


def sign_in(page: Page, user: str, key: str) -> None:
    """Fill Gradio's login form (user name, then key) and submit it."""
    fields = page.locator("input")
    fields.nth(0).fill(user)
    fields.nth(1).fill(key)
    page.get_by_role("button", name="Login").click()


def test_login_refuses_a_wrong_key_and_accepts_the_right_one(new_context: NewContext) -> None:
    page = new_context(user=None).new_page()
    page.goto("/")
    expect(page.get_by_role("button", name="Login")).to_be_visible()
    screenshot(page, "login", full_page=False)

    sign_in(page, "alice", "not-the-access-key")
    expect(page.get_by_text("Incorrect Credentials")).to_be_visible()
    expect(page.get_by_text("Signed in as")).to_have_count(0)

    sign_in(page, "alice", ACCESS_KEY)
    expect(page.get_by_text("Signed in as alice")).to_be_visible()
    expect(page.get_by_role("tab", name="Chat")).to_be_visible()


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

    # Every tab is one tap away (not in a "..." menu), and none scrolls sideways.
    for name in ("Chat", "Completion", "Images", "Embeddings", "Models"):
        page.get_by_role("tab", name=name).click()
        expect(page.get_by_role("tab", name=name)).to_have_attribute("aria-selected", "true")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= MOBILE["width"], f"{name} is {width}px wide on a 390px screen"
        page.screenshot(path=tmp_path / f"{name}.png", full_page=True)
