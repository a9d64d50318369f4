"""The web edge: FastAPI with /health and the session guard, and the dashboard mounted on it."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import cookie_parser

from core.auth import LOGIN_CAPTURE, LoginLimiter, Principal, Revoked
from core.config import Settings
from core.context import Core, open_core
from gateway.routes import build_router
from ui.layout import CSS, THEME, build_demo

log = logging.getLogger("ui.server")
SESSION_COOKIE = "access-token"


async def _send_json(send: Any, status: int, body: dict, headers: list | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


class SessionGuard:
    """ASGI middleware around Gradio's login and sessions (pure ASGI: streams pass untouched).

    - POST /login: lock a client out after repeated failures (Gradio has no limit), and bind
      each new session to the key that opened it.
    - Every other request: a session whose user was disabled, or whose key was rotated since,
      is ended at once (Gradio's own sessions never expire).
    """

    def __init__(
        self,
        app: Any,
        core: Core,
        limiter: LoginLimiter,
        gradio_tokens: Callable[[], dict[str, str]],
    ) -> None:
        self.app = app
        self.core = core
        self.limiter = limiter
        self.sessions: dict[str, Principal] = {}
        self.gradio_tokens = gradio_tokens  # Gradio's own session table (token -> user name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif scope["method"] == "POST" and scope["path"].rstrip("/") == "/login":
            await self._login(scope, receive, send)
        elif (tokens := _session_tokens(scope)) and not all(
            [self._still_valid(token) for token in tokens]  # a list: check (and end) them all
        ):
            await _send_json(send, 401, {"detail": Revoked.default_message})
        else:
            await self.app(scope, receive, send)

    async def _login(self, scope: dict, receive: Any, send: Any) -> None:
        client = scope["client"][0] if scope.get("client") else "unknown"
        wait = self.limiter.retry_after(client)
        if wait > 0:
            minutes = max(1, round(wait / 60))
            detail = f"Too many failed logins. Try again in about {minutes} minute(s)."
            retry = [(b"retry-after", str(int(wait) + 1).encode())]
            await _send_json(send, 429, {"detail": detail}, retry)
            return
        status: list[int] = []
        new_tokens: list[str] = []

        async def send_and_watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                for name, value in message.get("headers", []):
                    if name.lower() == b"set-cookie" and value.startswith(SESSION_COOKIE.encode()):
                        new_tokens.append(value.decode().split(";", 1)[0].split("=", 1)[1])
            await send(message)

        holder: dict[str, Principal] = {}
        reset = LOGIN_CAPTURE.set(holder)
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            LOGIN_CAPTURE.reset(reset)
        if status and status[0] == 200:
            self.limiter.success(client)
            if principal := holder.get("principal"):
                if len(self.sessions) > 10_000:
                    # Forget sessions Gradio itself has ended (logout removes its tokens).
                    live = self.gradio_tokens()
                    self.sessions = {t: p for t, p in self.sessions.items() if t in live}
                for token in new_tokens:
                    self.sessions[token] = principal
        elif status and 400 <= status[0] < 500:
            self.limiter.failure(client)

    def _still_valid(self, token: str) -> bool:
        principal = self.sessions.get(token)
        if principal is None:
            return True  # not ours to judge (Gradio itself refuses unknown tokens)
        try:
            self.core.auth.check_active(principal)
        except Revoked:
            log.info("session of %r ended: its key was disabled or rotated", principal.name)
            self.sessions.pop(token, None)
            self.gradio_tokens().pop(token, None)
            return False
        return True


def _session_tokens(scope: dict) -> list[str]:
    """Every session token the request carries, parsed the way Starlette (so Gradio) parses them.

    All of them, not the first: a decoy cookie in front must not hide a revoked session, and a
    cookie that http.cookies.SimpleCookie gives up on must not hide the ones after it.
    """
    tokens = []
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            cookies = cookie_parser(value.decode("latin-1"))
            tokens += [v for k, v in cookies.items() if k.startswith(SESSION_COOKIE)]
    return tokens


def _record_missing_matplotlib() -> None:
    """Gradio imports matplotlib around every event. Where it is not installed, each failed
    import searches sys.path again (a few ms of CPU per call); record its absence once."""
    if importlib.util.find_spec("matplotlib") is None:
        sys.modules.setdefault("matplotlib", None)  # type: ignore[arg-type]


def _skip_gradio_analytics() -> None:
    """After every event Gradio's queue rebuilds a pandas DataFrame of its last 10,000 events for
    its /monitoring page, which this app turns off (Prometheus /metrics and the Usage tab do that
    job): a third of the server's CPU under load. Keep one record and never summarise it. Read
    when the queue is made; an operator's own setting wins."""
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(2**62))


def create_app(settings: Settings, core: Core | None = None) -> FastAPI:
    """The whole server: /health, then Gradio behind its login, mounted at the root."""
    _record_missing_matplotlib()
    _skip_gradio_analytics()
    core = core or open_core(settings)
    demo = build_demo(core)
    app = FastAPI(title="AI dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.core = core
    limiter = LoginLimiter(
        max_failures=settings.login_max_failures, window=settings.login_lockout_seconds
    )
    app.add_middleware(
        SessionGuard, core=core, limiter=limiter, gradio_tokens=lambda: _gradio_tokens(app)
    )

    # Registered before the mount, or Gradio's catch-all would shadow them.
    app.include_router(build_router(core))

    @app.get("/health")
    async def health() -> JSONResponse:
        """Public liveness and upstream status; no secret, no key fragment."""
        return JSONResponse(await core.service.health())

    gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=core.auth,
        auth_message="Sign in with your user name and access key.",
        # Never together with auth: Gradio's MCP server is not behind the login.
        mcp_server=False,
        enable_monitoring=False,
        footer_links=["api", "settings"],
        run_history=False,
        show_error=True,
        theme=THEME,
        css=CSS,
        max_file_size="20mb",
        # Gradio's inner FastAPI app would publish its route schema without a login.
        app_kwargs={"openapi_url": None, "docs_url": None, "redoc_url": None},
    )
    return app


def _gradio_tokens(app: FastAPI) -> dict[str, str]:
    """The session table of the Gradio app mounted on `app`."""
    for route in app.routes:
        tokens = getattr(getattr(route, "app", None), "tokens", None)
        if isinstance(tokens, dict):
            return tokens
    return {}
