"""The Embeddings tab: vectors for texts, a summary table, a similarity heatmap, CSV export."""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from core import tables
from core.context import Core
from core.errors import InvalidRequest, ServiceError
from edge.files import FileRegistry
from ui import code as codeview
from ui.common import (
    LLM_GROUP,
    caller_of,
    code,
    count_of,
    field_error,
    report,
    save_text,
    uploaded_path,
)


@dataclass
class EmbeddingsTab:
    model: gr.Dropdown


def heat(value: float) -> str:
    """Cell colour for a cosine similarity: white at 0, deep blue at 1, red below 0."""
    v = max(-1.0, min(1.0, float(value)))
    if v >= 0:
        r, g, b = (int(255 - v * (255 - c)) for c in (37, 99, 235))
    else:
        r, g, b = (int(255 + v * (255 - c)) for c in (220, 38, 38))
    text = "#ffffff" if abs(v) > 0.6 else "#111827"
    return f"background-color: rgb({r},{g},{b}); color: {text}"


def styled_similarity(frame: pd.DataFrame) -> pd.io.formats.style.Styler:
    """The matrix with its row labels as a first column (the table shows no index), coloured."""
    scores = list(frame.columns)
    labelled = frame.rename_axis("text").reset_index()
    return labelled.style.map(heat, subset=scores).format("{:.3f}", subset=scores)


def build(core: Core, files: FileRegistry) -> EmbeddingsTab:
    """Build the tab's components and events inside the caller's Blocks."""
    service = core.service
    default_model = service.default_model("embedding")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            texts = gr.Textbox(
                label="Texts, one per line",
                info="Or upload a file below: .txt, a text per line; .csv, a 'text' column.",
                lines=6,
                max_lines=20,
                placeholder="The cat sat on the mat.\nA cat is on the mat.\nStocks fell.",
            )
            # A small drop zone without a floating label (which would cover its icon): at
            # Gradio's default size it dwarfs the texts box above it.
            upload = gr.File(
                label="Texts file (.txt or .csv)",
                show_label=False,
                file_types=[".txt", ".csv"],
                height=130,
                elem_id="embeddings-upload",
            )
            with gr.Row():
                model = gr.Dropdown(
                    label="Model",
                    choices=[default_model],
                    value=default_model,
                    allow_custom_value=True,
                    scale=3,
                    min_width=220,
                )
                dimensions = gr.Number(
                    label="Dimensions",
                    value=0,
                    precision=0,
                    info="0 = the model's default",
                    scale=2,
                    min_width=120,
                )
            run = gr.Button("Embed", variant="primary")
            with gr.Accordion("View code", open=False):
                show_code = gr.Button("Code for these texts", size="sm")
                code_view = gr.Markdown(elem_id="embeddings-code")
            summary = gr.Markdown(
                "Press Embed to see each text's vector and how similar every pair is.",
                elem_classes="usage-line",
                elem_id="embeddings-status",
            )
            download = gr.DownloadButton("Download vectors (CSV)", visible=False)
        with gr.Column(scale=3):
            table = gr.Dataframe(
                label="Vectors",
                value=pd.DataFrame(columns=["text", "dimensions", "norm", "first values"]),
                interactive=False,
                wrap=True,
                # Pixels, not percentages: on a phone the table scrolls instead of breaking words.
                column_widths=[240, 120, 90, 270],
                elem_id="embeddings-vectors",
            )
            similarity = gr.Dataframe(
                label="Cosine similarity (darker = more similar)",
                interactive=False,
                wrap=True,
                visible=False,
                elem_id="embeddings-similarity",
            )

    async def embed(
        text: str, file: str | None, model_name: str, dims: float | None, request: gr.Request
    ):
        unchanged = (gr.skip(), gr.skip(), gr.skip())
        source = ""
        items = [line.strip() for line in (text or "").splitlines() if line.strip()]
        if file:
            try:
                found, source = tables.texts_from_file(
                    uploaded_path(files, file, user=request.username)
                )
                items += found
            except InvalidRequest as exc:
                return report(exc), *unchanged
            except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
                return report(InvalidRequest(f"Could not read the upload: {exc}")), *unchanged
        if not items:
            return report(InvalidRequest("Enter at least one text, or upload a file.")), *unchanged
        try:
            dimensions = count_of(dims, "Dimensions")
        except ValueError as exc:
            return field_error(str(exc)), *unchanged
        model_id = (model_name or "").strip() or None
        body = {"texts": items, "model": model_id, "dimensions": dimensions}
        try:
            result = await service.embeddings(body, **caller_of(core, request))
        except ServiceError as exc:
            return report(exc), *unchanged
        csv = tables.vectors_csv(items, result)
        csv_path = save_text(files, csv, name="embeddings.csv", user=request.username)
        line = (
            f"{len(items)} texts · {code(result.model)} · {result.dimensions} dimensions · "
            f"{result.usage.total_tokens} tokens"
        )
        if source:
            line += f" · from the upload: {html.escape(source)}"
        return (
            line,
            tables.embeddings_frame(items, result),
            gr.Dataframe(
                value=styled_similarity(tables.similarity_frame(items, result)), visible=True
            ),
            gr.DownloadButton(value=csv_path, visible=True),
        )

    run.click(
        embed,
        [texts, upload, model, dimensions],
        [summary, table, similarity, download],
        api_visibility="private",
        concurrency_id=LLM_GROUP,
    )

    def embedding_code(text: str, model_name: str, dims: float | None, request: gr.Request):
        items = [line.strip() for line in (text or "").splitlines() if line.strip()]
        try:
            dimensions = count_of(dims, "Dimensions")
        except ValueError as exc:
            return field_error(str(exc))
        model_id = (model_name or "").strip() or service.default_model("embedding")
        v1 = {"model": model_id, "input": items, "dimensions": dimensions}
        api = {"texts": items, "model": model_id, "dimensions": dimensions or 0}
        return codeview.snippets("embedding", v1, api, codeview.base_url(request))

    show_code.click(
        embedding_code, [texts, model, dimensions], [code_view], api_visibility="private"
    )
    return EmbeddingsTab(model=model)
