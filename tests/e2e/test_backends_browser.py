"""Several backends in the browser (issue 14): the pickers group models by backend, a chat goes to
the backend its model names, a failing one falls back, and the Models tab says who serves what."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.conftest import ACCESS_KEY
from tests.e2e.conftest import DESKTOP, screenshot
from tests.e2e.test_tabs import send
from tests.team import LOCAL, Team, running_team

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    with running_team(tmp_path_factory.mktemp("team-browser")) as running:
        yield running


@pytest.fixture
def team_page(browser: Browser, team: Team) -> Iterator[Page]:
    context = browser.new_context(base_url=team.url, viewport=DESKTOP)
    response = context.request.post("/login", form={"username": "carol", "password": ACCESS_KEY})
    assert response.ok
    page = context.new_page()
    page.goto("/")
    expect(page.get_by_text("Signed in as")).to_be_visible()
    yield page
    context.close()


def pick_model(page: Page, model: str) -> None:
    """Type a model id: the picker takes the option it names, shown as backend · model."""
    picker = page.get_by_role("combobox", name="Model").locator("visible=true")
    picker.fill(model)
    picker.press("Enter")
    expect(picker).to_have_value(re.compile(rf"(^|· ){re.escape(model)}$"))


def test_models_are_grouped_by_backend_and_routed(team_page: Page) -> None:
    page = team_page
    expect(page.locator(".app-header")).to_contain_text("6 backends")
    picker = page.get_by_role("combobox", name="Model").locator("visible=true")
    picker.click()
    options = page.get_by_role("option")
    for label in ("openai · gpt-4.1-mini", "claude · claude-sonnet-4-5", "ollama · llama3.2",
                  f"local · {LOCAL}"):  # fmt: skip
        expect(options.filter(has_text=label).first).to_be_visible()
    screenshot(page, "backends-picker", full_page=False)
    page.keyboard.press("Escape")

    pick_model(page, "claude-sonnet-4-5")
    send(page, "Hello Claude")
    expect(page.get_by_test_id("bot").last).to_contain_text("Claude echo: Hello Claude")

    # A model whose backend fails (529, overloaded) is answered by its fallback.
    pick_model(page, "claude-error-529")
    send(page, "Still there?")
    expect(page.get_by_test_id("bot").last).to_contain_text("Echo: Still there?")
    expect(page.locator("#chat-status")).to_contain_text("Last reply from gpt-4.1-mini")
    screenshot(page, "backends-fallback")


def test_the_models_tab_names_each_backend(team_page: Page) -> None:
    page = team_page
    page.get_by_role("tab", name="Models").click()
    table = page.locator("#models-table")
    expect(table).to_contain_text("claude-sonnet-4-5")
    expect(table.locator("th").first).to_contain_text("backend")
    page.get_by_role("textbox", name="Search").fill("ollama")
    expect(table).to_contain_text("llama3.2")
    expect(table).not_to_contain_text("claude-sonnet-4-5")
    page.get_by_text("Request fields each backend honours").click()
    expect(page.locator("#models-honours")).to_contain_text("claude")
    screenshot(page, "backends-models")
