"""The Chat tab: streaming multi-turn chat with a system prompt, model and sampling settings;
conversations saved per user (core.conversations), with retry, edit and undo."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from core import conversations as saved
from core.context import Core
from core.errors import InvalidRequest, ServiceError
from core.schemas import Usage
from edge.files import FileRegistry
from ui import code as codeview
from ui.common import (
    LLM_GROUP,
    backend_notice,
    caller_of,
    code,
    count_of,
    field_error,
    notice,
    parse_stop,
    report,
    save_text,
    uploaded_path,
)
from ui.markdown import safe_parts, shown_parts, source_of

# While a reply streams, redisplaying it costs a Markdown parse of the whole reply: show it at
# most every SHOW_EVERY seconds, and spend at most a fifth of the time on it.
SHOW_EVERY = 0.05


# Images pasted into the message box are handed to the Attach images button, so they go
# through the same checks (the user's own upload, an image by its bytes, size and count).
PASTE_IMAGES_JS = """
() => {
  document.addEventListener("paste", (event) => {
    if (!event.target.closest || !event.target.closest("#chat-message")) return;
    const data = event.clipboardData;
    const files = [...(data ? data.files : [])].filter((f) => f.type.startsWith("image/"));
    const button = document.querySelector("#chat-attach");  // its file input is beside it
    const input = button && [...button.parentElement.children].find(
      (e) => e.matches("input[type=file]"));
    // Cells copied from a spreadsheet come with a picture of them too: text wins.
    if (!files.length || !input || data.getData("text/plain")) return;
    event.preventDefault();
    const transfer = new DataTransfer();
    files.forEach((f) => transfer.items.add(f));
    input.files = transfer.files;
    input.dispatchEvent(new Event("change", { bubbles: true }));
  });
}
"""


@dataclass
class ChatTab:
    model: gr.Dropdown


def to_display(message: dict[str, str], *, remote_images: bool) -> dict[str, Any]:
    """One conversation message as the Chatbot shows it: safe Markdown parts, never raw HTML."""
    parts = safe_parts(message["content"], remote_images=remote_images) or [""]
    # Text parts as dicts: a plain string would go through inspect.cleandoc (indentation lost).
    return {"role": message["role"], "content": [{"type": "text", "text": p} for p in parts]}


def usage_line(usage: Usage | None, model: str) -> str:
    if usage is None:
        return f"Last reply from {code(model)} (the backend reported no token usage)."
    return (
        f"Last reply from {code(model)}: {usage.prompt_tokens} prompt + "
        f"{usage.completion_tokens} completion = **{usage.total_tokens} tokens**"
    )


def build(core: Core, files: FileRegistry, demo: gr.Blocks) -> ChatTab:
    """Build the tab's components and events inside the caller's Blocks."""
    service = core.service
    store = core.conversations
    presets = core.presets
    images = ImageFiles(files)
    default_model = service.default_model("chat")
    backend_notice(service, "chat-notice")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=220, elem_id="chat-history"):
            search = gr.Textbox(
                label="Search chats", placeholder="Words in a title or message", max_lines=1
            )
            chats = gr.Radio(label="Chats", choices=[], elem_id="chat-list")
            with gr.Accordion("This chat", open=False, elem_id="chat-manage"):
                title = gr.Textbox(label="Title", max_lines=1)
                with gr.Row(elem_classes="button-row"):
                    rename = gr.Button("Rename", size="sm", min_width=60)
                    delete = gr.Button("Delete", size="sm", variant="stop", min_width=60)
                with gr.Row(elem_classes="button-row"):
                    export_md = gr.Button("Export .md", size="sm", min_width=60)
                    export_json = gr.Button("Export .json", size="sm", min_width=60)
                exported = gr.File(label="Download", visible=False, elem_id="chat-export")
                importer = gr.UploadButton(
                    "Import .json", file_types=[".json"], size="sm", elem_id="chat-import"
                )
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(
                label="Conversation",
                # A floating label would sit on top of the first message once it scrolls.
                show_label=False,
                height=460,
                elem_id="chatbot",
                buttons=["copy", "copy_all"],
                placeholder="Send a message to start a conversation.",
                feedback_options=None,
                editable="user",  # edit a question and run the chat again from there
            )
            message = gr.Textbox(
                label="Message",
                placeholder="Type a message; Enter sends, Shift+Enter adds a line; paste images",
                lines=1,
                max_lines=8,
                autofocus=True,
                elem_id="chat-message",
            )
            # Small minimum widths keep the three buttons on one line on a phone.
            with gr.Row(elem_classes="button-row"):
                send = gr.Button("Send", variant="primary", size="md", scale=3, min_width=80)
                # Send becomes Stop while a reply streams.
                stop = gr.Button(
                    "Stop", variant="stop", size="md", scale=3, min_width=80, visible=False
                )
                clear = gr.Button("New chat", size="md", scale=2, min_width=80)
                attach = gr.UploadButton(
                    "Attach images",
                    file_types=["image"],
                    file_count="multiple",
                    size="md",
                    scale=2,
                    min_width=80,
                    elem_id="chat-attach",
                )
            with gr.Row(visible=False, elem_id="chat-attached") as attached_row:
                attached_line = gr.Markdown()
                unattach = gr.Button("Remove images", size="sm", scale=0, min_width=120)
            usage = gr.Markdown(elem_classes="usage-line", elem_id="chat-status")
            with gr.Accordion("View code", open=False):
                show_code = gr.Button("Code for this chat", size="sm")
                code_view = gr.Markdown(elem_id="chat-code")
        with gr.Column(scale=1, min_width=260):
            model = gr.Dropdown(
                label="Model",
                choices=[default_model],
                value=default_model,
                allow_custom_value=True,
                info="From the upstream's model list; any name can be typed.",
            )
            system = gr.Textbox(
                label="System prompt", lines=4, placeholder="You are a helpful assistant."
            )
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
            max_tokens = gr.Number(
                label="Max tokens",
                value=0,
                precision=0,
                info="0 lets the model decide.",
            )
            stop_text = gr.Textbox(
                label="Stop sequences", lines=2, placeholder="One per line (\\n for a newline)"
            )
            with gr.Accordion("Presets", open=False, elem_id="chat-presets"):
                preset = gr.Dropdown(
                    label="Preset",
                    choices=[],
                    value=None,
                    allow_custom_value=True,
                    info="Pick one to load it; type a name to save the settings above.",
                )
                with gr.Row(elem_classes="button-row"):
                    load_preset = gr.Button("Load", size="sm", min_width=50)
                    save_preset = gr.Button("Save", size="sm", min_width=50)
                    delete_preset = gr.Button("Delete", size="sm", variant="stop", min_width=50)

    # The conversation as the model sees it (raw text, OpenAI-shaped), kept on the server. The
    # Chatbot only shows it: it is not an input, so the browser cannot rewrite the history.
    # A reply being written carries "pending" until it ends; one cut short by Stop, "stopped";
    # a finished one its token usage.
    conversation = gr.State([])
    current = gr.State("")  # the saved conversation's id ("" until its first reply)
    version = gr.State(None)  # when it was saved as this page knows it (another tab may save)
    asking = gr.State("")  # the question the next reply answers (sent, retried or edited)
    attached = gr.State([])  # images waiting for the next message, as data: URLs
    asking_images = gr.State([])  # the images that go with `asking`
    busy = gr.State(False)  # a reply is being written (the next send waits for it)
    # A message whose call failed, to give back to the message box once the call has ended.
    unsent = gr.State(None)  # {"text": ..., "images": [...]}
    # The chat as it was before a retry or edit cut it back, to restore if the call is refused
    # before it starts: {"history": [...], "give_back": whether the question goes to the box}.
    uncut = gr.State(None)
    remote_images = core.settings.allow_remote_images

    def show(message: dict[str, Any], user: str = "") -> dict[str, Any]:
        shown = to_display(message, remote_images=remote_images)
        last = shown["content"][-1]
        for url in message.get("images") or []:
            shown["content"].append(
                {"type": "file",
                 "file": {"path": images.file_for(url, user=user),
                          "mime_type": url.removeprefix("data:").split(";", 1)[0]},
                 "alt_text": "an attached image"}
            )  # fmt: skip
        if message.get("stopped"):  # in the reply's own bubble, after its last words
            last["text"] = f"{last['text']}\n\n*(stopped)*"
        elif message.get("completion_tokens") is not None:
            spent = f"{message['prompt_tokens']} + {message['completion_tokens']} tokens"
            last["text"] = f"{last['text']}\n\n*{spent}*"
        return shown

    def raw(message: dict[str, Any]) -> dict[str, Any]:
        """A message as OpenAI takes it: images as image_url parts after the text."""
        if not message.get("images"):
            return {"role": message["role"], "content": message["content"]}
        parts: list[dict[str, Any]] = [{"type": "text", "text": message["content"]}]
        parts += [{"type": "image_url", "image_url": {"url": u}} for u in message["images"]]
        return {"role": message["role"], "content": parts}

    def user_of(request: gr.Request) -> str:
        return caller_of(core, request)["caller"].name

    def listing(user: str, text: str = "", chosen: str = "") -> gr.Radio:
        found = store.list(user, search=text or "")
        choices = [(c.title, c.id) for c in found]
        return gr.Radio(
            choices=choices, value=chosen if chosen in dict(map(reversed, choices)) else None
        )

    def chat_body(
        history: list[dict[str, Any]],
        system_prompt: str,
        model_name: str,
        temp: float,
        cap: int | None,
        stops: str,
    ) -> dict[str, Any]:
        """The chat request for `history` and the settings: what is sent, and what View code
        shows (images included, a reply still being written left out)."""
        messages = [
            raw(m) for m in history if (m["content"] or m.get("images")) and not m.get("pending")
        ]
        if system_prompt.strip():
            messages.insert(0, {"role": "system", "content": system_prompt})
        return {
            "messages": messages,
            "model": (model_name or "").strip() or None,
            "temperature": temp,
            "max_tokens": cap,
            "stop": parse_stop(stops),
        }

    async def respond(
        text: str,
        pictures: list[str],
        history: list[dict[str, Any]],
        was: dict[str, Any] | None,
        system_prompt: str,
        model_name: str,
        temp: float,
        max_toks: float | None,
        stops: str,
        request: gr.Request,
    ) -> AsyncIterator[tuple[Any, ...]]:
        if not (text or "").strip() and not pictures:
            yield gr.skip(), gr.skip(), notice("Type a message first."), None
            return
        try:
            cap = count_of(max_toks, "Max tokens")
        except ValueError as exc:
            yield gr.skip(), gr.skip(), field_error(str(exc)), {"text": text, "images": pictures}
            return
        before = list(history or [])
        question: dict[str, Any] = {"role": "user", "content": text}
        if pictures:
            question["images"] = list(pictures)
        asked = [*before, question]
        try:  # a reply that could not be saved is never asked for
            saved.check_room([saved.Message.model_construct(**_stored(m)) for m in asked])
        except ServiceError as exc:
            failed: dict[str, Any] | None = {"text": text, "images": pictures}
            if was is not None:  # a retry or edit: the chat comes back as it was
                before = was["history"]
                failed = failed if was["give_back"] else None
            yield [show(m, request.username) for m in before], before, report(exc), failed
            return
        shown = [show(m, request.username) for m in asked]
        # Each yield carries the display and the state together: after Stop they agree. The
        # message box is never written while the reply streams (what is typed there stays).
        reply: dict[str, Any] = {"role": "assistant", "content": "", "pending": True}
        yield [*shown, show(reply)], [*asked, reply], "Generating…", None
        body = chat_body(asked, system_prompt, model_name, temp, cap, stops)
        text_so_far, last_usage, next_show, served = "", None, 0.0, None
        try:
            async for chunk in service.chat_stream(body, **caller_of(core, request)):
                served = chunk.served_by or served
                last_usage = chunk.usage or last_usage
                text_so_far += chunk.text or ""
                if chunk.text and time.monotonic() >= next_show:
                    started = time.monotonic()
                    reply = {"role": "assistant", "content": text_so_far, "pending": True}
                    yield [*shown, show(reply)], [*asked, reply], gr.skip(), gr.skip()
                    next_show = started + max(SHOW_EVERY, 5 * (time.monotonic() - started))
        except ServiceError as exc:
            # Nothing is lost: the conversation returns to before the send; the message goes
            # back to the box once the call has ended (settle), unless something new is there.
            failed = {"text": text, "images": pictures}
            yield [show(m, request.username) for m in before], before, report(exc), failed
            return
        reply = {"role": "assistant", "content": text_so_far}
        if last_usage is not None:
            reply |= {"prompt_tokens": last_usage.prompt_tokens,
                      "completion_tokens": last_usage.completion_tokens}  # fmt: skip
        model_used = served or body["model"] or service.default_model("chat")
        status = usage_line(last_usage, model_used)
        yield [*shown, show(reply)], [*asked, reply], status, None

    def settle(
        history: list[dict[str, Any]],
        box: str,
        failed: dict[str, Any] | None,
        waiting: list[str],
        chat_id: str,
        seen: Any,
        system_prompt: str,
        model_name: str,
        temp: float,
        max_toks: float | None,
        stops: str,
        search_text: str,
        request: gr.Request,
    ) -> tuple[Any, ...]:
        """After a reply ends, however it ended: Stop comes back as Send; a reply Stop cut short
        is kept and marked stopped; a question Stop cut before any reply goes back to the box
        (so the next send does not carry two questions in a row); a failed message goes back
        to the box if nothing new was typed there. Then the conversation is saved."""
        history = list(history or [])
        buttons = gr.Button(visible=True), gr.Button(visible=False)
        shown: Any = gr.skip()
        status: Any = gr.skip()
        # The box is written only to give a message back: what is typed there meanwhile stays.
        box_out: Any = gr.skip()
        attached_out: Any = gr.skip()
        row_out: Any = gr.skip()
        line_out: Any = gr.skip()
        if history and history[-1].get("pending"):
            reply = history.pop()
            if reply["content"]:
                history.append({"role": "assistant", "content": reply["content"], "stopped": True})
                status = notice("Stopped. The partial reply is kept.")
            else:
                question = history.pop() if history and history[-1]["role"] == "user" else None
                if question and not (box or "").strip():
                    box_out = question["content"]
                if question and question.get("images") and not waiting:
                    attached_out, row_out = list(question["images"]), gr.Row(visible=True)
                    line_out = waiting_line(len(question["images"]))
                status = notice("Stopped before the reply began; your message is back in the box.")
            shown = [show(m, request.username) for m in history]
        elif failed:
            if not (box or "").strip():
                box_out = failed["text"]
            if failed["images"] and not waiting:  # the images go back to be attached again
                attached_out, row_out = list(failed["images"]), gr.Row(visible=True)
                line_out = waiting_line(len(failed["images"]))
        user = user_of(request)
        settings = settings_of(system_prompt, temp, max_toks, stops)
        if history:
            kept = saved.Conversation(
                id=chat_id,
                model=(model_name or "").strip() or None,
                settings=settings,
                messages=[saved.Message.model_validate(_stored(m)) for m in history],
            )
            try:
                stored = store.save(user, kept, seen=seen if chat_id else None)
                if chat_id and stored.id != chat_id:
                    status = notice(
                        "This chat changed in another tab or on another device: this copy of "
                        "it is saved as a new chat, and nothing is lost."
                    )
                chat_id, seen = stored.id, stored.updated_at
            except ServiceError as exc:
                status = report(exc)
        chosen = listing(user, search_text, chat_id)
        return (shown, history, box_out, status, None, *buttons, chat_id, chosen, attached_out,
                row_out, line_out, False, *locks(True), seen)  # fmt: skip

    def settings_of(system_prompt: str, temp: float, max_toks: float | None, stops: str):
        try:
            cap = count_of(max_toks, "Max tokens") or 0
        except ValueError:
            cap = 0
        # Within the saved settings' bounds (what was sent is the model's business).
        return saved.Settings(
            system=(system_prompt or "")[:200_000], temperature=min(max(temp, 0), 2),
            max_tokens=cap, stop=[x[:1_000] for x in parse_stop(stops)[:4]],
        )  # fmt: skip

    def opened(chat: saved.Conversation, who: str) -> tuple[Any, ...]:
        """A saved conversation on screen: the chat, its state, and the settings it ran with."""
        history = [_live(m) for m in chat.messages]
        st = chat.settings
        return (
            [show(m, who) for m in history],
            history,
            chat.id,
            chat.title,
            chat.model or default_model,
            st.system,
            st.temperature,
            st.max_tokens,
            "\n".join(x.replace("\n", "\\n") for x in st.stop),
            chat.updated_at,
        )

    chat_fields = [chatbot, conversation, current, title, model, system, temperature,
                   max_tokens, stop_text, version]  # fmt: skip

    def open_chat(chat_id: str | None, request: gr.Request) -> tuple[Any, ...]:
        if not chat_id:
            return (*(gr.skip() for _ in chat_fields), gr.skip())
        try:
            chat = store.get(user_of(request), chat_id)
        except ServiceError as exc:
            return (*(gr.skip() for _ in chat_fields), report(exc))
        return (*opened(chat, request.username), notice(f"Opened “{html_escape(chat.title)}”."))

    def preset_names(user: str, chosen: str | None = None) -> gr.Dropdown:
        return gr.Dropdown(choices=[p.name for p in presets.list(user)], value=chosen)

    def on_load(request: gr.Request) -> tuple[Any, ...]:
        """A reload, or another device: the user's chats, with the latest one open."""
        user = user_of(request)
        found = store.list(user, limit=1)
        if not found:
            return (preset_names(user), listing(user), *(gr.skip() for _ in chat_fields))
        chat = store.get(user, found[0].id)
        return (preset_names(user), listing(user, "", chat.id), *opened(chat, request.username))

    def new_chat(search_text: str, request: gr.Request) -> tuple[Any, ...]:
        """An empty chat; what is typed in the message box stays (it may be the first
        question of the new chat, typed before this answer came back)."""
        return [], [], "", "", "", listing(user_of(request), search_text), None

    def guard(is_busy: bool) -> None:
        """Before a send, retry or edit: while a reply is still being written, nothing starts
        (and nothing is touched: the typed message stays in the box)."""
        if is_busy:
            raise gr.Error("A reply is still being written: wait for it, or press Stop.",
                           title="One moment", print_exception=False)  # fmt: skip

    def locks(on: bool) -> tuple[Any, ...]:
        """While a reply streams, the saved-chat controls wait: switching chats, New chat,
        Delete or Import then would save the reply into the wrong chat."""
        return (gr.Radio(interactive=on), gr.Button(interactive=on), gr.Button(interactive=on),
                gr.UploadButton(interactive=on))  # fmt: skip

    async def begin(box: str, waiting: list[str]) -> tuple[Any, ...]:
        """Send: the box's text (and the attached images) become the question, the box empties
        once, Send becomes Stop."""
        return (box, list(waiting or []), "", [], gr.Row(visible=False), None,
                gr.Button(visible=False), gr.Button(visible=True), True, *locks(False))  # fmt: skip

    def on_attach(uploads: Any, waiting: list[str], request: gr.Request) -> tuple[Any, ...]:
        """Images for the next message: each must be the user's own upload, an image by its
        bytes (PNG, JPEG, GIF, WebP), at most 4 MB, and at most 4 in all."""
        waiting = list(waiting or [])
        try:
            for upload in uploads if isinstance(uploads, list) else [uploads]:
                path = upload if isinstance(upload, str) else getattr(upload, "name", "")
                real = uploaded_path(files, path, user=request.username)
                waiting.append(image_url(real))
            if len(waiting) > MAX_ATTACHED:
                raise InvalidRequest(f"At most {MAX_ATTACHED} images go with one message.")
        except ServiceError as exc:
            return gr.skip(), gr.skip(), gr.skip(), report(exc)
        line = waiting_line(len(waiting))
        return waiting, gr.Row(visible=bool(waiting)), line, ""

    def prepare_retry(history: list[dict[str, Any]], is_busy: bool) -> tuple[Any, ...]:
        """Retry: the last question again (with its images), its reply dropped."""
        guard(is_busy)
        was = {"history": list(history or []), "give_back": False}
        history = list(history or [])
        while history and history[-1]["role"] == "assistant":
            history.pop()
        last = history.pop() if history else {"content": ""}
        return (last["content"], list(last.get("images") or []), history, was,
                gr.Button(visible=False), gr.Button(visible=True), True, *locks(False))  # fmt: skip

    def prepare_edit(
        history: list[dict[str, Any]], is_busy: bool, edit: gr.EditData
    ) -> tuple[Any, ...]:
        """Edit a question: the chat runs again from there (what came after it goes).

        A question with a code block is shown in parts (see ui.markdown), and the Chatbot
        edits each part in a box of its own and reports each one as an edit: the parts left
        as they were are ignored, the changed one goes back into the whole question, and the
        others keep the exact text they were written with."""
        history = list(history or [])
        index = edit.index if isinstance(edit.index, int) else edit.index[0]
        index = min(max(index, 0), len(history))
        question = history[index] if index < len(history) else {"role": "user", "content": ""}
        parts = shown_parts(question["content"], remote_images=remote_images)
        value = edit.value if isinstance(edit.value, str) else str(edit.value)
        previous = edit.previous_value
        if len(parts) > 1 and value == previous:
            raise gr.Error("unchanged part", visible=False, print_exception=False)
        if is_busy and len(parts) > 1:
            raise gr.Error(
                "One part of a question is edited at a time: your other change was not "
                "applied. Edit that part again once this reply is done.",
                title="One part at a time", print_exception=False,
            )  # fmt: skip
        guard(is_busy)
        shown = [display for display, _ in parts]
        if previous in shown:
            at = shown.index(previous)
            sources = [source for _, source in parts]
            sources[at] = source_of(value)
            new_text = "".join(sources)
        else:  # not what this tab shows (the chat changed meanwhile): the edit as typed
            new_text = source_of(value)
        kept = list(question.get("images") or [])
        was = {"history": history, "give_back": True}
        return (new_text, kept, history[:index], was, gr.Button(visible=False),
                gr.Button(visible=True), True, *locks(False))  # fmt: skip

    def undo(
        history: list[dict[str, Any]], box: str, waiting: list[str], chat_id: str,
        request: gr.Request,
    ):  # fmt: skip
        """Undo the last exchange: the question goes back to the box (its images to be
        attached again, unless others wait), the chat is saved."""
        history = list(history or [])
        while history and history[-1]["role"] == "assistant":
            history.pop()
        last = history.pop() if history else {}
        question, pictures = last.get("content", ""), list(last.get("images") or [])
        seen: Any = gr.skip()
        if chat_id:
            messages = [saved.Message.model_validate(_stored(m)) for m in history]
            try:
                chat = store.get(user_of(request), chat_id)
                stored = store.save(
                    user_of(request), chat.model_copy(update={"messages": messages})
                )
                seen = stored.updated_at
            except ServiceError:  # deleted meanwhile (another tab): the screen still undoes
                pass
        back: tuple[Any, ...] = (gr.skip(), gr.skip(), gr.skip())
        status: Any = gr.skip()
        if (box or "").strip():  # a draft stays; the question and its images do not mix in
            status = notice("Undone. Your draft stays in the box (the undone question is not "
                            "put back over it).")  # fmt: skip
        elif pictures and not waiting:
            back = (pictures, gr.Row(visible=True), waiting_line(len(pictures)))
        shown = [show(m, request.username) for m in history]
        return shown, history, box or question, seen, *back, status

    reply_inputs = [asking, asking_images, conversation, uncut, system, model, temperature,
                    max_tokens, stop_text]  # fmt: skip
    reply_outputs = [chatbot, conversation, usage, unsent]
    settle_inputs = [conversation, message, unsent, attached, current, version, system, model,
                     temperature, max_tokens, stop_text, search]  # fmt: skip
    locked = [chats, clear, delete, importer]
    settle_outputs = [chatbot, conversation, message, usage, unsent, send, stop, current, chats,
                      attached, attached_row, attached_line, busy, *locked, version]  # fmt: skip

    def chain(started: Any) -> None:
        # .success: a start refused (a reply still being written) starts nothing after it.
        event = started.success(
            respond, reply_inputs, reply_outputs, api_visibility="private",
            concurrency_id=LLM_GROUP,
        )  # fmt: skip
        # .then runs however the reply ended: finished, failed, or cancelled by Stop.
        event.then(settle, settle_inputs, settle_outputs, api_visibility="private")
        # Stop brings Send back itself too: a call cancelled while still queued never runs,
        # and then nothing after it does.
        stop.click(
            lambda: (gr.Button(visible=True), gr.Button(visible=False), False, *locks(True)),
            None,
            [send, stop, busy, *locked],
            cancels=[event],
            api_visibility="private",
            queue=False,
        )

    began = [asking, asking_images, message, attached, attached_row, uncut, send, stop, busy,
             *locked]  # fmt: skip
    sending = gr.on([message.submit, send.click], guard, [busy], None, api_visibility="private",
                    queue=False)  # fmt: skip
    chain(sending.success(begin, [message, attached], began, api_visibility="private",
                          queue=False))  # fmt: skip
    prepared = [asking, asking_images, conversation, uncut, send, stop, busy, *locked]
    chain(chatbot.retry(prepare_retry, [conversation, busy], prepared, api_visibility="private",
                        queue=False))  # fmt: skip
    chain(chatbot.edit(prepare_edit, [conversation, busy], prepared, api_visibility="private",
                       queue=False))  # fmt: skip
    attach.upload(on_attach, [attach, attached], [attached, attached_row, attached_line, usage],
                  api_visibility="private")  # fmt: skip
    unattach.click(lambda: ([], gr.Row(visible=False), ""), None,
                   [attached, attached_row, attached_line], api_visibility="private",
                   queue=False)  # fmt: skip
    chatbot.undo(undo, [conversation, message, attached, current],
                 [chatbot, conversation, message, version, attached, attached_row, attached_line,
                  usage],
                 api_visibility="private")  # fmt: skip

    clear.click(
        new_chat, [search], [chatbot, conversation, current, title, usage, chats, version],
        api_visibility="private", queue=False,
    )  # fmt: skip
    # The Chatbot's own trash button: a new chat too (the saved one stays in the list).
    chatbot.clear(
        new_chat, [search], [chatbot, conversation, current, title, usage, chats, version],
        api_visibility="private",
    )  # fmt: skip
    chats.input(open_chat, [chats], [*chat_fields, usage], api_visibility="private")

    def find(text: str, chosen: str, request: gr.Request) -> gr.Radio:
        return listing(user_of(request), text, chosen or "")

    search.change(find, [search, current], [chats], api_visibility="private")
    demo.load(on_load, None, [preset, chats, *chat_fields], api_visibility="private")

    preset_fields = [model, system, temperature, max_tokens, stop_text]

    def do_load_preset(name: str, request: gr.Request) -> tuple[Any, ...]:
        try:
            chosen = presets.get(user_of(request), (name or "").strip())
        except ServiceError as exc:
            return (*(gr.skip() for _ in preset_fields), report(exc))
        st = chosen.settings
        stops = "\n".join(x.replace("\n", "\\n") for x in st.stop)
        fields = (chosen.model or default_model, st.system, st.temperature, st.max_tokens, stops)
        return (*fields, notice(f"Preset “{html_escape(chosen.name)}” loaded."))

    def do_save_preset(name, model_name, system_prompt, temp, max_toks, stops, request: gr.Request):
        user = user_of(request)
        try:
            cap = count_of(max_toks, "Max tokens") or 0
            kept = presets.save(user, saved.Preset(
                name=name or "", model=(model_name or "").strip() or None,
                settings=saved.Settings(system=system_prompt or "", temperature=temp,
                                        max_tokens=cap, stop=parse_stop(stops)[:4]),
            ))  # fmt: skip
        except ValueError as exc:
            return gr.skip(), field_error(str(exc))
        except ServiceError as exc:
            return gr.skip(), report(exc)
        return preset_names(user, kept.name), notice(f"Preset “{html_escape(kept.name)}” saved.")

    def do_delete_preset(name: str, request: gr.Request):
        user = user_of(request)
        try:
            presets.delete(user, (name or "").strip())
        except ServiceError as exc:
            return gr.skip(), report(exc)
        return preset_names(user), notice("Preset deleted.")

    load_preset.click(do_load_preset, [preset], [*preset_fields, usage], api_visibility="private")
    preset.select(do_load_preset, [preset], [*preset_fields, usage], api_visibility="private")
    save_preset.click(
        do_save_preset, [preset, *preset_fields], [preset, usage], api_visibility="private"
    )
    delete_preset.click(do_delete_preset, [preset], [preset, usage], api_visibility="private")

    def do_rename(chat_id: str, new_title: str, search_text: str, request: gr.Request):
        if not chat_id:
            return gr.skip(), notice("Send a message first: there is no saved chat to rename.")
        try:
            chat = store.rename(user_of(request), chat_id, new_title)
        except ServiceError as exc:
            return gr.skip(), report(exc)
        return listing(user_of(request), search_text, chat.id), notice("Renamed.")

    def do_delete(chat_id: str, search_text: str, request: gr.Request):
        if not chat_id:
            return (*new_chat(search_text, request), notice("Nothing saved to delete."))
        try:
            store.delete(user_of(request), chat_id)
        except ServiceError as exc:
            return (*(gr.skip() for _ in range(7)), report(exc))
        return (*new_chat(search_text, request), notice("Deleted."))

    def do_export(kind: str):
        def export(chat_id: str, request: gr.Request):
            if not chat_id:
                return gr.File(visible=False), notice("Nothing saved to export yet.")
            user = user_of(request)
            chat = store.get(user, chat_id)
            if kind == "md":
                text, name = saved.export_markdown(chat), "conversation.md"
            else:
                text, name = json.dumps(saved.export_json(chat), indent=2), "conversation.json"
            path = save_text(files, text, name=name, user=request.username)
            return gr.File(value=path, visible=True), notice(f"Exported as {name}.")

        return export

    def do_import(upload: Any, search_text: str, request: gr.Request):
        path = upload if isinstance(upload, str) else getattr(upload, "name", "")
        user = user_of(request)
        try:
            real = uploaded_path(files, path, user=request.username)
            with open(real, encoding="utf-8") as handle:
                data = json.load(handle)
            chat = store.import_json(user, data)
        except (ValueError, UnicodeDecodeError, TypeError, RecursionError):
            error = InvalidRequest("That file is not a conversation exported as JSON.")
            return (*(gr.skip() for _ in chat_fields), gr.skip(), report(error))
        except ServiceError as exc:
            return (*(gr.skip() for _ in chat_fields), gr.skip(), report(exc))
        shown = opened(chat, request.username)
        return (*shown, listing(user, search_text, chat.id), notice("Imported."))

    rename.click(do_rename, [current, title, search], [chats, usage], api_visibility="private")
    delete.click(
        do_delete, [current, search],
        [chatbot, conversation, current, title, usage, chats, version, usage],
        api_visibility="private",
    )  # fmt: skip
    export_md.click(do_export("md"), [current], [exported, usage], api_visibility="private")
    export_json.click(do_export("json"), [current], [exported, usage], api_visibility="private")
    importer.upload(
        do_import, [importer, search], [*chat_fields, chats, usage], api_visibility="private"
    )

    def chat_code(
        history: list[dict[str, Any]],
        box: str,
        system_prompt: str,
        model_name: str,
        temp: float,
        max_toks: float | None,
        stops: str,
        request: gr.Request,
    ) -> str:
        """The conversation on screen (and the message being typed) as runnable code."""
        history = list(history or [])
        if (box or "").strip():
            history.append({"role": "user", "content": box})
        try:
            cap = count_of(max_toks, "Max tokens")
        except ValueError as exc:
            return field_error(str(exc))
        body = chat_body(history, system_prompt, model_name, temp, cap, stops)
        body["model"] = body["model"] or service.default_model("chat")
        v1 = body
        api = body | {"max_tokens": cap or 0}
        return codeview.snippets("chat", v1, api, codeview.base_url(request))

    show_code.click(
        chat_code,
        [conversation, message, system, model, temperature, max_tokens, stop_text],
        [code_view],
        api_visibility="private",
    )
    return ChatTab(model=model)


def waiting_line(count: int) -> str:
    return f"{count} {'image' if count == 1 else 'images'} attached to your next message."


def html_escape(text: str) -> str:
    return html.escape(text)


def _stored(message: dict[str, Any]) -> dict[str, Any]:
    """A live message as saved: role, content, usage, stopped."""
    keys = ("role", "content", "images", "prompt_tokens", "completion_tokens", "stopped")
    return {k: message[k] for k in keys if k in message}


def _live(message: saved.Message) -> dict[str, Any]:
    return message.model_dump(exclude_defaults=True) | {
        "role": message.role,
        "content": message.content,
    }


MAX_ATTACHED = 4
MAX_IMAGE_BYTES = 4_000_000
IMAGE_TYPES = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpeg",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
}


def image_url(path: str) -> str:
    """An uploaded image as a data: URL, checked by its bytes (not its name) and size."""
    size = os.path.getsize(path)
    if size > MAX_IMAGE_BYTES:
        raise InvalidRequest(
            f"An image may be at most {MAX_IMAGE_BYTES // 1_000_000} MB ({size:,} bytes)."
        )
    with open(path, "rb") as handle:
        data = handle.read()
    kind = next((k for magic, k in IMAGE_TYPES.items() if data.startswith(magic)), None)
    if kind is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = "webp"
    if kind is None:
        raise InvalidRequest("That file is not a PNG, JPEG, GIF or WebP image.")
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


class ImageFiles:
    """Attached images (data: URLs) as files the Chatbot shows, written once per user and
    image, readable by that user only (edge.files)."""

    def __init__(self, files: FileRegistry, keep: int = 512) -> None:
        self.files = files
        self.keep = keep
        self.paths: OrderedDict[tuple[str, str], str] = OrderedDict()

    def file_for(self, url: str, *, user: str) -> str:
        key = (user, hashlib.sha256(url.encode()).hexdigest())
        path = self.paths.get(key)
        if path is None or not os.path.exists(path):  # expired files are swept
            header, _, encoded = url.partition(",")
            kind = header.removeprefix("data:image/").split(";")[0]
            path = self.files.write(base64.b64decode(encoded), f"image.{kind}", user=user)
            self.paths[key] = path
        self.paths.move_to_end(key)
        while len(self.paths) > self.keep:
            self.paths.popitem(last=False)
        return path
