"""Everyday chat moments in a real browser (issue 13): Stop before and during a reply, typing
while a reply streams, an out-of-range number. Each ends in a readable state: no error badge,
nothing lost, the status line saying what happened."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.e2e.conftest import screenshot
from tests.e2e.test_tabs import pick_model, send

pytestmark = pytest.mark.e2e


def no_error_badges(page: Page) -> None:
    """Gradio marks an output whose event failed with an 'Error' badge; none may show."""
    expect(page.locator(".error").locator("visible=true")).to_have_count(0)
    expect(page.get_by_test_id("toast-body")).to_have_count(0)


def test_stop_before_the_first_token_gives_the_question_back(page: Page) -> None:
    pick_model(page, "slow-4")
    send(page, "A question never answered")
    stop = page.get_by_role("button", name="Stop")
    expect(stop).to_be_visible()  # Send became Stop
    expect(page.get_by_role("button", name="Send")).to_be_hidden()
    stop.click()
    status = page.locator("#chat-status")
    expect(status).to_contain_text("Stopped before the reply began")
    expect(page.get_by_role("textbox", name="Message")).to_have_value("A question never answered")
    expect(page.get_by_test_id("bot")).to_have_count(0)
    expect(page.get_by_test_id("user")).to_have_count(0)
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    no_error_badges(page)
    screenshot(page, "chat-stopped-before-reply")

    pick_model(page, "gpt-4.1-mini")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_test_id("bot")).to_have_count(1)
    expect(page.get_by_test_id("user")).to_have_count(1)  # one question, not two in a row
    expect(page.get_by_test_id("bot")).to_contain_text("Echo: A question never answered")


def test_stop_in_mid_stream_keeps_the_partial_reply(page: Page, running_app) -> None:
    pick_model(page, "drip-0.4")
    send(page, "one two three four five six seven eight nine ten")
    bot = page.get_by_test_id("bot")
    expect(bot).to_contain_text("Echo: one")
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#chat-status")).to_contain_text("Stopped. The partial reply is kept.")
    expect(bot).to_contain_text("(stopped)")
    expect(bot).not_to_contain_text("ten")
    no_error_badges(page)
    screenshot(page, "chat-stopped")
    # The ledger says what happened: cancelled, not failed.
    ledger = running_app.server.config.app.state.core.ledger
    rows = ledger.rows(users=["alice"])
    assert rows.iloc[-1]["model"] == "drip-0.4" and rows.iloc[-1]["status"] == "cancelled"

    pick_model(page, "gpt-4.1-mini")
    send(page, "And now?")
    expect(page.get_by_test_id("bot")).to_have_count(2)
    expect(page.get_by_test_id("bot").last).to_contain_text("Echo: And now?")


def test_text_typed_while_a_reply_streams_is_kept(page: Page) -> None:
    pick_model(page, "drip-0.2")
    send(page, "alpha beta gamma delta")
    expect(page.get_by_test_id("bot")).to_contain_text("Echo: alpha")
    box = page.get_by_role("textbox", name="Message")
    box.fill("my next question")
    expect(page.locator("#chat-status")).to_contain_text("tokens")  # the reply has ended
    expect(box).to_have_value("my next question")


def test_an_out_of_range_number_is_named_in_the_status_line(page: Page) -> None:
    page.get_by_label("Max tokens").locator("visible=true").fill("-3")
    send(page, "Hello")
    status = page.locator("#chat-status")
    expect(status).to_contain_text("Max tokens must be a whole number")
    no_error_badges(page)
    expect(page.get_by_role("textbox", name="Message")).to_have_value("Hello")  # not sent
    screenshot(page, "chat-bad-number")

    page.get_by_role("tab", name="Embeddings").click()
    page.get_by_label("Dimensions").fill("-5")
    page.get_by_role("textbox", name="Texts, one per line").fill("a cat")
    page.get_by_role("button", name="Embed").click()
    expect(page.locator("#embeddings-status")).to_contain_text("Dimensions must be a whole")
    no_error_badges(page)


CONTRAST = """(selector) => {
    const el = document.querySelector(selector);
    const rgb = (c) => c.match(/[\\d.]+/g).slice(0, 3).map(Number);
    const lum = ([r, g, b]) => {
        const f = (v) => {
            v /= 255;
            return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
        };
        return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    let bg = null, node = el;
    while (node && !bg) {
        const c = getComputedStyle(node).backgroundColor;
        if (c && !c.startsWith("rgba(0, 0, 0, 0)") && c !== "transparent") bg = c;
        node = node.parentElement;
    }
    const [a, b] = [lum(rgb(getComputedStyle(el).color)), lum(rgb(bg || "rgb(255,255,255)"))];
    return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
}"""


def test_header_and_status_text_reach_wcag_aa_contrast(page: Page) -> None:
    send(page, "Hello")
    expect(page.locator("#chat-status")).to_contain_text("tokens")
    for selector in (".app-header .meta", "#chat-status p"):
        ratio = page.evaluate(CONTRAST, selector)
        assert ratio >= 4.5, f"{selector}: contrast {ratio:.2f}:1"
