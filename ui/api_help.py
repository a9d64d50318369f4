"""The API tab: how to call this server from code, with the key and base URL filled in for
the page's address. Gradio's own "Use via API" panel leaves out `auth=` (so its snippets fail
here) and offers an MCP tab although MCP is off; this tab replaces it (the footer link is
removed in ui/server.py)."""

from __future__ import annotations

import inspect

import gradio as gr

from ui import code as codeview

ENDPOINTS = (
    ("/chat", "messages, model, temperature, max_tokens, stop", "streams the reply"),
    ("/completion", "prompt, model, temperature, max_tokens, stop", "streams the text"),
    ("/generate_image", "prompt, model, size, quality, n", "PNG files"),
    ("/embeddings", "texts, model, dimensions", "model, dimensions, vectors, usage"),
    ("/models", "", "the backend's models"),
    ("/usage", "start, end, user, model", "totals, per day, per user, per function"),
    ("/users", "", "admins: the users and their limits"),
    ("/conversations", "search", "your saved chats, newest first"),
    ("/conversation", "id", "one chat as JSON (OpenAI messages, model, settings)"),
    ("/conversation_markdown", "id", "one chat as Markdown"),
    ("/delete_conversation", "id", "delete one of your chats"),
)


def help_markdown(url: str) -> str:
    rows = "\n".join(
        f"| `{name}` | {', '.join(f'`{a}`' for a in args.split(', ')) if args else '—'} | {what} |"
        for name, args, what in ENDPOINTS
    )
    return (
        inspect.cleandoc(
            f"""
        Two ways in, both with your access key (set `ACCESS_KEY` in your shell; a user's own
        key, or the owner's). Each tab's **View code** shows its current request as code.

        **Any OpenAI SDK or tool**: base URL `{url}/v1`, API key = your access key.
        Routes: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
        `/v1/images/generations`, `GET /v1/models`. An empty `model` is the server's default.

        **gradio_client**: `Client("{url}", auth=("your name", os.environ["ACCESS_KEY"]))`,
        then `client.predict(..., api_name="/chat")` (`submit()` streams).

        | endpoint | arguments | returns |
        |---|---|---|
        """
        )
        + f"\n{rows}\n"
    )


def build(demo: gr.Blocks) -> None:
    view = gr.Markdown(help_markdown("http://localhost:8000"), elem_id="api-help")
    example = gr.Markdown(elem_id="api-example")

    def fill(request: gr.Request) -> tuple[str, str]:
        url = codeview.base_url(request)
        hello = {"model": "", "messages": [{"role": "user", "content": "Hello!"}]}
        api = {"messages": hello["messages"], "model": ""}
        return help_markdown(url), codeview.snippets("chat", hello, api, url)

    demo.load(fill, None, [view, example], api_visibility="private")
