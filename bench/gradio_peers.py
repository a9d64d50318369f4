"""Two Gradio apps to measure the app's /chat against, started by bench/gateway.py next to it.

    .venv/bin/python bench/gradio_peers.py --kind relay --port 9200 --upstream http://127.0.0.1:9100/v1
    .venv/bin/python bench/gradio_peers.py --kind load_chat --port 9201 --upstream ...

- relay: the least a Gradio endpoint can cost, one gr.api function that relays a chat to the
  upstream (no streaming, validation or accounting), so what Gradio and gradio_client cost is
  seen apart from what the app adds.
- load_chat: Gradio's own gr.load_chat, with its defaults, the alternative the issue names.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import aiohttp
import gradio as gr


def relay(upstream: str) -> gr.Blocks:
    session: aiohttp.ClientSession | None = None

    async def chat(messages: list[dict[str, str]], model: str = "bench-model") -> str:
        """Relay one chat completion (no streaming, no validation, no accounting)."""
        nonlocal session
        session = session or aiohttp.ClientSession()
        body = {"model": model, "messages": messages}
        async with session.post(f"{upstream}/chat/completions", json=body) as response:
            data = await response.json()
        return data["choices"][0]["message"]["content"]

    with gr.Blocks() as demo:
        gr.api(chat, api_name="chat", concurrency_limit=64)
    return demo


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=("relay", "load_chat"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    if args.kind == "relay":
        demo = relay(args.upstream)
    else:
        # file_types=None: a plain text box, so the API takes a string. Its endpoint is
        # /open_api_stream and keeps the conversation per session.
        demo = gr.load_chat(args.upstream, model="bench-model", token="sk-bench", file_types=None)
    demo.launch(server_name="127.0.0.1", server_port=args.port, quiet=True)


if __name__ == "__main__":
    main()
