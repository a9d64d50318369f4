"""The Models tab: the backend's models as a searchable, filterable table."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from core import tables
from core.context import Core
from core.endpoints import ENDPOINTS
from core.errors import ServiceError
from core.service import BackendInfo, Service
from ui.common import caller_of, report

KINDS = ["all", "chat", "completion", "embedding", "image", "audio", "other"]


def honoured_markdown(service: Service) -> str:
    """What each backend does with a request's fields, per function (from the provider's own
    declaration, the list the service enforces)."""
    return "\n\n".join(_honoured(b) for b in service.backends())


def _honoured(backend: BackendInfo) -> str:
    if backend.honours is None:
        return (
            f"**{backend.name}** ({backend.description}): every field of a `/v1` request goes "
            "to the upstream as sent, which reads and answers for each of them."
        )
    lines = [
        f"**{backend.name}** ({backend.description}) honours these fields of a `/v1` request "
        "and refuses any other with a 400 that names it:",
        "",
        "| function | fields |",
        "|---|---|",
    ]
    for function in ENDPOINTS:
        if function in backend.functions:
            names = ", ".join(f"`{n}`" for n in sorted(backend.honours.get(function, ())))
            lines.append(f"| {function} | {names} |")
        else:
            lines.append(f"| {function} | not served |")
    return "\n".join(lines)


def build(core: Core, demo: gr.Blocks) -> None:
    """Build the tab's components and events; the table fills when the page loads."""
    service = core.service
    # align-bottom: the button lines up with the input boxes, not with their labels.
    with gr.Row(elem_classes="align-bottom"):
        search = gr.Textbox(
            label="Search",
            placeholder="Filter by id, owner or backend, e.g. gpt 4",
            scale=3,
            min_width=200,
        )
        kind = gr.Dropdown(label="Kind", choices=KINDS, value="all", scale=1, min_width=120)
        refresh = gr.Button("Refresh", scale=0, min_width=110)
    count = gr.Markdown(
        "Loading the model list…", elem_classes="usage-line", elem_id="models-count"
    )
    several = len(service.backends()) > 1
    columns = ["backend"] * several + ["id", "owned_by", "created", "kind"]
    table = gr.Dataframe(
        label="Models",
        headers=columns,
        interactive=False,
        wrap=True,
        max_height=560,
        elem_id="models-table",
    )
    label = (
        "Request fields each backend honours" if several else "Request fields this backend honours"
    )
    with gr.Accordion(label, open=False):
        gr.Markdown(honoured_markdown(service), elem_id="models-honours")
    # The full list lives per browser session, so filtering needs no new upstream call.
    full = gr.State(pd.DataFrame(columns=columns))

    def show(frame: pd.DataFrame, text: str, chosen: str) -> tuple[pd.DataFrame, str]:
        shown = tables.filter_models(frame, search=text or "", kind=chosen or "all")
        return shown, f"{len(shown)} of {len(frame)} models · {service.describe()}"

    async def load(text: str, chosen: str, request: gr.Request, force: bool = False):
        try:
            models = await service.list_models(refresh=force, **caller_of(core, request))
        except ServiceError as exc:
            return gr.skip(), gr.skip(), report(exc)
        frame = tables.models_frame(models)
        return frame, *show(frame, text, chosen)

    async def reload(text: str, chosen: str, request: gr.Request):
        return await load(text, chosen, request, force=True)

    refresh.click(reload, [search, kind], [full, table, count], api_visibility="private")
    for trigger in (search.change, kind.change):
        trigger(show, [full, search, kind], [table, count], api_visibility="private", queue=False)
    demo.load(load, [search, kind], [full, table, count], api_visibility="private")
