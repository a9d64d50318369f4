"""The Blocks: a header line, one tab per function, and the named API endpoints."""

from __future__ import annotations

import html

import gradio as gr

from core.auth import display_name
from core.context import Core
from core.errors import ServiceError
from edge.files import FileRegistry
from ui import api, api_help, chat, compare, completion, embeddings, images, models, usage
from ui.common import caller_of, model_choices

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate")
CSS = """
.app-header { display: flex; flex-wrap: wrap; gap: .25rem 1rem; align-items: baseline; }
.app-header h1 { font-size: 1.35rem; margin: 0; }
/* Body text colour, not Gradio's "subdued" grey (2.4:1 on white): WCAG AA wants 4.5:1. */
.app-header .meta { color: var(--body-text-color); font-size: .9rem; }
.app-header .meta a { white-space: nowrap; }
.usage-line { color: var(--body-text-color); font-size: .85rem; min-height: 1.2em; }
.usage-line .error-line {
  color: var(--error-text-color); background: var(--error-background-fill);
  border: 1px solid var(--error-border-color); border-radius: var(--radius-md);
  padding: .5rem .75rem; font-size: .9rem;
}
.gradio-container .align-bottom { align-items: flex-end; }
.backend-notice {
  border: 1px solid var(--border-color-accent); background: var(--background-fill-secondary);
  border-radius: var(--radius-md); padding: .5rem .75rem; font-size: .9rem;
}
/* Gradio gives the class to the block and to the Markdown inside it: one frame only. */
.backend-notice .backend-notice { border: 0; padding: 0; background: none; }
.button-row button { white-space: nowrap; }
/* Gradio pads the page by 2rem a side, a sixth of a phone's width. Not in the media query:
   Gradio scopes those rules to the content area, and this element is its parent. */
.gradio-container .app.main {
  padding-left: clamp(.75rem, 4vw, 2rem); padding-right: clamp(.75rem, 4vw, 2rem);
}
@media (max-width: 640px) {
  .app-header { gap: .1rem .75rem; }
  .app-header h1 { font-size: 1.15rem; flex-basis: 100%; }
  .app-header .meta { font-size: .8rem; }
  /* Gradio sets the chat's height inline; on a phone the message box must stay in view. */
  #chatbot { height: 45vh !important; }
  /* On a phone the columns stack: the chat first, its model and settings right after it (the
     conversation scrolls in its own box), the list of saved chats last. */
  #chat-history { order: 3; }
  /* Four buttons share a phone's width: a label takes two lines rather than overflow. */
  .button-row button { white-space: normal; padding-left: .4rem; padding-right: .4rem; }
}
"""


def header_html(username: str | None, upstream: str) -> str:
    """The header line: product, upstream, user, logout (all escaped)."""
    signed_in = ""
    if username is not None:  # filled in by the page's load event, once the user is known
        user = html.escape(display_name(username))
        signed_in = (
            f'<span class="meta">Signed in as <b>{user}</b> · <a href="logout">Log out</a></span>'
        )
    return (
        '<div class="app-header"><h1>AI dashboard</h1>'
        f'<span class="meta">Upstream: {html.escape(upstream)}</span>{signed_in}</div>'
    )


def build_demo(core: Core, files: FileRegistry) -> gr.Blocks:
    """Compose the dashboard; importable and testable without launching."""
    service = core.service
    # delete_cache: Gradio's copies of generated files go after an hour, checked hourly.
    with gr.Blocks(title="AI dashboard", fill_width=True, delete_cache=(3600, 3600)) as demo:
        header = gr.HTML(header_html(None, service.describe()))
        # "wrap": on a phone the tabs take a second line instead of hiding in a "..." menu.
        with gr.Tabs(overflow_behavior="wrap"):
            with gr.Tab("Chat"):
                chat_tab = chat.build(core, files, demo)
            with gr.Tab("Compare"):
                compare_tab = compare.build(core)
            with gr.Tab("Completion"):
                completion_tab = completion.build(core)
            with gr.Tab("Images"):
                image_tab = images.build(core, files)
            with gr.Tab("Embeddings"):
                embeddings_tab = embeddings.build(core, files)
            with gr.Tab("Models"):
                models.build(core, demo)
            with gr.Tab("Usage"):
                usage.build(core, demo, files)
            with gr.Tab("API"):
                api_help.build(demo)
        api.register(core, files)

        # (the kind of model a picker offers, the picker)
        pickers = [
            ("chat", chat_tab.model),
            ("chat", compare_tab.left),
            ("chat", compare_tab.right),
            ("completion", completion_tab.model),
            ("image", image_tab.model),
            ("embedding", embeddings_tab.model),
        ]

        async def on_load(request: gr.Request):
            """Fill the header with the signed-in user, and the model pickers from the backend."""
            head = header_html(request.username, service.describe())
            try:
                listed = await service.list_models(**caller_of(core, request))
            except ServiceError:
                # The pickers keep their defaults and accept free text; the Models tab says why.
                return head, *(gr.skip() for _ in pickers)
            return head, *(
                model_choices(service, listed, kind) if service.serves(kind) else gr.skip()
                for kind, _ in pickers
            )

        demo.load(on_load, None, [header, *(p for _, p in pickers)], api_visibility="private")
    demo.queue(default_concurrency_limit=service.settings.max_concurrency)
    return demo
