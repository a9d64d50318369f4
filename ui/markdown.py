"""Chat text (the model's or the user's) as Markdown that cannot act on the page.

Gradio's Chatbot renders each text part with `marked` (raw HTML on) and a sanitizer that keeps
`<img>`, `<form>` and `style`; neither can be configured, so the text is made safe here:

- A top-level fenced code block becomes a part of its own, re-fenced so that no line inside can
  close it. Alone in its part it is parsed by marked as one code block whatever the rest says,
  so its text stays unchanged (code shows `<`, the copy button copies real code). Sharing one
  string, marked and markdown-it disagree on where fences end (link titles, marked's `$$`
  and mermaid extensions, its looser closing fence): raw HTML inside would then run.
- Everything else becomes a part with every `<` escaped. Inline code spans are re-emitted as
  `<code>` with their text as entities, so the only raw `<` are our own `<code>`/`</code>`,
  whatever marked decides is a code span.
- Images (`![...]`) become links unless the operator allows remote images; mermaid fences are
  shown as code (mermaid renders HTML labels: `<img>` again).
"""

from __future__ import annotations

import bisect
import logging
import re
import string

from markdown_it import MarkdownIt

# markdown-it logs every rule it tries at DEBUG: thousands of lines per streamed chunk.
logging.getLogger("markdown_it").setLevel(logging.WARNING)
_PARSER = MarkdownIt("commonmark", {"html": False}).enable("table").disable("inline")
_ENTITY = {c: f"&#{ord(c)};" for c in string.punctuation}
_BACKTICKS = re.compile(r"`+")
_IMAGE = re.compile(r"!\[")
_AUTOLINK = re.compile(r"<(https?://[^\s<>]*)>")
_INFO = re.compile(r"[\w+#.-]{1,40}")
_CODE_SPAN = re.compile(r"<code>(.*?)</code>", re.DOTALL)
_FENCED = re.compile(r"(`{3,})[^`\n]*\n(?:.*\n)?\1\n?", re.DOTALL)
_LINK_IMAGE = re.compile(r"(?<!\\)\\!\[")
_NUMERIC = re.compile(r"&#(\d{1,7});")
# Longer texts are shown as one code block: a streamed reply is parsed again and again.
MAX_MARKDOWN_CHARS = 100_000


def safe_parts(text: str, *, remote_images: bool = False) -> list[str]:
    """`text` as Markdown parts to show one after the other, each rendered on its own."""
    return [shown for shown, _ in shown_parts(text, remote_images=remote_images)]


def shown_parts(text: str, *, remote_images: bool = False) -> list[tuple[str, str]]:
    """Each part as shown, with the text it was made from: joined, those texts are `text`
    (newlines normalised), so a part edited on its own goes back among the others as written."""
    # The same normalisation markdown-it does, so its line numbers index `lines`.
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "\ufffd")
    if len(text) > MAX_MARKDOWN_CHARS:
        return [(_fence(text, ""), text)]
    lines = text.split("\n")
    tokens = _PARSER.parse(text)
    inline = sorted({tuple(t.map) for t in tokens if t.type == "inline" and t.map})
    fences = [t for t in tokens if t.type == "fence" and t.level == 0 and t.map]
    pieces: list[tuple[str, int]] = []  # (shown, its first line)
    line = 0
    for fence in fences:
        start, end = fence.map
        pieces.append((_prose(lines, line, start, inline, remote_images), line))
        pieces.append((_fence(fence.content, fence.info), start))
        line = end
    pieces.append((_prose(lines, line, len(lines), inline, remote_images), line))
    kept = [(shown, first) for shown, first in pieces if shown.strip()]
    if not kept:
        return []
    # Each part's source runs from its first line to the next part's (the first from line 0).
    starts = [0] + [first for _, first in kept[1:]] + [len(lines)]
    out = []
    for i, (shown, _) in enumerate(kept):
        source = "\n".join(lines[starts[i] : starts[i + 1]])
        last = i == len(kept) - 1
        # Gradio's copy button joins parts with a space: a newline keeps the copy valid Markdown.
        out.append((shown if last else shown + "\n", source if last else source + "\n"))
    return out


def _fence(content: str, info: str) -> str:
    """A code block no line of `content` can close, opened in a form marked's mermaid skips."""
    longest = max((len(run) for run in _BACKTICKS.findall(content)), default=0)
    fence = "`" * max(3, longest + 1)
    words = info.split()
    match = _INFO.match(words[0]) if words else None
    lang = match.group(0) if match else ""
    if lang.startswith("mermaid"):
        lang = " " + lang
    if content and not content.endswith("\n"):
        content += "\n"
    return f"{fence}{lang}\n{content}{fence}"


def _prose(
    lines: list[str], start: int, end: int, inline: list[tuple[int, int]], remote_images: bool
) -> str:
    """Lines [start, end) escaped; code spans only within one paragraph, heading or table row."""
    out: list[str] = []
    line = start
    for first, stop in inline[bisect.bisect_left(inline, (start, start)) :]:
        if first >= end:
            break
        if first < line or stop > end:
            continue
        if first > line:
            out.append(_plain("\n".join(lines[line:first]), remote_images))
        out.append(_inline("\n".join(lines[first:stop]), remote_images))
        line = stop
    if line < end:
        out.append(_plain("\n".join(lines[line:end]), remote_images))
    return "\n".join(out)


def _inline(text: str, remote_images: bool) -> str:
    """Escape `text`, turning its code spans (CommonMark's rules) into inert `<code>` HTML."""
    runs = [(m.start(), m.end()) for m in _BACKTICKS.finditer(text)]
    by_length: dict[int, list[int]] = {}
    for index, (a, b) in enumerate(runs):
        by_length.setdefault(b - a, []).append(index)
    out: list[str] = []
    done = 0  # text[:done] is already in `out`
    index = 0
    while index < len(runs):
        a, b = runs[index]
        index += 1
        if a < done:
            continue
        if _escaped(text, a):  # `\`` is a literal backtick; the rest of the run may open
            a += 1
        # The closer is the next run of exactly the opener's length.
        same = by_length.get(b - a, [])
        after = bisect.bisect_left(same, index)
        if a == b or after == len(same):
            continue
        close, close_end = runs[same[after]]
        out.append(_plain(text[done:a], remote_images))
        out.append(_code(text[b:close]))
        done = close_end
        index = same[after] + 1
    out.append(_plain(text[done:], remote_images))
    return "".join(out)


def _escaped(text: str, at: int) -> bool:
    """Whether the character at `at` follows an odd number of backslashes."""
    count = 0
    while at - count > 0 and text[at - count - 1] == "\\":
        count += 1
    return count % 2 == 1


def _code(content: str) -> str:
    """A code span as HTML; entities keep marked from reading Markdown or HTML inside."""
    content = content.replace("\n", " ")
    if content.startswith(" ") and content.endswith(" ") and content.strip(" "):
        content = content[1:-1]
    return "<code>" + "".join(_ENTITY.get(c, c) for c in content) + "</code>"


def _plain(text: str, remote_images: bool) -> str:
    """Text outside code spans: no raw HTML, no mermaid diagram, no image loading by itself."""
    # <https://...> as a bare URL: GFM links it, and no "<" is left to escape.
    text = _AUTOLINK.sub(r"\1", text)
    text = text.replace("<", "&lt;").replace("```mermaid", "``` mermaid")
    if remote_images:
        return text
    # `\![alt](url)` is a literal "!" and a link: nothing loads unless the user clicks.
    return _IMAGE.sub(lambda m: m[0] if _escaped(text, m.start()) else "\\![", text)


def source_of(part: str) -> str:
    """The Markdown a part from `safe_parts` shows, after a person edited it: a code block is
    its own Markdown already; in text, only what `safe_parts` added is taken back (the `&lt;`
    for "<", our `<code>` spans as backticks, the "\\" before an image's "!"). Anything else
    the person wrote, entities included, stays as written."""
    if _FENCED.fullmatch(part):
        return part
    out: list[str] = []
    done = 0
    for span in _CODE_SPAN.finditer(part):
        out.append(_unplain(part[done : span.start()]))
        content = _NUMERIC.sub(lambda m: chr(int(m[1])), span[1])
        ticks = "`" * (max((len(r) for r in _BACKTICKS.findall(content)), default=0) + 1)
        pad = " " if content.startswith("`") or content.endswith("`") else ""
        out.append(f"{ticks}{pad}{content}{pad}{ticks}")
        done = span.end()
    out.append(_unplain(part[done:]))
    return "".join(out)


def _unplain(text: str) -> str:
    return _LINK_IMAGE.sub("![", text).replace("&lt;", "<")
