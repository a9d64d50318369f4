"""The Image tab: prompt, model, size, quality, count; a gallery with downloads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from core.context import Core
from core.errors import ServiceError
from core.schemas import IMAGE_QUALITIES, IMAGE_SIZES, MAX_IMAGES
from edge.files import FileRegistry
from ui import code as codeview
from ui.common import LLM_GROUP, caller_of, code, report, save_images


@dataclass
class ImageTab:
    model: gr.Dropdown


def build(core: Core, files: FileRegistry) -> ImageTab:
    """Build the tab's components and events inside the caller's Blocks."""
    service = core.service
    default_model = service.default_model("image")
    served = service.serves("image")
    if not served:  # said before anyone tries, and nothing offered that cannot work
        gr.Markdown(
            f"**Images are not available here.** {service.unavailable('image')}",
            elem_classes="backend-notice",
            elem_id="images-notice",
        )
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            prompt = gr.Textbox(
                label="Prompt",
                lines=4,
                placeholder="A watercolor lighthouse at dawn",
                interactive=served,
            )
            run = gr.Button("Generate", variant="primary", interactive=served)
            model = gr.Dropdown(
                label="Model",
                choices=[default_model] if default_model else [],
                value=default_model or None,
                allow_custom_value=True,
                interactive=served,
            )
            with gr.Row():
                size = gr.Dropdown(label="Size", choices=list(IMAGE_SIZES), value="auto")
                quality = gr.Dropdown(label="Quality", choices=list(IMAGE_QUALITIES), value="auto")
            count = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Number of images")
            with gr.Accordion("View code", open=False):
                show_code = gr.Button("Code for this request", size="sm", interactive=served)
                code_view = gr.Markdown(elem_id="images-code")
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="Images",
                columns=2,
                height=520,
                object_fit="contain",
                buttons=["download", "fullscreen"],
                format="png",
                elem_id="image-gallery",
            )
            status = gr.Markdown(
                "Generated images appear here, ready to download."
                if served
                else "This backend makes no images (see above).",
                elem_classes="usage-line",
                elem_id="images-status",
            )

    async def generate(
        text: str,
        model_name: str,
        size_value: str,
        quality_value: str,
        n: float,
        request: gr.Request,
    ) -> tuple[Any, str]:
        body = {
            "prompt": text or "",
            "model": (model_name or "").strip() or None,
            "size": size_value,
            "quality": quality_value,
            "n": int(n),
        }
        try:
            result = await service.generate_images(body, **caller_of(core, request))
        except ServiceError as exc:
            return gr.skip(), report(exc)
        paths = save_images(files, result.images, user=request.username)
        noun = "image" if len(paths) == 1 else "images"
        # Open the first image whole (a lone image in the grid is cropped to its height), with
        # the download and full-screen buttons in view; thumbnails of the rest below.
        return (
            gr.Gallery(value=paths, selected_index=0),
            f"{len(paths)} {noun} from {code(result.model)}. Use the buttons on the image to "
            "download it or view it full screen.",
        )

    run.click(
        generate,
        [prompt, model, size, quality, count],
        [gallery, status],
        api_visibility="private",
        concurrency_id=LLM_GROUP,
    )

    def image_code(text, model_name, size_value, quality_value, n, request: gr.Request) -> str:
        model_id = (model_name or "").strip() or service.default_model("image")
        v1 = {"model": model_id, "prompt": text or "", "size": size_value,
              "quality": quality_value, "n": int(n)}  # fmt: skip
        api = {"prompt": text or "", "model": model_id, "size": size_value,
               "quality": quality_value, "n": int(n)}  # fmt: skip
        return codeview.snippets("image", v1, api, codeview.base_url(request))

    show_code.click(
        image_code, [prompt, model, size, quality, count], [code_view], api_visibility="private"
    )
    return ImageTab(model=model)
