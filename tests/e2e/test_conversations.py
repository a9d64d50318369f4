"""Saved conversations in a real browser (issue 13): kept across reloads and devices, listed
newest first, renamed, searched, deleted, exported and imported; retry, edit and undo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.e2e.conftest import open_dashboard, screenshot
from tests.e2e.test_tabs import send

pytestmark = pytest.mark.e2e


def chat_list(page: Page):
    return page.locator("#chat-list label")


def test_a_chat_is_kept_across_reloads_and_devices(page: Page, new_context) -> None:
    send(page, "Plan a picnic\nfor six people")
    expect(page.get_by_test_id("bot").last).to_contain_text("Echo: Plan a picnic")
    send(page, "With a vegan option")
    expect(page.get_by_test_id("bot")).to_have_count(2)
    expect(chat_list(page)).to_have_count(1)
    expect(chat_list(page).first).to_have_text("Plan a picnic")  # the first line
    expect(page.get_by_test_id("bot").last).to_contain_text("tokens")  # each reply's usage

    page.reload()
    expect(page.get_by_test_id("bot")).to_have_count(2)
    expect(page.get_by_test_id("bot").last).to_contain_text("Echo: With a vegan option")

    elsewhere = open_dashboard(new_context(fresh=False))  # another device, same user
    expect(elsewhere.get_by_test_id("bot")).to_have_count(2)
    someone_else = open_dashboard(new_context(user="bob"))
    expect(someone_else.get_by_test_id("bot")).to_have_count(0)
    expect(chat_list(someone_else)).to_have_count(0)

    page.get_by_role("button", name="New chat").click()
    expect(page.get_by_test_id("bot")).to_have_count(0)
    send(page, "Second topic entirely")
    expect(page.get_by_test_id("bot").last).to_contain_text("Echo: Second topic")
    expect(chat_list(page)).to_have_count(2)
    expect(chat_list(page).first).to_have_text("Second topic entirely")  # newest first
    screenshot(page, "conversations")

    chat_list(page).nth(1).click()  # back to the picnic
    expect(page.get_by_test_id("bot")).to_have_count(2)
    page.get_by_label("Search chats").fill("vegan")
    expect(chat_list(page)).to_have_count(1)
    page.get_by_label("Search chats").fill("")
    expect(chat_list(page)).to_have_count(2)


def test_rename_delete_export_and_import(page: Page, tmp_path: Path) -> None:
    send(page, "Something to keep")
    expect(page.get_by_test_id("bot").last).to_contain_text("Echo: Something to keep")
    page.get_by_text("This chat").click()
    page.get_by_label("Title").fill("Kept thoughts")
    page.get_by_role("button", name="Rename").click()
    expect(chat_list(page).first).to_have_text("Kept thoughts")

    page.get_by_role("button", name="Export .json").click()
    link = page.locator("#chat-export a").first
    expect(link).to_be_visible()
    with page.expect_download() as download:
        link.click()
    exported = tmp_path / "conversation.json"
    download.value.save_as(exported)
    data = json.loads(exported.read_text())
    assert data["title"] == "Kept thoughts" and data["model"] == "gpt-4.1-mini"
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]

    page.get_by_role("button", name="Export .md").click()
    with page.expect_download() as download:
        page.locator("#chat-export a").first.click()
    markdown = tmp_path / "conversation.md"
    download.value.save_as(markdown)
    assert markdown.read_text().startswith("# Kept thoughts")

    page.get_by_role("button", name="Delete").click()
    expect(chat_list(page)).to_have_count(0)
    expect(page.get_by_test_id("bot")).to_have_count(0)

    with page.expect_file_chooser() as chooser:
        page.locator("#chat-import").click()
    chooser.value.set_files(str(exported))
    expect(chat_list(page)).to_have_count(1)
    expect(chat_list(page).first).to_have_text("Kept thoughts")
    expect(page.get_by_test_id("bot").last).to_contain_text("Echo: Something to keep")


def test_retry_edit_and_undo(page: Page) -> None:
    send(page, "First question")
    expect(page.get_by_test_id("bot").last).to_contain_text("Echo: First question")
    send(page, "Second question")
    bots = page.get_by_test_id("bot")
    expect(bots).to_have_count(2)

    page.locator("#chatbot").get_by_role("button", name="Retry").click()
    expect(page.locator("#chat-status")).to_contain_text("tokens")
    expect(bots).to_have_count(2)
    expect(bots.last).to_contain_text("Echo: Second question")

    page.locator("#chatbot").get_by_role("button", name="Undo").click()
    expect(bots).to_have_count(1)
    expect(page.get_by_role("textbox", name="Message")).to_have_value("Second question")

    user = page.get_by_test_id("user").first
    user.hover()
    page.locator("#chatbot").get_by_role("button", name="Edit").first.click()
    editor = page.locator("#chatbot textarea")
    editor.fill("An edited first question")
    page.locator("#chatbot").get_by_role("button", name="Submit").click()
    expect(bots).to_have_count(1)
    expect(bots.last).to_contain_text("Echo: An edited first question")
    expect(page.get_by_test_id("user")).to_have_count(1)
    screenshot(page, "chat-edited")


def test_editing_a_question_with_a_code_block_keeps_all_of_it(page: Page) -> None:
    """The Chatbot edits each part of such a question in a box of its own and reports each
    one: the changed part goes back into the whole question, and the chat runs once."""
    chat = page.locator("#chatbot")
    send(page, "Why does this fail?\n```py\nif a < b:\n    print('<x>')\n```\nThanks")
    expect(page.locator("#chat-status")).to_contain_text("tokens")
    page.get_by_test_id("user").first.hover()
    chat.get_by_role("button", name="Edit").first.click()
    boxes = chat.locator("textarea")
    expect(boxes).to_have_count(3)  # the text, the code block, the text after it
    expect(boxes.nth(1)).to_have_value("```py\nif a < b:\n    print('<x>')\n```\n")
    boxes.nth(1).fill("```py\nif a <= b:\n    print('<y>')\n```\n")
    chat.get_by_role("button", name="Submit").click()
    # The echo of the whole edited question: every part of it, in one reply.
    expect(chat).to_contain_text("Echo: Why does this fail?")
    expect(chat).to_contain_text("print('<y>')")
    expect(page.locator("#chat-status")).to_contain_text("tokens")
    text = chat.inner_text()
    assert text.count("Echo:") == 1 and "print('<x>')" not in text, text
    assert text.count("Thanks") == 2, text  # in the question and in its echo
    page.reload()  # and that is what was saved
    expect(chat).to_contain_text("if a <= b:")
    assert page.locator("#chatbot").inner_text().count("Echo:") == 1
    screenshot(page, "chat-edited-code")


def test_a_chat_too_full_to_save_a_reply_refuses_the_question_first(
    page: Page, monkeypatch
) -> None:
    """Nothing is asked whose reply could not be saved: the question stays in the box, the
    chat as saved keeps every exchange, and a new chat takes the question."""
    from core import conversations

    send(page, "A first question " + "x" * 600)
    expect(page.locator("#chat-status")).to_contain_text("tokens")
    monkeypatch.setattr(conversations, "MAX_CONVERSATION_BYTES", 2_000)
    monkeypatch.setattr(conversations, "REPLY_ROOM", 1_000)
    send(page, "A second question")
    expect(page.locator("#chat-status")).to_contain_text("would not fit")
    expect(page.locator("#chat-status")).to_contain_text("Start a new chat")
    expect(page.get_by_role("textbox", name="Message")).to_have_value("A second question")
    screenshot(page, "chat-too-full")
    assert page.locator("#chatbot").inner_text().count("Echo:") == 1
    page.reload()
    expect(page.locator("#chatbot")).to_contain_text("Echo: A first question")
    page.get_by_role("button", name="New chat").click()
    send(page, "A second question")
    expect(page.locator("#chatbot")).to_contain_text("Echo: A second question")


def test_a_retry_or_edit_refused_for_room_leaves_the_chat_as_it_was(
    page: Page, monkeypatch
) -> None:
    """Refused before it starts, a retry or an edit cuts nothing: not on screen, not saved."""
    from core import conversations

    chat = page.locator("#chatbot")
    send(page, "First question")
    expect(page.locator("#chat-status")).to_contain_text("tokens")
    send(page, "Second question")
    expect(chat).to_contain_text("Echo: Second question")
    expect(page.locator("#chat-status")).to_contain_text("tokens")
    monkeypatch.setattr(conversations, "REPLY_ROOM", 4_000_000)
    chat.get_by_role("button", name="Retry").click()
    expect(page.locator("#chat-status")).to_contain_text("would not fit")
    expect(page.get_by_role("textbox", name="Message")).to_have_value("")  # nothing doubled
    page.get_by_test_id("user").first.hover()
    chat.get_by_role("button", name="Edit").first.click()
    chat.locator("textarea").fill("An edited first question")
    chat.get_by_role("button", name="Submit").click()
    expect(page.get_by_role("textbox", name="Message")).to_have_value("An edited first question")
    assert chat.inner_text().count("Echo:") == 2
    page.reload()  # and nothing was cut from the saved chat
    expect(chat).to_contain_text("Echo: Second question")
    assert chat.inner_text().count("Echo:") == 2


def test_undo_keeps_a_draft_and_says_so(page: Page) -> None:
    send(page, "A question")
    expect(page.locator("#chat-status")).to_contain_text("tokens")
    page.get_by_role("textbox", name="Message").fill("a draft")
    page.locator("#chatbot").get_by_role("button", name="Undo").click()
    expect(page.locator("#chat-status")).to_contain_text("Your draft stays")
    expect(page.get_by_role("textbox", name="Message")).to_have_value("a draft")
    expect(page.get_by_test_id("bot")).to_have_count(0)


def test_presets_save_load_and_delete(page: Page, new_context) -> None:
    page.get_by_label("System prompt").fill("You are a terse pirate.")
    page.get_by_label("number input for Temperature").fill("1.3")
    page.get_by_label("number input for Temperature").press("Enter")
    page.get_by_text("Presets", exact=True).click()
    name = page.get_by_role("combobox", name="Preset")
    name.fill("Pirate")
    name.press("Enter")
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.locator("#chat-status")).to_contain_text("Preset “Pirate” saved.")

    other = open_dashboard(new_context(fresh=False))  # the same user elsewhere
    other.get_by_text("Presets", exact=True).click()
    preset = other.get_by_role("combobox", name="Preset")
    preset.click()
    other.get_by_role("option", name="Pirate").click()
    expect(other.get_by_label("System prompt")).to_have_value("You are a terse pirate.")
    expect(other.get_by_label("number input for Temperature")).to_have_value("1.3")
    screenshot(other, "presets")

    stranger = open_dashboard(new_context(user="presets-stranger"))
    stranger.get_by_text("Presets", exact=True).click()
    stranger.get_by_role("combobox", name="Preset").click()
    expect(stranger.get_by_role("option", name="Pirate")).to_have_count(0)

    other.get_by_role("button", name="Delete", exact=True).locator("visible=true").click()
    expect(other.locator("#chat-status")).to_contain_text("Preset deleted.")


def test_nothing_is_lost_or_misfiled_while_a_reply_streams(page: Page, upstream) -> None:
    """Enter pressed mid-reply keeps the new message in the box (it is not dropped); the saved
    chat list waits until the reply has ended, so the reply cannot land in another chat."""
    from tests.e2e.test_tabs import pick_model

    send(page, "A first chat")
    expect(page.get_by_test_id("bot").last).to_contain_text("Echo: A first chat")
    page.get_by_role("button", name="New chat").click()
    pick_model(page, "drip-0.3")
    upstream.reset()
    send(page, "one two three four five six")
    expect(page.get_by_test_id("bot").last).to_contain_text("Echo: one")
    expect(chat_list(page).first).to_be_disabled()  # no switching mid-reply
    box = page.get_by_role("textbox", name="Message")
    box.fill("the next question")
    box.press("Enter")
    expect(page.locator("#chat-status")).to_contain_text("tokens", timeout=20_000)
    expect(box).to_have_value("the next question")  # kept, not sent, not lost
    calls = [r for r in upstream.requests if r["path"] == "/v1/chat/completions"]
    assert len(calls) == 1
    expect(chat_list(page)).to_have_count(2)
    expect(chat_list(page).first).to_be_enabled()


def test_two_tabs_on_one_chat_lose_nothing(page: Page, new_context) -> None:
    send(page, "Shared question")
    expect(page.get_by_test_id("bot").last).to_contain_text("Echo: Shared question")
    other = open_dashboard(new_context(fresh=False))  # the same chat, in a second tab
    expect(other.get_by_test_id("bot")).to_have_count(1)
    send(page, "From the first tab")
    expect(page.get_by_test_id("bot")).to_have_count(2)
    send(other, "From the second tab")
    expect(other.get_by_test_id("bot")).to_have_count(2)
    expect(other.locator("#chat-status")).to_contain_text("changed in another tab")
    other.reload()
    expect(chat_list(other)).to_have_count(2)  # the first tab's chat, and the second's copy
    texts = " ".join(chat_list(other).all_inner_texts())
    assert "(another copy)" in texts
