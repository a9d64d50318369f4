"""Images in chat (issue 13): attached to a message, sent as OpenAI image_url parts, shown in
the conversation, kept with the saved chat; refused clearly where the backend has no vision."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.e2e.conftest import screenshot
from tests.e2e.test_tabs import send
from tests.upstream import FakeUpstream

pytestmark = pytest.mark.e2e


def png(path: Path, rgb: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """A real 8x8 PNG of one colour."""
    row = b"\x00" + bytes(rgb) * 8
    chunk = lambda kind, data: (  # noqa: E731
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    )
    header = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * 8))
    path.write_bytes(data + chunk(b"IEND", b""))
    return path


def attach(page: Page, *paths: Path) -> None:
    with page.expect_file_chooser() as chooser:
        page.locator("#chat-attach").click()
    chooser.value.set_files([str(p) for p in paths])
    expect(page.locator("#chat-attached")).to_contain_text("attached to your next message")


def test_an_image_goes_with_the_message_and_stays_with_the_chat(
    page: Page, upstream: FakeUpstream, tmp_path: Path
) -> None:
    image = png(tmp_path / "red.png")
    attach(page, image)
    upstream.reset()
    send(page, "What colour is this?")
    expect(page.get_by_test_id("bot").last).to_contain_text("Echo: What colour is this?")
    sent = [r for r in upstream.requests if r["path"] == "/v1/chat/completions"][-1]["json"]
    parts = sent["messages"][-1]["content"]
    assert parts[0] == {"type": "text", "text": "What colour is this?"}
    assert parts[1]["type"] == "image_url"
    assert (
        parts[1]["image_url"]["url"]
        == "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    )
    expect(page.locator("#chatbot img")).to_have_count(1)
    expect(page.locator("#chat-attached")).to_be_hidden()  # sent: nothing waits any more
    screenshot(page, "chat-image")

    page.reload()
    expect(page.locator("#chatbot img")).to_have_count(1)  # kept with the saved chat


def test_what_is_not_an_image_is_refused(page: Page, tmp_path: Path) -> None:
    fake = tmp_path / "fake.png"
    fake.write_text("not an image at all")
    with page.expect_file_chooser() as chooser:
        page.locator("#chat-attach").click()
    chooser.value.set_files(str(fake))
    expect(page.locator("#chat-status")).to_contain_text("not a PNG, JPEG, GIF or WebP image")
    expect(page.locator("#chat-attached")).to_be_hidden()


def test_an_image_pasted_into_the_message_box_is_attached(
    page: Page, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A screenshot pasted with Ctrl+V goes through the same checks as one attached."""
    data = base64.b64encode(png(tmp_path / "pasted.png", (20, 160, 40)).read_bytes()).decode()
    box = page.get_by_role("textbox", name="Message")
    box.fill("What is in the screenshot?")

    def paste(b64: str, kind: str, name: str, text: str = "") -> None:
        box.evaluate(
            """(box, [b64, kind, name, text]) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], name, { type: kind }));
                if (text) transfer.setData("text/plain", text);
                box.dispatchEvent(new ClipboardEvent("paste", {
                    clipboardData: transfer, bubbles: true, cancelable: true }));
            }""",
            [b64, kind, name, text],
        )

    # Cells copied from a spreadsheet bring a picture of themselves: the text is what is meant.
    paste(data, "image/png", "cells.png", text="A1\tB1")
    page.wait_for_timeout(500)
    expect(page.locator("#chat-attached")).to_be_hidden()

    paste(data, "image/png", "image.png")
    expect(page.locator("#chat-attached")).to_contain_text("1 image attached")
    expect(box).to_have_value("What is in the screenshot?")  # the typed text stays
    # Something that only claims to be an image is refused by the same checks as an upload.
    paste(base64.b64encode(b"not a picture").decode(), "image/png", "fake.png")
    expect(page.locator("#chat-status")).to_contain_text("not a PNG, JPEG, GIF or WebP image")
    expect(page.locator("#chat-attached")).to_contain_text("1 image attached")
    upstream.reset()
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#chatbot img")).to_have_count(1)
    sent = [r for r in upstream.requests if r["path"] == "/v1/chat/completions"][-1]["json"]
    assert sent["messages"][-1]["content"][1]["image_url"]["url"].endswith(data)
    # Undo gives the question back with its image, attached again for the next send.
    expect(page.locator("#chat-attached")).to_be_hidden()
    page.locator("#chatbot").get_by_role("button", name="Undo").click()
    expect(page.locator("#chatbot img")).to_have_count(0)
    expect(box).to_have_value("What is in the screenshot?")
    expect(page.locator("#chat-attached")).to_contain_text("1 image attached")
