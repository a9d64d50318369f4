"""The Chat tab: streaming multi-turn chat with a system prompt, model and sampling settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from core.context import Core
from core.errors import ServiceError
from core.schemas import Usage
from ui.common import LLM_GROUP, caller_of, optional_int, parse_stop, report


@dataclass
class ChatTab:
    model: gr.Dropdown


def history_to_messages(history: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Gradio chat history -> OpenAI messages: text parts only, joined, roles kept."""
    messages = []
    for item in history:
        role = item.get("role")
        if role not in ("user", "assistant", "system"):
            continue
        content = item.get("content")
        if isinstance(content, list):
            text = "\n".join(
                part.get("text", "")
                for part in content
                if isinstance(part, dict) and part.get("type") == "text"
            )
        else:
            text = content if isinstance(content, str) else ""
        if text:
            messages.append({"role": role, "content": text})
    return messages


def usage_line(usage: Usage | None, model: str) -> str:
    if usage is None:
        return f"Last reply from `{model}` (the backend reported no token usage)."
    return (
        f"Last reply from `{model}`: {usage.prompt_tokens} prompt + "
        f"{usage.completion_tokens} completion = **{usage.total_tokens} tokens**"
    )


def build(core: Core) -> ChatTab:
    """Build the tab's components and events inside the caller's Blocks."""
    service = core.service
    default_model = service.default_model("chat")
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
                stop = gr.Button("Stop", variant="stop", size="md", scale=2, min_width=80)
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
                minimum=0,
                maximum=32768,
                info="0 lets the model decide.",
            )
            stop_text = gr.Textbox(
                label="Stop sequences", lines=2, placeholder="One per line (\\n for a newline)"
            )

    async def respond(
        text: str,
        history: list[dict[str, Any]],
        system_prompt: str,
        model_name: str,
        temp: float,
        max_toks: float | None,
        stops: str,
        request: gr.Request,
    ) -> AsyncIterator[tuple[Any, Any, Any]]:
        if not (text or "").strip():
            gr.Warning("Type a message first.")
            yield history, text, gr.skip()
            return
        before = list(history or [])
        messages = history_to_messages(before)
        if system_prompt.strip():
            messages.insert(0, {"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": text})
        shown = [*before, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        yield shown, "", "Generating…"
        reply, last_usage = "", None
        body = {
            "messages": messages,
            "model": (model_name or "").strip() or None,
            "temperature": temp,
            "max_tokens": optional_int(max_toks),
            "stop": parse_stop(stops),
        }
        try:
            async for chunk in service.chat_stream(body, **caller_of(core, request)):
                last_usage = chunk.usage or last_usage
                if chunk.text:
                    reply += chunk.text
                    shown[-1] = {"role": "assistant", "content": reply}
                    yield shown, "", gr.skip()
        except ServiceError as exc:
            # Nothing is lost: the conversation returns to before the send, the message to the box.
            yield before, text, report(exc)
            return
        yield shown, "", usage_line(last_usage, body["model"] or service.default_model("chat"))

    inputs = [message, chatbot, system, model, temperature, max_tokens, stop_text]
    outputs = [chatbot, message, usage]
    events = [
        trigger(respond, inputs, outputs, api_visibility="private", concurrency_id=LLM_GROUP)
        for trigger in (message.submit, send.click)
    ]
    stop.click(None, cancels=events, api_visibility="private")
    clear.click(lambda: ([], "", ""), None, outputs, api_visibility="private", queue=False)
    return ChatTab(model=model)
