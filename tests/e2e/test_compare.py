"""Compare in a real browser: one prompt, two models streaming at once, each with its own
latency and tokens; one side failing leaves the other whole."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import Page, expect

from tests.e2e.conftest import screenshot

pytestmark = pytest.mark.e2e


def choose(page: Page, label: str, model: str) -> None:
    picker = page.get_by_role("combobox", name=label)
    picker.fill(model)
    picker.press("Enter")
    expect(picker).to_have_value(model)


def test_two_models_answer_side_by_side_at_once(page: Page) -> None:
    page.get_by_role("tab", name="Compare").click()
    choose(page, "Model A", "drip-0.2")
    choose(page, "Model B", "drip-0.2")
    page.get_by_role("textbox", name="Prompt", exact=True).locator("visible=true").fill(
        "one two three four"
    )
    started = time.monotonic()
    page.get_by_role("button", name="Compare").click()
    for side in ("a", "b"):
        expect(page.locator(f"#compare-{side}")).to_contain_text("Echo: one two three four")
        expect(page.locator(f"#compare-{side}-status")).to_contain_text("first token")
        expect(page.locator(f"#compare-{side}-status")).to_contain_text("tokens")
    # Each streams ~1 s of words: together, not one after the other (which takes ~2 s).
    assert time.monotonic() - started < 1.9
    screenshot(page, "compare")

    choose(page, "Model B", "error-500")
    page.get_by_role("button", name="Compare").click()
    expect(page.locator("#compare-b-status")).to_contain_text("status 500")
    expect(page.locator("#compare-a-status")).to_contain_text("first token")
    expect(page.locator("#compare-a")).to_contain_text("Echo: one two three four")
