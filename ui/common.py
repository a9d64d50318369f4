"""What every tab shares: turning service errors into gr.Error, and small parsing helpers."""

from __future__ import annotations

import html
import logging
from typing import Any

import gradio as gr

from core.auth import Principal
from core.context import Core
from core.errors import InvalidRequest, ServiceError
from core.service import Service
from edge.files import FileRegistry
from edge.sessions import SCOPE_KEY

log = logging.getLogger("ui")

# Events that call the backend share one concurrency group with a real limit, so users don't
# queue behind each other (Gradio's default is one at a time per event).
LLM_GROUP = "llm"


def to_gr_error(exc: ServiceError) -> gr.Error:
    """The API form of a service error (message and request id, nothing internal)."""
    return gr.Error(str(exc), title=_title(exc), print_exception=False)


def report(exc: ServiceError) -> str:
    """The dashboard form: an error box for the tab's status line, shown once, in one place.

    Raising gr.Error would cover every output with an error badge and hide the conversation,
    and a toast beside the box would say it twice; this leaves the outputs as they were. The
    box is HTML (role=alert, so screen readers announce it): the text is escaped.
    """
    title, text = html.escape(_title(exc)), html.escape(str(exc))
    return f'<div class="error-line" role="alert">⚠️ <strong>{title}:</strong> {text}</div>'


def notice(text: str) -> str:
    """A status-line message that is not an error (already escaped by the caller)."""
    return f'<span role="status">{text}</span>'


_TITLES = {
    "QuotaExceeded": "Quota reached",
    "RateLimited": "Rate limited",
    "Forbidden": "Not allowed",
    "UpstreamForbidden": "Not allowed",
    "Revoked": "Signed out",
    "Unsupported": "Not available",
    "NotConfigured": "Not available",
}


def _title(exc: ServiceError) -> str:
    if title := _TITLES.get(type(exc).__name__):
        return title
    return "Check your input" if exc.status == 400 else "Upstream error"


def code(text: str) -> str:
    """Text shown as inline code in Markdown; escaped, since a model name may come from the
    upstream and a backtick in it would otherwise end the code span."""
    return f"<code>{html.escape(text)}</code>"


def caller_of(core: Core, request: gr.Request | None) -> dict[str, Any]:
    """The service keyword arguments for the signed-in user behind a dashboard event."""
    return {"caller": signed_in(core, request), "source": "ui"}


def signed_in(core: Core, request: gr.Request | None) -> Principal:
    """The signed-in caller behind an event (a handler runs on the event loop if it is
    async): the one the session guard found, off the loop, for the request that started
    the event; without it (no guard in front), core.auth.resolve, which may read the
    database."""
    username = request.username if request is not None else None
    try:
        session = request.request.scope.get(SCOPE_KEY)  # type: ignore[union-attr]
    except AttributeError:  # no request, or not an HTTP one
        session = None
    caller = getattr(session, "caller", None)
    if caller is not None and session.user == username:
        return caller
    return core.auth.resolve(username)


def model_choices(
    service: Service, models: list[Any], kind: str, *, current: str | None = None
) -> gr.Dropdown:
    """A model picker update: the backends' models of one kind, free text still allowed.
    With several backends they are grouped by backend, each labelled with it."""
    default = current or service.default_model(kind)
    fitting = [m for m in models if kind in m.kinds]
    choices: list[Any] = [(_label(m), m.id) for m in fitting]
    if default not in {m.id for m in fitting}:
        choices.insert(0, (default, default))
    return gr.Dropdown(choices=choices, value=default)


def _label(model: Any) -> str:
    """`backend · model` when several backends serve (the id without its backend prefix)."""
    backend = getattr(model, "backend", None)
    if not backend:
        return model.id
    return f"{backend} · {model.id.removeprefix(backend + '/')}"


def parse_stop(text: str) -> list[str]:
    """Stop sequences typed one per line; escapes such as \\n are understood."""
    lines = (text or "").splitlines()
    return [line.replace("\\n", "\n").replace("\\t", "\t") for line in lines if line]


def count_of(value: float | int | None, field: str) -> int | None:
    """A number box (Max tokens, Dimensions, limits) checked in the handler, not by the
    component, whose own error covers every output with a badge and does not name the field:
    0 or empty means none; anything else must be a whole number above 0."""
    if value is None or value == 0:
        return None
    if value < 0 or value != int(value):
        raise ValueError(f"{field} must be a whole number, 0 or more (not {value:g}).")
    return int(value)


def field_error(message: str) -> str:
    """A status-line error for a form field, named in `message`."""
    return f'<div class="error-line" role="alert">⚠️ {html.escape(message)}</div>'


def save_images(files: FileRegistry, images: list[bytes], *, user: str | None) -> list[str]:
    """Write PNG files that only `user` may download (Gradio serves them from its cache)."""
    return [
        files.write(data, f"image-{i}.png", user=user or "")
        for i, data in enumerate(images, start=1)
    ]


def save_text(files: FileRegistry, text: str, *, name: str, user: str | None) -> str:
    """Write a text download (CSV) that only `user` may download."""
    return files.write(text.encode("utf-8"), name, user=user or "")


def uploaded_path(files: FileRegistry, path: str, *, user: str | None) -> str:
    """An uploaded file's real path, if it is one of `user`'s files in Gradio's upload cache;
    the edge already refused anything else, and this checks again where the file is opened."""
    if files.resolve(path) is None or not files.may_read(path, user=user or ""):
        raise InvalidRequest("That file is not one of your uploads. Upload it again.")
    return files.resolve(path) or ""


def backend_notice(service: Service, elem_id: str) -> gr.Markdown | None:
    """The backend's first word to a user (the embedded demo model says what it is), shown
    above a tab's work area; nothing when the backend has none."""
    if not service.notice:
        return None
    return gr.Markdown(service.notice, elem_classes="backend-notice", elem_id=elem_id)
