"""Each tab doing its job in a real browser, as a person uses it; screenshots for the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect

from tests.e2e.conftest import screenshot
from tests.upstream import MODE_MODELS, REAL_MODELS

pytestmark = pytest.mark.e2e

# Records every text the last assistant message shows, to see a reply arrive in pieces.
WATCH_REPLY = """() => {
    window.replySeen = [];
    new MutationObserver(() => {
        const bots = document.querySelectorAll('[data-testid="bot"]');
        const text = bots.length ? bots[bots.length - 1].innerText : "";
        if (text && window.replySeen.at(-1) !== text) window.replySeen.push(text);
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def send(page: Page, text: str) -> None:
    page.get_by_role("textbox", name="Message").fill(text)
    page.get_by_role("button", name="Send").click()


def prompt_box(page: Page) -> Locator:
    """The visible tab's Prompt box (Completion and Images each have one)."""
    return page.get_by_role("textbox", name="Prompt", exact=True).locator("visible=true")


def pick_model(page: Page, name: str) -> None:
    """Type a model name into the visible tab's picker (it accepts any name)."""
    picker = page.get_by_role("combobox", name="Model").locator("visible=true")
    picker.fill(name)
    picker.press("Enter")
    expect(picker).to_have_value(name)


def test_chat_reply_streams_in_and_stays_after_a_second_message(page: Page) -> None:
    page.evaluate(WATCH_REPLY)
    words = (
        "Explain in one short paragraph why the sky looks blue during the day "
        "and turns red at sunset, for a curious ten year old."
    )
    send(page, words)
    bots = page.get_by_test_id("bot")
    expect(bots.last).to_contain_text(f"Echo: {words}")
    # The reply grew in the page piece by piece, not all at once at the end.
    seen = page.evaluate("window.replySeen")
    assert len(seen) >= 3, f"the reply did not stream: {seen}"
    # (A finished reply ends with its own token usage, which the page adds.)
    texts = [re.sub(r"\s*\d+ \+ \d+ tokens$", "", s) for s in seen]
    assert all(f"Echo: {words}".startswith(t) for t in texts), seen
    assert re.search(r"\d+ \+ \d+ tokens$", seen[-1]), seen[-1]

    send(page, "And a second question")
    expect(bots).to_have_count(2)
    expect(bots.first).to_contain_text(f"Echo: {words}")
    expect(bots.last).to_contain_text("Echo: And a second question")
    expect(page.get_by_test_id("user")).to_have_count(2)
    expect(page.locator("#chat-status")).to_contain_text("tokens")
    expect(page.get_by_role("textbox", name="Message")).to_have_value("")
    screenshot(page, "chat")


def test_an_upstream_failure_is_readable_and_keeps_the_conversation(page: Page) -> None:
    send(page, "First, a question that works")
    bots = page.get_by_test_id("bot")
    expect(bots.last).to_contain_text("Echo: First, a question that works")

    pick_model(page, "error-500")
    send(page, "This one fails")
    status = page.locator("#chat-status")
    expect(status).to_contain_text("Upstream error")
    expect(status).to_contain_text("status 500")
    expect(status).to_contain_text(re.compile(r"request id: req_\w+"))
    # Said once, in the status line: no toast repeating it.
    expect(page.get_by_test_id("toast-body")).to_have_count(0)
    # Nothing is lost: the earlier exchange stays, the failed message is back in the box.
    expect(bots).to_have_count(1)
    expect(bots.last).to_contain_text("Echo: First, a question that works")
    expect(page.get_by_role("textbox", name="Message")).to_have_value("This one fails")
    screenshot(page, "chat-error")

    pick_model(page, "gpt-4.1-mini")
    page.get_by_role("button", name="Send").click()
    expect(bots).to_have_count(2)
    expect(bots.last).to_contain_text("Echo: This one fails")


def test_completion_appears(page: Page) -> None:
    page.get_by_role("tab", name="Completion").click()
    prompt_box(page).fill("Once upon a time")
    page.get_by_role("button", name="Complete").click()
    output = page.locator("#completion-output textarea")
    expect(output).to_have_value(re.compile("completion of: Once upon a time"))
    expect(page.locator("#completion-status")).to_contain_text("tokens")
    screenshot(page, "completion")


def test_an_image_shows_in_the_gallery_and_downloads(page: Page, tmp_path: Path) -> None:
    page.get_by_role("tab", name="Images").click()
    prompt_box(page).fill("A lighthouse")
    page.get_by_role("slider", name="Number of images").fill("2")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#images-status")).to_contain_text("2 images from gpt-image-1")
    gallery = page.locator("#image-gallery")
    # The first image opens whole, with the second one's thumbnail beside it.
    expect(gallery.get_by_role("button", name="detailed view of selected image")).to_be_visible()
    expect(gallery.get_by_role("button", name="Thumbnail 2 of 2").first).to_be_visible()
    with page.expect_download() as download_info:
        gallery.get_by_role("button", name="Download").click()
    download = download_info.value
    path = tmp_path / download.suggested_filename
    download.save_as(path)
    assert path.suffix == ".png"
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    screenshot(page, "images")


def test_embeddings_show_the_table_the_similarity_and_a_csv(page: Page, tmp_path: Path) -> None:
    page.get_by_role("tab", name="Embeddings").click()
    texts = ["The cat sat on the mat.", "A cat sat on a mat.", "Stock markets fell sharply."]
    page.get_by_role("textbox", name="Texts, one per line").fill("\n".join(texts))
    page.get_by_role("button", name="Embed").click()
    expect(page.locator("#embeddings-status")).to_contain_text("3 texts · text-embedding-3-small")
    vectors = page.locator("#embeddings-vectors")
    for text in texts:
        expect(vectors).to_contain_text(text)
    similarity = page.locator("#embeddings-similarity")
    expect(similarity).to_be_visible()
    expect(similarity).to_contain_text("3. Stock markets fell sharply.")
    expect(similarity).to_contain_text("1.000")

    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download vectors (CSV)").click()
    path = tmp_path / "vectors.csv"
    download_info.value.save_as(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("text,d0,d1")
    assert lines[1].startswith("The cat sat on the mat.,")
    assert len(lines) == 1 + len(texts)
    screenshot(page, "embeddings")


def test_the_models_table_filters(page: Page) -> None:
    page.get_by_role("tab", name="Models").click()
    total = len(REAL_MODELS + MODE_MODELS)
    count = page.locator("#models-count")
    expect(count).to_contain_text(f"{total} of {total} models")
    table = page.locator("#models-table")
    expect(table).to_contain_text("gpt-4.1-mini")

    page.get_by_role("textbox", name="Search").fill("embedding")
    expect(count).to_contain_text(f"2 of {total} models")
    expect(table).to_contain_text("text-embedding-3-large")
    expect(table).not_to_contain_text("gpt-4.1-mini")

    page.get_by_role("textbox", name="Search").fill("")
    kind = page.get_by_role("combobox", name="Kind")
    kind.click()
    page.get_by_role("option", name="image").click()
    expect(count).to_contain_text(f"2 of {total} models")
    expect(table).to_contain_text("gpt-image-1")
    expect(table).to_contain_text("dall-e-3")
    expect(table).not_to_contain_text("text-embedding-3-large")

    kind.click()
    page.get_by_role("option", name="all").click()
    page.get_by_role("textbox", name="Search").fill("gpt")
    gpt = [m for m in REAL_MODELS + MODE_MODELS if "gpt" in m]
    expect(count).to_contain_text(f"{len(gpt)} of {total} models")
    expect(table).not_to_contain_text("whisper-1")
    screenshot(page, "models")


def test_usage_shows_what_was_just_used(page: Page) -> None:
    send(page, "Count this one")
    expect(page.get_by_test_id("bot").last).to_contain_text("Echo: Count this one")
    page.get_by_role("tab", name="Usage").click()
    page.get_by_role("button", name="Show").click()
    summary = page.locator(".usage-line").locator("visible=true").first
    expect(summary).to_contain_text("requests")
    expect(summary).to_contain_text("tokens")
    expect(page.get_by_role("tabpanel")).to_contain_text("alice")  # the by-user table
    screenshot(page, "usage")


def test_admin_actions_that_end_sessions_ask_first(page: Page) -> None:
    page.get_by_role("tab", name="Usage").click()
    page.get_by_text("Manage users (admins)").click()
    page.get_by_label("User name").fill("confirm-me")
    page.get_by_role("button", name="Add user").click()
    table = page.locator("#users-table")
    row = table.get_by_text("confirm-me", exact=True).locator("visible=true").first
    expect(row).to_be_visible()
    page.get_by_label("User name").fill("")
    row.click()  # a row fills the form
    expect(page.get_by_label("User name")).to_have_value("confirm-me")

    page.get_by_role("button", name="Disable").click()
    confirm = page.locator("#admin-confirm")
    expect(confirm).to_contain_text("Disable confirm-me?")
    page.get_by_role("button", name="Cancel").click()
    expect(confirm).to_be_hidden()
    expect(table).not_to_contain_text("disabled")

    page.get_by_role("button", name="Rotate key").click()
    expect(confirm).to_contain_text("Rotate the key of confirm-me?")
    screenshot(page, "admin-confirm")
    page.get_by_label("User name").fill("somebody-else")  # the name asked about is the one used
    page.get_by_role("button", name="Yes, do it").click()
    expect(page.locator("#admin-status")).to_contain_text("New key for confirm-me")
    expect(confirm).to_be_hidden()
