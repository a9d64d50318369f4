"""The Usage tab: totals, tokens and cost per day by model, tables, CSV; admins manage users."""

from __future__ import annotations

import asyncio
import html
from datetime import UTC, datetime, timedelta
from typing import Any

import gradio as gr
import pandas as pd

from core import reports
from core.auth import Principal
from core.context import Core
from core.errors import Forbidden, InvalidRequest, ServiceError
from core.users import User
from edge.files import FileRegistry
from ui.common import count_of, notice, report, save_text, signed_in

EVERYONE = ("Everyone", "")
ALL_MODELS = ("All models", "")
USER_COLUMNS = ["name", "role", "status", "daily tokens", "rpm", "created"]


def totals_markdown(totals: dict[str, Any], who: str) -> str:
    return (
        f"**{who}** · {totals['requests']} requests ({totals['succeeded']} ok, "
        f"{totals['failed']} failed, {totals['refused']} refused) · "
        f"**{totals['total_tokens']:,} tokens** ({totals['prompt_tokens']:,} prompt + "
        f"{totals['completion_tokens']:,} completion) · estimated cost "
        f"**${totals['cost_usd']:.4f}**"
    )


def build(core: Core, demo: gr.Blocks, files: FileRegistry) -> None:
    """Build the tab's components and events inside the caller's Blocks."""
    today = datetime.now(UTC).date()
    with gr.Row():
        start = gr.Textbox(label="From (UTC)", value=str(today - timedelta(days=6)), scale=1)
        end = gr.Textbox(label="To (UTC)", value=str(today), scale=1)
        user = gr.Dropdown(label="User", choices=[EVERYONE], value="", scale=1)
        model = gr.Dropdown(
            label="Model", choices=[ALL_MODELS], value="", allow_custom_value=True, scale=1
        )
        with gr.Column(scale=0, min_width=150):
            refresh = gr.Button("Show", variant="primary")
            export = gr.DownloadButton("Export CSV", visible=False)
    summary = gr.Markdown(elem_classes="usage-line")
    with gr.Row():
        # min_width: below two plots' width (a phone), they stack instead of clipping their
        # titles and legends.
        tokens_plot = gr.BarPlot(
            x="day", y="tokens", color="model", title="Tokens per day", height=260, min_width=340,
            elem_id="tokens-plot",
        )  # fmt: skip
        cost_plot = gr.BarPlot(
            x="day", y="cost_usd", color="model", title="Estimated cost per day (USD)",
            height=260, min_width=340, elem_id="cost-plot",
        )  # fmt: skip
    with gr.Row():
        by_user = gr.Dataframe(label="By user", interactive=False)
        by_function = gr.Dataframe(label="By function", interactive=False)

    with gr.Accordion("Manage users (admins)", open=False, visible=False) as admin_box:
        users_table = gr.Dataframe(
            label="Users",
            headers=USER_COLUMNS,
            interactive=False,
            max_height=320,
            elem_id="users-table",
        )
        with gr.Row():
            name = gr.Textbox(label="User name", placeholder="alice", scale=2)
            is_admin = gr.Checkbox(label="Admin", scale=0, min_width=90)
            daily = gr.Number(label="Daily tokens (0 = default)", value=0, precision=0)
            rpm = gr.Number(label="Requests/min (0 = default)", value=0, precision=0)
        with gr.Row():
            add = gr.Button("Add user", variant="primary")
            limits = gr.Button("Set limits")
            rotate = gr.Button("Rotate key")
            disable = gr.Button("Disable", variant="stop")
            enable = gr.Button("Enable")
        # Rotate and Disable end a user's sessions at once: asked again before they run.
        with gr.Row(visible=False, elem_id="admin-confirm") as confirm_row:
            confirm_text = gr.Markdown()
            confirm = gr.Button("Yes, do it", variant="stop", scale=0, min_width=120)
            cancel = gr.Button("Cancel", scale=0, min_width=100)
        pending_action = gr.State(None)  # {"action": ..., "who": ...} awaiting "Yes"
        new_key = gr.Textbox(
            label="New key: shown once, copy it now",
            visible=False,
            interactive=False,
            buttons=["copy"],
        )
        admin_status = gr.Markdown(elem_classes="usage-line", elem_id="admin-status")

    def caller(request: gr.Request) -> Principal:
        return signed_in(core, request)

    # The async handlers below run on the event loop: the database is read in a thread.
    async def show(first: str, last: str, who: str, which: str, request: gr.Request):
        me = caller(request)
        try:
            rows = await asyncio.to_thread(
                reports.usage_rows,
                core.ledger, me, start=first, end=last, user=who or None, model=which or None,
            )  # fmt: skip
        except ServiceError as exc:
            return report(exc), *(gr.skip() for _ in range(5))
        daily = reports.daily_by_model(rows)
        label = (who or "Everyone") if me.is_admin else f"Your usage ({me.name})"
        csv_path = save_text(files, reports.to_csv(rows), name="usage.csv", user=request.username)
        return (
            totals_markdown(reports.totals(rows), label),
            daily,
            daily,
            reports.by_user(rows),
            reports.by_function(rows),
            gr.DownloadButton(value=csv_path, visible=not rows.empty),
        )

    outputs = [summary, tokens_plot, cost_plot, by_user, by_function, export]
    refresh.click(show, [start, end, user, model], outputs, api_visibility="private")

    def users_frame(users: list[User] | None = None) -> pd.DataFrame:
        """The users table: of `users`, else read now (blocking: async code reads them in
        a thread and passes them in)."""
        rows = [
            [
                u.name,
                u.role,
                "disabled" if u.disabled else "active",
                u.daily_tokens or "default",
                u.rpm or "default",
                f"{u.created_at:%Y-%m-%d}",
            ]
            for u in (core.users.list() if users is None else users)
        ]
        return pd.DataFrame(rows, columns=USER_COLUMNS)

    async def on_load(first: str, last: str, request: gr.Request):
        me = caller(request)
        everyone = await asyncio.to_thread(core.users.list) if me.is_admin else []
        names = [EVERYONE, *[u.name for u in everyone]] if me.is_admin else [me.name]
        models = sorted({m.id for m in await _models(core, me)})
        shown = await show(first, last, "" if me.is_admin else me.name, "", request)
        return (
            gr.Accordion(visible=me.is_admin),
            users_frame(everyone) if me.is_admin else gr.skip(),
            gr.Dropdown(
                choices=names, value="" if me.is_admin else me.name, interactive=me.is_admin
            ),
            gr.Dropdown(choices=[ALL_MODELS, *models], value=""),
            *shown,
        )

    demo.load(
        on_load,
        [start, end],
        [admin_box, users_table, user, model, *outputs],
        api_visibility="private",
    )

    def manage(action: str):
        """One handler per admin action; each checks the role on the server."""

        def run(who: str, admin: bool, day_limit: float | None, minute_limit: float | None,
                request: gr.Request):  # fmt: skip
            try:
                if not caller(request).is_admin:
                    raise Forbidden("Only admins may manage users.")
                key, message = _apply(core, action, who.strip(), admin, day_limit, minute_limit)
            except ServiceError as exc:
                return report(exc), gr.Textbox(visible=False, value=""), gr.skip()
            shown_key = gr.Textbox(visible=key is not None, value=key or "")
            return message, shown_key, users_frame()

        return run

    inputs = [name, is_admin, daily, rpm]
    questions = {
        "rotate": "Rotate the key of **{who}**? Their old key and every session stop working now.",
        "disable": "Disable **{who}**? Their key and every session stop working now.",
    }

    def ask(action: str):
        def run(who: str):
            if not who.strip():
                return gr.Row(visible=False), gr.skip(), "", notice("Enter a user name first.")
            question = questions[action].format(who=html.escape(who.strip()))
            # The name asked about is the one acted on, whatever the form holds by "Yes".
            return gr.Row(visible=True), question, {"action": action, "who": who.strip()}, ""

        return run

    for button, action in ((rotate, "rotate"), (disable, "disable")):
        button.click(
            ask(action), [name], [confirm_row, confirm_text, pending_action, admin_status],
            api_visibility="private", queue=False,
        )  # fmt: skip

    def confirmed(pending: Any, _who: str, admin: bool, day_limit, minute_limit,
                  request: gr.Request):  # fmt: skip
        if not isinstance(pending, dict) or pending.get("action") not in questions:
            return gr.Row(visible=False), gr.skip(), gr.skip(), gr.skip()
        run = manage(pending["action"])
        return gr.Row(visible=False), *run(pending["who"], admin, day_limit, minute_limit, request)

    confirm.click(
        confirmed, [pending_action, *inputs], [confirm_row, admin_status, new_key, users_table],
        api_visibility="private",
    )  # fmt: skip
    cancel.click(lambda: (gr.Row(visible=False), None), None, [confirm_row, pending_action],
                 api_visibility="private", queue=False)  # fmt: skip

    def pick(frame: pd.DataFrame, event: gr.SelectData):
        """Clicking a user's row fills the form with that user."""
        row = event.index[0] if isinstance(event.index, list | tuple) else event.index
        record = frame.iloc[row]
        return str(record["name"]), record["role"] == "admin"

    users_table.select(pick, [users_table], [name, is_admin], api_visibility="private")

    for button, action in (
        (add, "add"),
        (limits, "limits"),
        (enable, "enable"),
    ):
        button.click(
            manage(action),
            inputs,
            [admin_status, new_key, users_table],
            api_visibility="private",
        )


def _apply(
    core: Core,
    action: str,
    name: str,
    admin: bool,
    day_limit: float | None,
    minute_limit: float | None,
) -> tuple[str | None, str]:
    """Do one admin action with the same rules as the CLI; returns (new key or None, message)."""
    users = core.users
    try:
        day = count_of(day_limit, "Daily tokens") or 0
        minute = count_of(minute_limit, "Requests/min") or 0
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if action == "add":
        user, key = users.add(name, role="admin" if admin else "user", daily_tokens=day, rpm=minute)
        return key, f"Added **{user.name}** ({user.role}). Copy the key below: it is shown once."
    if action == "rotate":
        user, key = users.rotate(name)
        return key, f"New key for **{user.name}**; the old key and its sessions stopped working."
    if action == "limits":
        user = users.set_limits(name, daily_tokens=day, rpm=minute)
        return None, f"Limits for **{user.name}** saved."
    user = users.set_disabled(name, action == "disable")
    state = "disabled: their key and sessions stopped working" if user.disabled else "enabled"
    return None, f"**{user.name}** {state}."


async def _models(core: Core, me: Principal) -> list[Any]:
    try:
        return await core.service.list_models(caller=me, source="ui")
    except ServiceError:
        return []
