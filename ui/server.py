"""The web edge: a FastAPI app with /health and the login guard, and the dashboard mounted on it."""

from __future__ import annotations

import json
import logging
from typing import Any

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from core.auth import AccessKeyAuth, LoginLimiter
from core.config import Settings
from core.service import Service
from ui.layout import CSS, THEME, build_demo

log = logging.getLogger("ui.server")


class LoginGuard:
    """ASGI middleware: lock a client out of POST /login after repeated failures (Gradio has none).

    Pure ASGI, so every other request (streams included) passes through untouched.
    """

    def __init__(self, app: Any, limiter: LoginLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"].rstrip("/") != "/login"
        ):
            await self.app(scope, receive, send)
            return
        client = scope["client"][0] if scope.get("client") else "unknown"
        wait = self.limiter.retry_after(client)
        if wait > 0:
            minutes = max(1, round(wait / 60))
            body = json.dumps(
                {"detail": f"Too many failed logins. Try again in about {minutes} minute(s)."}
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 429,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"retry-after", str(int(wait) + 1).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        status: list[int] = []

        async def send_and_watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, send_and_watch)
        if status and status[0] == 200:
            self.limiter.success(client)
        elif status and 400 <= status[0] < 500:
            self.limiter.failure(client)


def create_app(settings: Settings, service: Service | None = None) -> FastAPI:
    """The whole server: /health, then Gradio behind its login, mounted at the root."""
    service = service or Service(settings)
    demo = build_demo(service)
    app = FastAPI(title="AI dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(
        LoginGuard,
        limiter=LoginLimiter(
            max_failures=settings.login_max_failures, window=settings.login_lockout_seconds
        ),
    )

    # Registered before the mount, or Gradio's catch-all would shadow it.
    @app.get("/health")
    async def health() -> JSONResponse:
        """Public liveness and upstream status; no secret, no key fragment."""
        status = await service.health()
        return JSONResponse(status)

    gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=AccessKeyAuth(settings),
        auth_message="Sign in with any name and the access key (ACCESS_KEY).",
        # Never together with auth: Gradio's MCP server is not behind the login.
        mcp_server=False,
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
