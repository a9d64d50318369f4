"""The least a Gradio endpoint can cost: one gr.api function that relays a chat to the upstream.

Started by bench/gateway.py next to the app, so gradio_client's own overhead (it polls for
messages every 50 ms) is measured apart from the app's.

    .venv/bin/python bench/gradio_floor.py --port 9200 --upstream http://127.0.0.1:9100/v1
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import aiohttp
import gradio as gr


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    session: aiohttp.ClientSession | None = None

    async def chat(messages: list[dict[str, str]], model: str = "bench-model") -> str:
        """Relay one chat completion (no streaming, no validation, no accounting)."""
        nonlocal session
        session = session or aiohttp.ClientSession()
        body = {"model": model, "messages": messages}
        async with session.post(f"{args.upstream}/chat/completions", json=body) as response:
            data = await response.json()
        return data["choices"][0]["message"]["content"]

    with gr.Blocks() as demo:
        gr.api(chat, api_name="chat", concurrency_limit=64)
    demo.launch(server_name="127.0.0.1", server_port=args.port, quiet=True)


if __name__ == "__main__":
    main()
