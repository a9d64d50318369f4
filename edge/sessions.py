"""Sessions around Gradio's login: lockout, lifetimes, revocation, logout, and default deny.

Gradio checks the login on the routes it chose to protect; this guard denies by default:
every path but the login page, its static assets, /health and the bearer APIs needs a live
session, so a route Gradio left open (heartbeats, cancel, stream uploads) is closed too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request, cookie_parser

from core.auth import LOGIN_CAPTURE, Authenticator, LockedOut, Principal, Revoked
from edge.http import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    client_address,
    header,
    is_bearer_api,
    refuse,
    replay,
)
from edge.login_page import login_page

log = logging.getLogger("edge.sessions")
SESSION_COOKIE = "access-token"
SCOPE_KEY = "dashboard.session"  # where the guard leaves the request's session for others
PUBLIC_PATHS = {
    "/",
    "/login",
    "/login/",
    "/logout",
    "/health",
    "/favicon.ico",
    "/robots.txt",
    "/manifest.json",
    "/theme.css",
    "/gradio_api/theme.css",
}
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
SESSION_STREAMS = ("/gradio_api/queue/data", "/gradio_api/heartbeat/")
NOT_SIGNED_IN = "Not signed in: sign in first (POST /login, or the login page)."
SESSION_ENDED = "Your session ended (signed out, idle too long, or too old). Sign in again."
LOGIN_PAGES = {"/", "/login"}  # not /login/: the form's relative URLs would miss
MAX_LOGIN_BYTES = 16 * 1024  # a name and a key; read here, before the body limit's guard
LOGIN_SECONDS = 10.0  # to send them
LOGOUT_PAGE = b"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Sign out</title>
<style>body{font-family:system-ui,sans-serif;display:grid;place-items:center;height:90vh}
button{font-size:1rem;padding:.5rem 1.25rem}</style></head><body>
<form method="post" action="logout"><p>Sign out of the AI dashboard on this device?</p>
<button type="submit">Sign out</button> <a href="./">Cancel</a></form></body></html>"""


@dataclass
class Session:
    token: str
    user: str  # the name Gradio knows the session by (gr.Request.username)
    principal: Principal
    created: float
    seen: float


class SessionTable:
    """Live sessions, least recently used first: expiry pops from the front, so each request
    costs the same however many sessions there are. A user holds at most `max_per_user`
    sessions (the one they used least recently ends), so one user cannot grow the table
    without bound, while a script's many busy clients all stay signed in."""

    max_per_user = 100

    def __init__(
        self, *, idle: float, lifetime: float, on_end: list[Callable[[Session], None]]
    ) -> None:
        self.idle = idle
        self.lifetime = lifetime
        self.on_end = on_end
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        # user -> their tokens, least recently used first
        self._by_user: dict[str, OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, token: str, user: str, principal: Principal) -> Session:
        now = time.monotonic()
        self._expire_idle(now)
        session = Session(token, user, principal, created=now, seen=now)
        self._sessions[token] = session
        mine = self._by_user.setdefault(user, OrderedDict())
        mine[token] = None
        while len(mine) > self.max_per_user:
            self.end(next(iter(mine)), f"the user has more than {self.max_per_user} sessions")
        return session

    def get(self, token: str) -> Session | None:
        """The live session for a token (now marked as used), or None."""
        now = time.monotonic()
        self._expire_idle(now)
        session = self._sessions.get(token)
        if session is None:
            return None
        if now - session.created > self.lifetime:
            self.end(token, "reached SESSION_MAX_HOURS")
            return None
        session.seen = now
        self._sessions.move_to_end(token)
        self._by_user[session.user].move_to_end(token)
        return session

    def end(self, token: str, reason: str) -> None:
        session = self._sessions.pop(token, None)
        if session is None:
            return
        mine = self._by_user.get(session.user)
        if mine is not None:
            mine.pop(token, None)
            if not mine:
                del self._by_user[session.user]
        log.info("session of %r ended: %s", session.user, reason)
        for callback in self.on_end:
            callback(session)

    def _expire_idle(self, now: float) -> None:
        while self._sessions:
            token, oldest = next(iter(self._sessions.items()))
            if now - oldest.seen <= self.idle:
                return
            self.end(token, "idle for SESSION_IDLE_MINUTES")


class SessionGuard:
    """Pure ASGI (streams pass untouched): login with lockout, then one live session per
    request on every path that is not public."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        auth: Authenticator,
        sessions: SessionTable,
        gradio_tokens: Callable[[], dict[str, str]],
        proxies_trusted: bool = False,
        login_message: str = "Sign in with your user name and access key.",
    ) -> None:
        self.app = app
        self.login_page = login_page(login_message)
        self.auth = auth
        self.sessions = sessions
        self.gradio_tokens = gradio_tokens  # Gradio's own table (token -> user name)
        self.warned_proxy = proxies_trusted  # nothing to warn about then

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope.get("method", "GET")
        if is_bearer_api(path) or path.startswith(PUBLIC_PREFIXES):
            # Keys in a header, checked by the API; or the page's static files, which are the
            # same for everyone (no session lookup for each of a page load's many requests).
            await self.app(scope, receive, send)
            return
        if method == "POST" and path.rstrip("/") == "/login":
            await self._checked_login(scope, receive, send)
            return
        session, why = self._session(scope)
        if session is None and method in ("GET", "HEAD") and path in LOGIN_PAGES:
            await self._page(send, self.login_page)
            return
        if path == "/logout":
            await self._logout(scope, send, session)
            return
        if session is None and path not in PUBLIC_PATHS:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await refuse(scope, send, 401, why)
            return
        scope[SCOPE_KEY] = session
        if path.startswith(SESSION_STREAMS):
            await quietly(self.app, scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _session(self, scope: Scope) -> tuple[Session | None, str]:
        """The request's live session (or why there is none). Every token it carries is
        checked, so a decoy cookie in front cannot hide a revoked one."""
        live, why = None, NOT_SIGNED_IN
        for token in session_tokens(scope):
            session = self.sessions.get(token)
            if session is None:
                self.gradio_tokens().pop(token, None)  # not ours: Gradio must not honour it
                why = SESSION_ENDED
                continue
            try:
                self.auth.check_active(session.principal)
            except Revoked:
                self.sessions.end(token, "its key was disabled or rotated")
                live, why = None, Revoked.default_message
                break
            live = live or session
        return live, why

    async def _page(self, send: Send, body: bytes) -> None:
        headers = [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _checked_login(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The sign-in form, read and tidied before Gradio's /login sees it: surrounding spaces
        trimmed from the name and the key (a pasted key often ends in one), and an empty field
        refused with a message, without counting toward the lockout (it guesses nothing)."""
        body, seen = [], 0
        deadline = time.monotonic() + LOGIN_SECONDS
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                await refuse(scope, send, 408, "The sign-in form did not arrive in time.")
                return
            if message["type"] == "http.disconnect":
                return
            seen += len(message.get("body", b""))
            if seen > MAX_LOGIN_BYTES:
                await refuse(scope, send, 413, "The sign-in form is too large.")
                return
            body.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        try:
            form: FormData = await Request(scope, replay(b"".join(body), receive)).form()
        except Exception:  # not a form at all (multipart or urlencoded)
            form = FormData()
        name = str(form.get("username") or "").strip()
        key = str(form.get("password") or "").strip()
        for value, missing in ((name, "Enter your user name."), (key, "Enter your access key.")):
            if not value:
                await refuse(scope, send, 400, missing)
                return
        tidy = urlencode({"username": name, "password": key}).encode()
        headers = [
            (k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")
        ]
        headers += [
            (b"content-type", b"application/x-www-form-urlencoded"),
            (b"content-length", str(len(tidy)).encode()),
        ]
        await self._login({**scope, "headers": headers}, replay(tidy, receive), send)

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The lockout is checked and counted inside the auth hook, in one synchronous step:
        # a locked-out address may still sign in with a user's own key (see Authenticator).
        client = client_address(scope)
        if not self.warned_proxy and header(scope, b"x-forwarded-for") is not None:
            self.warned_proxy = True
            log.warning(
                "requests carry X-Forwarded-For from %s, which FORWARDED_ALLOW_IPS does not "
                "trust: lockouts count every client as that address. Set FORWARDED_ALLOW_IPS "
                "to your proxy's address if it is one.",
                client,
            )
        previous = session_tokens(scope)
        holder: dict = {"client": client}
        status: list[int] = []
        new_tokens: list[str] = []
        replaced = False

        async def watch(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the app's own answer was swapped for the lockout's
            if message["type"] == "http.response.start":
                if locked := holder.get("locked"):
                    replaced = True
                    await _locked(scope, send, locked)
                    return
                status.append(message["status"])
                for name, value in message.get("headers", []):
                    if name.lower() == b"set-cookie" and value.startswith(SESSION_COOKIE.encode()):
                        new_tokens.append(value.decode().split(";", 1)[0].split("=", 1)[1])
            await send(message)

        reset = LOGIN_CAPTURE.set(holder)
        try:
            await self.app(scope, receive, watch)
        finally:
            LOGIN_CAPTURE.reset(reset)
        principal = holder.get("principal")
        if status and status[0] == 200 and principal is not None:
            for token in new_tokens:
                user = self.gradio_tokens().get(token, principal.name)
                self.sessions.add(token, user, principal)
            for token in previous:
                if token not in new_tokens:
                    self.sessions.end(token, "replaced by a new sign-in")

    async def _logout(self, scope: Scope, send: Send, session: Session | None) -> None:
        """GET shows a confirmation (so a link on another site cannot sign anyone out);
        POST ends this browser's session only, not the user's others."""
        if scope["method"] != "POST":
            headers = [(b"content-type", b"text/html; charset=utf-8")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": LOGOUT_PAGE})
            return
        if session is not None:
            self.sessions.end(session.token, "signed out")
        headers = [(b"location", b"./")]
        for name, _ in session_cookies(scope):
            headers.append((b"set-cookie", f"{name}=; Max-Age=0; Path=/".encode()))
        await send({"type": "http.response.start", "status": 303, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


async def quietly(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run a Gradio session stream; when Gradio refuses it after the stream began (an
    unknown session_hash raises inside the stream), log one line and end the answer cleanly
    instead of a hundred-line traceback per request."""
    started = False

    async def watch(message: Message) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive, watch)
    except Exception as exc:
        refusal = exc if isinstance(exc, HTTPException) else exc.__cause__
        if not isinstance(refusal, HTTPException):
            raise
        log.info("%s refused: %s %s", scope["path"], refusal.status_code, refusal.detail)
        if started:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await refuse(scope, send, refusal.status_code, str(refusal.detail))


async def _locked(scope: Scope, send: Send, exc: LockedOut) -> None:
    retry = [(b"retry-after", str(int(exc.retry_after or 1) + 1).encode())]
    await refuse(scope, send, 429, exc.message, code="rate_limit_exceeded", headers=retry)


def session_cookies(scope: Scope) -> list[tuple[str, str]]:
    """Every (name, token) session cookie the request carries, parsed the way Starlette (so
    Gradio) parses them: all of them, since a cookie SimpleCookie gives up on must not hide
    the ones after it."""
    found = []
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            cookies = cookie_parser(value.decode("latin-1"))
            found += [(k, v) for k, v in cookies.items() if k.startswith(SESSION_COOKIE)]
    return found


def session_tokens(scope: Scope) -> list[str]:
    return [token for _, token in session_cookies(scope)]
