"""'View code': the request on screen as code that runs against this server, with its exact
model and settings: Python with the openai SDK on /v1, gradio_client on the named endpoint
(with auth=, which Gradio's own "Use via API" panel leaves out), and curl."""

from __future__ import annotations

import json
import pprint
import re
from typing import Any

import gradio as gr

# Per function: the /v1 path, the SDK call, and the named endpoint with its argument names.
CALLS = {
    "chat": ("chat/completions", "client.chat.completions.create", "/chat"),
    "completion": ("completions", "client.completions.create", "/completion"),
    "image": ("images/generations", "client.images.generate", "/generate_image"),
    "embedding": ("embeddings", "client.embeddings.create", "/embeddings"),
}


def base_url(request: gr.Request | None) -> str:
    """This server's address as the browser reached it."""
    headers = getattr(request, "headers", None) or {}
    host = headers.get("x-forwarded-host") or headers.get("host") or "localhost:8000"
    scheme = headers.get("x-forwarded-proto") or "http"
    return f"{scheme}://{host}"


def snippets(function: str, v1_body: dict[str, Any], api_args: dict[str, Any], url: str) -> str:
    """Markdown with the three snippets. `v1_body` is the OpenAI request; `api_args` the named
    endpoint's arguments (the same request in the Gradio API's terms)."""
    path, sdk_call, api_name = CALLS[function]
    # Unset settings are left out; the model never is (the SDK requires it; "" is the default).
    body = {k: v for k, v in v1_body.items() if k == "model" or v not in (None, [], "")}
    python = (
        "import os\n\nfrom openai import OpenAI\n\n"
        f'client = OpenAI(base_url="{url}/v1", api_key=os.environ["ACCESS_KEY"])\n'
        f"result = {sdk_call}(**{_py(body)})\n"
        f"print(result)\n"
    )
    arguments = ", ".join(f"{k}={_py(v)}" for k, v in api_args.items())
    gradio = (
        "import os\n\nfrom gradio_client import Client\n\n"
        f'client = Client("{url}", auth=("{{your name}}", os.environ["ACCESS_KEY"]))\n'
        f'result = client.predict({arguments}, api_name="{api_name}")\n'
        "print(result)\n"
    )
    payload = json.dumps(body, indent=2, ensure_ascii=False).replace("'", "'\"'\"'")
    curl = (
        f"curl {url}/v1/{path} \\\n"
        '  -H "Authorization: Bearer $ACCESS_KEY" -H "Content-Type: application/json" \\\n'
        f"  -d '{payload}'\n"
    )
    return "\n\n".join(
        [
            "Your own access key goes in `ACCESS_KEY` (never in the code).",
            "**Python, openai SDK** (`/v1`)",
            _fenced(python, "python"),
            f"**Python, gradio_client** (`{api_name}`)",
            _fenced(gradio, "python"),
            "**curl**",
            _fenced(curl, "bash"),
        ]
    )


def _py(value: Any) -> str:
    return pprint.pformat(value, sort_dicts=False, width=88)


def _fenced(code: str, language: str) -> str:
    """A fence no backtick run in `code` can close (the request may quote Markdown)."""
    longest = max((len(run) for run in re.findall(r"`+", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{code}{fence}"
