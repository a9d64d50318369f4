"""'View code' in a real browser: the snippets on screen run, as shown, against this server."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import ACCESS_KEY
from tests.e2e.conftest import screenshot
from tests.e2e.test_tabs import pick_model, send

pytestmark = pytest.mark.e2e


def snippets(page: Page, elem_id: str) -> list[str]:
    """The code blocks of a View code panel, as their text."""
    blocks = page.locator(f"#{elem_id} pre code")
    expect(blocks).to_have_count(3)
    return [blocks.nth(i).inner_text() for i in range(3)]


def run(language: str, source: str) -> str:
    env = {**os.environ, "ACCESS_KEY": ACCESS_KEY}
    command = [sys.executable, "-c", source] if language == "python" else ["bash", "-c", source]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-1500:]
    return done.stdout


def test_the_chat_code_runs_as_shown(page: Page) -> None:
    send(page, "Earlier question")
    expect(page.get_by_test_id("bot").last).to_contain_text("Echo: Earlier question")
    pick_model(page, "gpt-4.1-mini")
    page.get_by_label("System prompt").fill("Answer like a pirate.")
    page.get_by_role("textbox", name="Message").fill("What's a `code` block?")
    page.get_by_text("View code").first.click()
    page.get_by_role("button", name="Code for this chat").click()
    sdk, gradio, curl = snippets(page, "chat-code")
    screenshot(page, "view-code")
    assert "gpt-4.1-mini" in sdk and "Answer like a pirate." in sdk and "auth=(" in gradio
    assert ACCESS_KEY not in sdk + gradio + curl  # the key comes from the environment
    assert "Echo: What's a `code` block?" in run("python", sdk)
    assert "Echo: What's a `code` block?" in run("python", gradio.replace("{your name}", "dev"))
    assert "Echo: What's a `code` block?" in run("bash", curl)
    # The message being typed is still there: showing code sends nothing.
    expect(page.get_by_role("textbox", name="Message")).to_have_value("What's a `code` block?")


def test_the_embeddings_and_completion_code_run_as_shown(page: Page) -> None:
    page.get_by_role("tab", name="Embeddings").click()
    page.get_by_role("textbox", name="Texts, one per line").fill("a cat\na kitten")
    page.get_by_text("View code").locator("visible=true").first.click()
    page.get_by_role("button", name="Code for these texts").click()
    sdk, _, curl = snippets(page, "embeddings-code")
    assert "text-embedding-3-small" in sdk
    assert "embedding=" in run("python", sdk)
    assert re.search(r'"embedding":\s*\[', run("bash", curl))

    page.get_by_role("tab", name="Completion").click()
    page.get_by_role("textbox", name="Prompt", exact=True).locator("visible=true").fill("Roses")
    page.get_by_text("View code").locator("visible=true").first.click()
    page.get_by_role("button", name="Code for this completion").click()
    sdk, gradio, _ = snippets(page, "completion-code")
    assert "completion of: Roses" in run("python", sdk)
    assert "completion of: Roses" in run("python", gradio.replace("{your name}", "dev"))


def test_the_api_tab_replaces_gradios_panel(page: Page) -> None:
    expect(page.get_by_role("button", name="Use via API")).to_have_count(0)
    page.get_by_role("tab", name="API").click()
    help_text = page.locator("#api-help")
    expect(help_text).to_contain_text("/v1")
    expect(help_text).to_contain_text("/conversations")
    expect(help_text).to_contain_text("auth=")
    sdk, gradio, curl = snippets(page, "api-example")
    assert "Echo: Hello!" in run("python", sdk)
    assert "Echo: Hello!" in run("python", gradio.replace("{your name}", "dev"))
    assert "Echo: Hello!" in run("bash", curl)
    screenshot(page, "api-tab")
