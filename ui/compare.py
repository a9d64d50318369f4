"""The Compare tab: one prompt to two models side by side, both streaming at once, each with
its own latency (first token, whole reply) and tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import gradio as gr

from core.context import Core
from core.errors import ServiceError
from ui.common import LLM_GROUP, caller_of, code, count_of, field_error, notice, report
from ui.markdown import safe_parts


@dataclass
class CompareTab:
    left: gr.Dropdown
    right: gr.Dropdown


@dataclass
class Side:
    """One model's reply as it arrives."""

    text: str = ""
    status: str = ""
    started: float = 0.0
    first: float | None = None


def rendered(text: str, *, remote_images: bool) -> str:
    return "".join(safe_parts(text, remote_images=remote_images))


def build(core: Core) -> CompareTab:
    service = core.service
    default_model = service.default_model("chat")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            prompt = gr.Textbox(
                label="Prompt", lines=3, placeholder="Ask both models the same thing"
            )
            with gr.Row(elem_classes="button-row"):
                run = gr.Button("Compare", variant="primary", scale=3, min_width=80)
                stop = gr.Button("Stop", variant="stop", scale=2, min_width=80)
        with gr.Column(scale=2, min_width=240):
            system = gr.Textbox(label="System prompt", lines=2)
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
                max_tokens = gr.Number(label="Max tokens", value=0, precision=0)
    with gr.Row(equal_height=False):
        columns = []
        for side in ("A", "B"):
            with gr.Column():
                picker = gr.Dropdown(
                    label=f"Model {side}",
                    choices=[default_model],
                    value=default_model,
                    allow_custom_value=True,
                )
                reply = gr.Markdown(elem_id=f"compare-{side.lower()}", min_height=120)
                status = gr.Markdown(
                    elem_classes="usage-line", elem_id=f"compare-{side.lower()}-status"
                )
                columns.append((picker, reply, status))
    remote_images = core.settings.allow_remote_images

    async def compare(
        text: str,
        system_prompt: str,
        temp: float,
        max_toks: float | None,
        model_a: str,
        model_b: str,
        request: gr.Request,
    ) -> AsyncIterator[tuple[Any, ...]]:
        if not (text or "").strip():
            yield "", notice("Type a prompt first."), "", ""
            return
        try:
            cap = count_of(max_toks, "Max tokens")
        except ValueError as exc:
            yield gr.skip(), field_error(str(exc)), gr.skip(), gr.skip()
            return
        messages = [{"role": "user", "content": text}]
        if (system_prompt or "").strip():
            messages.insert(0, {"role": "system", "content": system_prompt})
        sides = [Side(status="Generating…"), Side(status="Generating…")]
        changed = asyncio.Event()

        async def one(side: Side, model_name: str) -> None:
            body = {"messages": messages, "model": (model_name or "").strip() or None,
                    "temperature": temp, "max_tokens": cap}  # fmt: skip
            model_id = body["model"] or default_model
            side.started = time.perf_counter()
            usage = None
            try:
                chunks = service.chat_stream(body, **caller_of(core, request))
                async with aclosing(chunks):
                    async for chunk in chunks:
                        if chunk.text and side.first is None:
                            side.first = time.perf_counter() - side.started
                        side.text += chunk.text
                        usage = chunk.usage or usage
                        changed.set()
            except ServiceError as exc:
                side.status = report(exc)
                changed.set()
                return
            took = time.perf_counter() - side.started
            first = f"first token {side.first * 1000:.0f} ms · " if side.first else ""
            tokens = f" · {usage.prompt_tokens} + {usage.completion_tokens} tokens" if usage else ""
            side.status = f"{code(model_id)}: {first}whole reply {took:.2f} s{tokens}"
            changed.set()

        chosen = (model_a, model_b)
        tasks = [asyncio.create_task(one(s, m)) for s, m in zip(sides, chosen, strict=True)]
        try:
            while True:
                await changed.wait()
                changed.clear()
                done = all(t.done() for t in tasks)  # before the snapshot: it is the last one
                yield tuple(
                    part
                    for s in sides
                    for part in (rendered(s.text, remote_images=remote_images), s.status)
                )
                if done:
                    break
                await asyncio.sleep(0.05)  # at most 20 redraws a second
        finally:
            for task in tasks:  # Stop, or the page going away: both generations end
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    (picker_a, reply_a, status_a), (picker_b, reply_b, status_b) = columns
    inputs = [prompt, system, temperature, max_tokens, picker_a, picker_b]
    outputs = [reply_a, status_a, reply_b, status_b]
    events = [
        trigger(compare, inputs, outputs, api_visibility="private", concurrency_id=LLM_GROUP)
        for trigger in (run.click, prompt.submit)
    ]
    stop.click(None, cancels=events, api_visibility="private")

    def stopped(*statuses: str) -> tuple[Any, ...]:
        """After Stop, a side still 'Generating…' says it was stopped."""
        return tuple(notice("Stopped.") if s == "Generating…" else gr.skip() for s in statuses)

    for event in events:
        event.then(stopped, [status_a, status_b], [status_a, status_b],
                   api_visibility="private", queue=False)  # fmt: skip
    return CompareTab(left=picker_a, right=picker_b)
