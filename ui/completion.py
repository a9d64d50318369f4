"""The Completion tab: a prompt in, streamed text out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from core.context import Core
from core.errors import ServiceError
from ui import code as codeview
from ui.chat import usage_line
from ui.common import (
    LLM_GROUP,
    backend_notice,
    caller_of,
    count_of,
    field_error,
    notice,
    parse_stop,
    report,
)


@dataclass
class CompletionTab:
    model: gr.Dropdown


def build(core: Core) -> CompletionTab:
    """Build the tab's components and events inside the caller's Blocks."""
    service = core.service
    default_model = service.default_model("completion")
    backend_notice(service, "completion-notice")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            prompt = gr.Textbox(
                label="Prompt", lines=6, max_lines=20, placeholder="Once upon a time"
            )
            with gr.Row(elem_classes="button-row"):
                run = gr.Button("Complete", variant="primary", size="md", scale=3, min_width=80)
                stop = gr.Button("Stop", variant="stop", size="md", scale=2, min_width=80)
            output = gr.Textbox(
                label="Completion",
                lines=8,
                max_lines=30,
                interactive=False,
                buttons=["copy"],
                placeholder="The model's continuation of the prompt appears here.",
                elem_id="completion-output",
            )
            usage = gr.Markdown(elem_classes="usage-line", elem_id="completion-status")
        with gr.Column(scale=1, min_width=260):
            model = gr.Dropdown(
                label="Model",
                choices=[default_model],
                value=default_model,
                allow_custom_value=True,
                info="A completions model (for OpenAI: gpt-3.5-turbo-instruct).",
            )
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
            max_tokens = gr.Number(
                label="Max tokens",
                value=256,
                precision=0,
                info="0 lets the model decide.",
            )
            stop_text = gr.Textbox(
                label="Stop sequences", lines=2, placeholder="One per line (\\n for a newline)"
            )
            with gr.Accordion("View code", open=False):
                show_code = gr.Button("Code for this completion", size="sm")
                code_view = gr.Markdown(elem_id="completion-code")

    async def complete(
        text: str,
        model_name: str,
        temp: float,
        max_toks: float | None,
        stops: str,
        request: gr.Request,
    ) -> AsyncIterator[tuple[Any, Any]]:
        try:
            cap = count_of(max_toks, "Max tokens")
        except ValueError as exc:
            yield gr.skip(), field_error(str(exc))
            return
        body = {
            "prompt": text or "",
            "model": (model_name or "").strip() or None,
            "temperature": temp,
            "max_tokens": cap,
            "stop": parse_stop(stops),
        }
        result, last_usage = "", None
        yield "", "Generating…"
        try:
            async for chunk in service.completion_stream(body, **caller_of(core, request)):
                last_usage = chunk.usage or last_usage
                if chunk.text:
                    result += chunk.text
                    yield result, gr.skip()
        except ServiceError as exc:
            yield result, report(exc)
            return
        model_used = body["model"] or service.default_model("completion")
        yield result, usage_line(last_usage, model_used)

    inputs = [prompt, model, temperature, max_tokens, stop_text]
    event = run.click(
        complete, inputs, [output, usage], api_visibility="private", concurrency_id=LLM_GROUP
    )
    stop.click(None, cancels=[event], api_visibility="private")
    # Runs however the completion ended: after Stop, the status must not stay "Generating…".
    event.then(
        lambda status: (
            notice("Stopped. The text so far is kept.") if status == "Generating…" else gr.skip()
        ),
        [usage],
        [usage],
        api_visibility="private",
        queue=False,
    )

    def completion_code(text, model_name, temp, max_toks, stops, request: gr.Request) -> str:
        try:
            cap = count_of(max_toks, "Max tokens")
        except ValueError as exc:
            return field_error(str(exc))
        model_id = (model_name or "").strip() or service.default_model("completion")
        stop_list = parse_stop(stops)
        v1 = {"model": model_id, "prompt": text or "", "temperature": temp, "max_tokens": cap,
              "stop": stop_list}  # fmt: skip
        api = {"prompt": text or "", "model": model_id, "temperature": temp,
               "max_tokens": cap or 0, "stop": stop_list}  # fmt: skip
        return codeview.snippets("completion", v1, api, codeview.base_url(request))

    show_code.click(completion_code, inputs, [code_view], api_visibility="private")
    return CompletionTab(model=model)
