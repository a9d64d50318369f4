"""Browser fixtures: Debian's Chromium driven by Playwright, a fresh logged-in page per test."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    Playwright,
    expect,
    sync_playwright,
)
from starlette.routing import Mount

from tests.conftest import ACCESS_KEY, Served

# The system browser, never a Playwright download (`apt-get install -y chromium`).
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 860}
MOBILE = {"width": 390, "height": 844}
# Every run saves its screenshots in test-artifacts/ (git-ignored) to look at; `make screenshots`
# points this at docs/screenshots, what the README shows, to refresh them on purpose.
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / os.environ.get("SCREENSHOTS_DIR", "test-artifacts/screenshots")
# Gradio waits on the upstream and the queue; allow for a slow CI machine.
expect.set_options(timeout=15_000)


# One browser for the whole browser suite. Package scope, not session: Playwright's sync API
# keeps an event loop running while it is open, and the other tests call asyncio.run().
@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="package")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        # Fail, never skip: a missing browser must not pass CI quietly. .ci/run installs it.
        pytest.fail(
            f"Chromium not found at {CHROMIUM}. The browser tests use Debian's chromium: run "
            "`apt-get update && apt-get install -y chromium` (`make browser`; .ci/run does it), "
            "or set CHROMIUM_PATH to another Chromium binary.",
            pytrace=False,
        )
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def new_context(browser: Browser, running_app: Served) -> Iterator[Callable[..., BrowserContext]]:
    """Makes clean browser profiles (closed after the test); with `user`, already signed in."""
    made: list[BrowserContext] = []

    def make(*, user: str | None = "alice", fresh: bool = True, **options: Any) -> BrowserContext:
        options.setdefault("viewport", DESKTOP)
        context = browser.new_context(base_url=running_app.url, **options)
        made.append(context)
        if user is not None and fresh:
            # Saved chats outlive a test (the latest opens on load): each test starts with none.
            # The last test's events may still be running (a chat is saved after its reply
            # shows, and a closed page does not cancel that), so wait for them first.
            wait_for_idle_queue(running_app)
            store = running_app.server.config.app.state.core.conversations
            for chat in store.list(user, limit=10_000):
                store.delete(user, chat.id)
        if user is not None:
            # The same POST the login form sends; the session cookie lands in this context.
            form = {"username": user, "password": ACCESS_KEY}
            response = context.request.post("/login", form=form)
            assert response.ok, f"login failed: {response.status} {response.text()[:200]}"
        return context

    yield make
    for context in made:
        context.close()


def wait_for_idle_queue(running_app: Served, timeout: float = 30.0) -> None:
    """Until Gradio's queue has had no event waiting or running for 0.3 s (a request sent
    just before a page closed may still be on its way)."""
    dashboard = running_app.server.config.app.dashboard
    mount = next(r for r in dashboard.routes if isinstance(r, Mount))
    queue = mount.app.get_blocks()._queue
    deadline = time.monotonic() + timeout
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < 0.3:
        assert time.monotonic() < deadline, "the last test's events are still running"
        if len(queue) or queue.get_active_worker_count():
            idle_since = time.monotonic()
        time.sleep(0.05)


def open_dashboard(context: BrowserContext) -> Page:
    """The dashboard, once the header shows who is signed in (the page's load event ran)."""
    page = context.new_page()
    page.goto("/")
    expect(page.get_by_text("Signed in as")).to_be_visible()
    return page


@pytest.fixture
def page(new_context: Callable[..., BrowserContext]) -> Page:
    """The dashboard in a fresh browser context, signed in as 'alice' (as the screenshots show)."""
    return open_dashboard(new_context())


def screenshot(page: Page, name: str, *, full_page: bool = True) -> None:
    """Save <SCREENSHOTS>/<name>.png: the viewport's width, by default the page's height."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    # No hover highlight on the last button clicked, and no event still in progress.
    page.mouse.move(0, 0)
    busy = page.locator('[data-testid="status-tracker"]:not(.hide)').locator("visible=true")
    expect(busy).to_have_count(0)
    page.screenshot(path=path, full_page=full_page, animations="disabled")
