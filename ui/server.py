"""The server: two stacks behind one port. The bearer APIs (/v1, /metrics, /health) take a
short path: CORS, the body limit, a Starlette router. Everything else is the dashboard: FastAPI
with the edge's session, body and file guards, and Gradio mounted behind its login."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sys
from typing import Any

import gradio as gr
from fastapi import FastAPI
from gradio.utils import get_upload_folder

from core.config import Settings
from core.context import Core, open_core
from core.session_store import EndedSessions, key_mark, session_secret
from edge.body import BodyLimit
from edge.files import FileGuard, FileRegistry
from edge.http import ASGIApp, Message, Receive, Scope, Send, is_bearer_api
from edge.origin import OriginPolicy
from edge.proxy import GuardedHttpToolsProtocol, trust_proxies
from edge.sessions import SessionGuard, SessionTable
from gateway.routes import build_router
from ui.chat import PASTE_IMAGES_JS
from ui.layout import CSS, THEME, build_demo

log = logging.getLogger("ui.server")
LOGIN_MESSAGE = "Sign in with your user name and access key."


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


class Server:
    """The ASGI app uvicorn serves: a request for the bearer APIs goes to `api`, every other
    request (and the lifespan, which starts Gradio's queue) to `dashboard`."""

    def __init__(self, api: ASGIApp, dashboard: FastAPI, front: ASGIApp | None = None) -> None:
        self.api = api
        self.dashboard = dashboard
        self.front = front  # forwarded headers, when a proxy is trusted

    @property
    def state(self) -> Any:
        return self.dashboard.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is not None:
            await self.front(scope, receive, send)
        else:
            await self.route(scope, receive, send)

    async def route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_api(scope["path"]):
            await self.api(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.dashboard(scope, receive, self._flushing(send))
        else:
            await self.dashboard(scope, receive, send)

    def _flushing(self, send: Send) -> Send:
        """The lifespan's `send`, writing every queued ledger row before shutdown completes:
        uvicorn re-raises SIGTERM (what Docker and Railway send) after its shutdown, so an
        atexit hook never runs; this does, once the last request has ended."""

        async def flushed(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                core = getattr(self.state, "core", None)
                if core is not None:
                    # Written, the journal removed, the heartbeat row gone (core.ledger).
                    loop = asyncio.get_running_loop()
                    try:
                        closing = loop.run_in_executor(None, core.ledger.close)
                    except RuntimeError:  # the interpreter is exiting: no executor to ask
                        core.ledger.close()
                    else:
                        await closing
                    log.info("ledger written before shutdown")
            await send(message)

        return flushed


def is_api(path: str) -> bool:
    return is_bearer_api(path) or path == "/health"


def create_app(settings: Settings, core: Core | None = None) -> Server:
    """The whole server: the bearer APIs on their own short stack, and Gradio behind its
    login, mounted at the root, with the edge's guards around it."""
    _record_missing_matplotlib()
    _skip_gradio_analytics()
    core = core or open_core(settings)
    files = FileRegistry(
        get_upload_folder(),
        quota_bytes=settings.upload_quota_mb * 1_000_000,
        ttl=settings.upload_ttl_minutes * 60.0,
    )
    demo = build_demo(core, files)
    app = FastAPI(title="AI dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.core = core
    secret = session_secret(
        settings.session_secret.get_secret_value() if settings.session_secret else None,
        settings.data_dir,
        shared_database=settings.database_url is not None,
    )
    assert settings.access_key is not None
    sessions = SessionTable(
        secret=secret,
        idle=settings.session_idle_minutes * 60.0,
        lifetime=settings.session_max_hours * 3600.0,
        on_end=[files.end_session],
        ended=EndedSessions(core.users.engine),
        owner_mark=key_mark(secret, settings.access_key.get_secret_value()),
        gradio_tokens=lambda: _gradio_tokens(app),
    )
    app.state.sessions = sessions
    # Added innermost first: a request meets OriginPolicy, SessionGuard, BodyLimit, FileGuard.
    app.add_middleware(FileGuard, registry=files, max_bytes=settings.max_request_bytes)
    # Bodies are read only for requests that passed the session check (or /login).
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(
        SessionGuard,
        auth=core.auth,
        sessions=sessions,
        gradio_tokens=lambda: _gradio_tokens(app),
        proxies_trusted=bool(settings.forwarded_allow_ips),
        login_message=LOGIN_MESSAGE,
    )
    app.add_middleware(
        OriginPolicy,
        allowed_origins=settings.allowed_origins,
        v1_origins=settings.v1_cors_origins,
        remote_images=settings.allow_remote_images,
    )

    gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=core.auth,
        auth_message=LOGIN_MESSAGE,
        # Never together with auth: Gradio's MCP server is not behind the login.
        mcp_server=False,
        enable_monitoring=False,
        # Not Gradio's "Use via API" panel: its snippets leave out auth= (so they fail here)
        # and it offers MCP, which is off. The API tab (ui/api_help.py) replaces it.
        footer_links=["settings"],
        run_history=False,
        show_error=True,
        theme=THEME,
        css=CSS,
        js=PASTE_IMAGES_JS,
        max_file_size="20mb",
        # Nothing from the data folder (the database) is ever a file Gradio may touch.
        blocked_paths=[str(settings.data_dir.resolve())],
        # Gradio's inner FastAPI app would publish its route schema without a login.
        app_kwargs={"openapi_url": None, "docs_url": None, "redoc_url": None},
    )
    # Gradio checks that an input's file lies in its upload folder only once the app "has
    # launched", which launch() sets and mount_gradio_app() does not: without this, any
    # event input naming /proc/self/environ is copied into the cache and served back.
    demo.has_launched = True
    _quiet_when_idle(demo)
    # Gradio names its session cookie after a random id of each start: the same id on every
    # replica and after a restart, so a signed session's cookie is the one Gradio reads.
    _gradio_app(app).cookie_id = key_mark(secret, "gradio-cookie-id")
    api = OriginPolicy(
        BodyLimit(build_router(core), max_bytes=settings.max_request_bytes),
        allowed_origins=settings.allowed_origins,
        v1_origins=settings.v1_cors_origins,
        remote_images=settings.allow_remote_images,
    )
    server = Server(api, app)
    server.front = trust_proxies(server.route, settings.forwarded_allow_ips)
    return server


# Gradio's queue looks for work every millisecond when it has none to start (idle, or every
# slot busy), and for progress to send every 10 ms: 50-70 ms of CPU per second of a server
# nobody uses. Every 20 ms and 100 ms (on Windows Gradio's own are 50 and 100 ms): an event
# waits at most 20 ms more to start, which nobody sees next to a model's answer, gr.Progress
# updates (the app shows none) go out at most every 100 ms, and an idle server stays idle.
# /v1 never goes through the queue.
IDLE_POLL = 0.02
IDLE_PROGRESS_POLL = 0.1


def _quiet_when_idle(demo: gr.Blocks) -> None:
    queue = getattr(demo, "_queue", None)
    if queue is None or not hasattr(queue, "sleep_when_free"):
        log.warning("Gradio's queue has changed: its idle polling is left as Gradio sets it")
        return
    queue.sleep_when_free = max(queue.sleep_when_free, IDLE_POLL)
    queue.progress_update_sleep_when_free = max(
        queue.progress_update_sleep_when_free, IDLE_PROGRESS_POLL
    )


def server_options() -> dict[str, Any]:
    """uvicorn's settings for this app (app.py and the tests serve it the same way)."""
    return {
        # Forwarded headers are honoured only from FORWARDED_ALLOW_IPS (trusted_proxies),
        # never from uvicorn's default of any loopback peer.
        "proxy_headers": False,
        "http": GuardedHttpToolsProtocol,
        "timeout_keep_alive": 5,
        # On SIGTERM, calls under way get 5 s to end; then the ledger is written and the
        # process exits, well inside Docker's 10 s before SIGKILL. Without it an open stream
        # (a browser's event stream) would hold the shutdown, and the ledger, forever.
        "timeout_graceful_shutdown": 5,
        # Connections and tasks at once; past it uvicorn answers 503 instead of running out.
        "limit_concurrency": 2000,
        "h11_max_incomplete_event_size": 64 * 1024,
        # The service logs one access line per call (core.service.access); uvicorn's line
        # per HTTP request would be a second one, through the same secret filter.
        "access_log": False,
    }


def _gradio_app(app: FastAPI) -> Any:
    """The Gradio app mounted on `app`."""
    for route in app.routes:
        inner = getattr(route, "app", None)
        if isinstance(getattr(inner, "tokens", None), dict):
            return inner
    raise RuntimeError("no Gradio app is mounted")


def _gradio_tokens(app: FastAPI) -> dict[str, str]:
    """The session table of the Gradio app mounted on `app`."""
    return _gradio_app(app).tokens
