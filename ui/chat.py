"""The Chat tab: streaming multi-turn chat with a system prompt, model and sampling settings."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from core.context import Core
from core.errors import ServiceError
from core.schemas import Usage
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
)
from ui.markdown import safe_parts

# While a reply streams, redisplaying it costs a Markdown parse of the whole reply: show it at
# most every SHOW_EVERY seconds, and spend at most a fifth of the time on it.
SHOW_EVERY = 0.05


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


def build(core: Core) -> ChatTab:
    """Build the tab's components and events inside the caller's Blocks."""
    service = core.service
    default_model = service.default_model("chat")
    backend_notice(service, "chat-notice")
    with gr.Row(equal_height=False):
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
            )
            message = gr.Textbox(
                label="Message",
                placeholder="Type a message; Enter sends, Shift+Enter adds a line",
                lines=1,
                max_lines=8,
                autofocus=True,
            )
            # Small minimum widths keep the three buttons on one line on a phone.
            with gr.Row(elem_classes="button-row"):
                send = gr.Button("Send", variant="primary", size="md", scale=3, min_width=80)
                # Send becomes Stop while a reply streams.
                stop = gr.Button(
                    "Stop", variant="stop", size="md", scale=3, min_width=80, visible=False
                )
                clear = gr.Button("New chat", size="md", scale=2, min_width=80)
            usage = gr.Markdown(elem_classes="usage-line", elem_id="chat-status")
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

    # The conversation as the model sees it (raw text, OpenAI-shaped), kept on the server. The
    # Chatbot only shows it: it is not an input, so the browser cannot rewrite the history.
    # A reply being written carries "pending" until it ends; one cut short by Stop, "stopped".
    conversation = gr.State([])
    # A message whose call failed, to give back to the message box once the call has ended.
    unsent = gr.State("")
    remote_images = core.settings.allow_remote_images

    def show(message: dict[str, Any]) -> dict[str, Any]:
        shown = to_display(message, remote_images=remote_images)
        if message.get("stopped"):  # in the reply's own bubble, after its last words
            last = shown["content"][-1]
            last["text"] = f"{last['text']}\n\n*(stopped)*"
        return shown

    def raw(message: dict[str, Any]) -> dict[str, str]:
        return {"role": message["role"], "content": message["content"]}

    async def respond(
        text: str,
        history: list[dict[str, Any]],
        system_prompt: str,
        model_name: str,
        temp: float,
        max_toks: float | None,
        stops: str,
        request: gr.Request,
    ) -> AsyncIterator[tuple[Any, ...]]:
        if not (text or "").strip():
            yield gr.skip(), gr.skip(), gr.skip(), notice("Type a message first."), ""
            return
        try:
            cap = count_of(max_toks, "Max tokens")
        except ValueError as exc:
            yield gr.skip(), gr.skip(), gr.skip(), field_error(str(exc)), ""
            return
        before = list(history or [])
        asked = [*before, {"role": "user", "content": text}]
        shown = [show(m) for m in asked]
        # Each yield carries the display and the state together: after Stop they agree. The
        # message box is emptied once, here, and never written again while the reply streams.
        reply: dict[str, Any] = {"role": "assistant", "content": "", "pending": True}
        yield [*shown, show(reply)], [*asked, reply], "", "Generating…", ""
        messages = [raw(m) for m in asked if m["content"]]
        if system_prompt.strip():
            messages.insert(0, {"role": "system", "content": system_prompt})
        body = {
            "messages": messages,
            "model": (model_name or "").strip() or None,
            "temperature": temp,
            "max_tokens": cap,
            "stop": parse_stop(stops),
        }
        text_so_far, last_usage, next_show = "", None, 0.0
        try:
            async for chunk in service.chat_stream(body, **caller_of(core, request)):
                last_usage = chunk.usage or last_usage
                text_so_far += chunk.text or ""
                if chunk.text and time.monotonic() >= next_show:
                    started = time.monotonic()
                    reply = {"role": "assistant", "content": text_so_far, "pending": True}
                    yield [*shown, show(reply)], [*asked, reply], gr.skip(), gr.skip(), gr.skip()
                    next_show = started + max(SHOW_EVERY, 5 * (time.monotonic() - started))
        except ServiceError as exc:
            # Nothing is lost: the conversation returns to before the send; the message goes
            # back to the box once the call has ended (settle), unless something new is there.
            yield shown[:-1], before, gr.skip(), report(exc), text
            return
        reply = {"role": "assistant", "content": text_so_far}
        model_used = body["model"] or service.default_model("chat")
        yield (
            [*shown, show(reply)],
            [*asked, reply],
            gr.skip(),
            usage_line(last_usage, model_used),
            "",
        )

    def settle(history: list[dict[str, Any]], box: str, failed: str) -> tuple[Any, ...]:
        """After a reply ends, however it ended: Stop comes back as Send; a reply Stop cut short
        is kept and marked stopped; a question Stop cut before any reply goes back to the box
        (so the next send does not carry two questions in a row); a failed message goes back
        to the box if nothing new was typed there."""
        history = list(history or [])
        buttons = gr.Button(visible=True), gr.Button(visible=False)
        if not (history and history[-1].get("pending")):
            box_now = failed if failed and not (box or "").strip() else gr.skip()
            return gr.skip(), gr.skip(), box_now, gr.skip(), "", *buttons
        reply = history.pop()
        if reply["content"]:
            history.append({"role": "assistant", "content": reply["content"], "stopped": True})
            status = notice("Stopped. The partial reply is kept.")
        else:
            question = history.pop() if history and history[-1]["role"] == "user" else None
            if question and not (box or "").strip():
                box = question["content"]
            status = notice("Stopped before the reply began; your message is back in the box.")
        return [show(m) for m in history], history, box, status, "", *buttons

    inputs = [message, conversation, system, model, temperature, max_tokens, stop_text]
    outputs = [chatbot, conversation, message, usage, unsent]
    for trigger in (message.submit, send.click):
        started = trigger(
            lambda: (gr.Button(visible=False), gr.Button(visible=True)),
            None,
            [send, stop],
            api_visibility="private",
            queue=False,
        )
        event = started.then(
            respond, inputs, outputs, api_visibility="private", concurrency_id=LLM_GROUP
        )
        # .then runs however the reply ended: finished, failed, or cancelled by Stop.
        event.then(
            settle,
            [conversation, message, unsent],
            [chatbot, conversation, message, usage, unsent, send, stop],
            api_visibility="private",
            queue=False,
        )
        # Stop brings Send back itself too: a call cancelled while still queued never runs,
        # and then nothing after it does.
        stop.click(
            lambda: (gr.Button(visible=True), gr.Button(visible=False)),
            None,
            [send, stop],
            cancels=[event],
            api_visibility="private",
            queue=False,
        )
    clear.click(lambda: ([], [], "", ""), None, outputs[:4], api_visibility="private", queue=False)
    # The Chatbot's own trash button empties only the browser's copy: forget the conversation too.
    chatbot.clear(lambda: ([], ""), None, [conversation, usage], api_visibility="private")
    return ChatTab(model=model)
