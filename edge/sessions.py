"""Sessions around Gradio's login: lockout, lifetimes, revocation, logout, and default deny.

Gradio checks the login on the routes it chose to protect; this guard denies by default:
every path but the login page, its static assets, /health and the bearer APIs needs a live
session, so a route Gradio left open (heartbeats, cancel, stream uploads) is closed too.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode

import sqlalchemy as sa
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request, cookie_parser

from core.auth import LOGIN_CAPTURE, Authenticator, LockedOut, Principal, Revoked, SignIn
from core.session_store import EndedSessions, decode, encode
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
DATABASE_DOWN = "The database is not answering, so your session cannot be checked. Try again soon."
SIGN_IN_DOWN = "The database is not answering, so sign-ins cannot be checked. Try again soon."
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
    token: str  # the session's id (its token's jti): the same across cookie refreshes
    user: str  # the name Gradio knows the session by (gr.Request.username)
    principal: Principal
    created: float  # wall-clock seconds, as in the token
    seen: float
    cookie: str = ""  # the signed token the browser holds
    cookie_name: str = SESSION_COOKIE  # Gradio's name for it (the app's cookie id in it)
    # Who this request's events run as (Authenticator.resolve, with the user's limits), found
    # by the guard off the event loop, for handlers that run on it (ui.common.caller_of).
    caller: Principal | None = None


class SessionTable:
    """Sessions as signed tokens (core.session_store): nothing about a live session is kept
    in this process, so any replica with the same secret accepts it and a restart keeps it.
    A session ends when idle too long (its last-use mark, refreshed in the cookie at most
    once a minute), when too old (SESSION_MAX_HOURS from sign-in), at sign-out (written to
    the database for every replica), or when its key is disabled or rotated.

    Gradio checks its own table of tokens: each signed token in use is entered there, at
    most `max_known` at once (the least recently used goes, and comes back on its next use).
    """

    refresh_every = 60.0
    max_known = 10_000

    def __init__(
        self,
        *,
        secret: bytes,
        idle: float,
        lifetime: float,
        on_end: list[Callable[[Session], None]],
        ended: EndedSessions | None = None,
        owner_mark: str = "",
        gradio_tokens: Callable[[], dict[str, str]] = dict,
    ) -> None:
        self.secret = secret
        self.idle = idle
        self.lifetime = lifetime
        self.on_end = on_end
        self.ended = ended
        self.owner_mark = owner_mark
        self.gradio_tokens = gradio_tokens
        self._known: OrderedDict[str, str] = OrderedDict()  # cookie -> jti, known to Gradio

    def __len__(self) -> int:
        return len(self._known)

    def issue(self, user: str, principal: Principal) -> Session:
        """A new session for a sign-in, with its signed cookie (entered in Gradio's table)."""
        now = time.time()
        session = Session(secrets.token_urlsafe(16), user, principal, created=now, seen=now)
        session.cookie = self._sign(session)
        self.know(session)
        return session

    def _sign(self, session: Session) -> str:
        p = session.principal
        claims = {
            "sub": session.user,
            "name": p.name,
            "role": p.role,
            "uid": p.user_id,
            "kv": p.key_version,
            # The owner key's sessions carry a mark of that key: a new ACCESS_KEY ends them.
            "okm": self.owner_mark if p.user_id is None else None,
            "iat": round(session.created, 3),
            "seen": round(session.seen, 3),
            "exp": int(session.created + self.lifetime) + 1,
            "jti": session.token,
        }
        return encode(self.secret, claims)

    def get(self, cookie: str) -> Session | None:
        """The live session a cookie holds, or None (forged, expired, idle, signed out)."""
        claims = decode(self.secret, cookie)
        if claims is None:
            return None
        now = time.time()
        try:
            created, seen = float(claims["iat"]), float(claims["seen"])  # type: ignore[arg-type]
            principal = Principal(
                name=str(claims["name"]),
                role="admin" if claims["role"] == "admin" else "user",
                user_id=claims.get("uid"),  # type: ignore[arg-type]
                key_version=claims.get("kv"),  # type: ignore[arg-type]
            )
            user, jti = str(claims["sub"]), str(claims["jti"])
        except (KeyError, TypeError, ValueError):
            return None
        if now - created > self.lifetime or now - seen > self.idle:
            return None
        if principal.user_id is None and claims.get("okm") != self.owner_mark:
            return None  # made with an owner key that is no longer the one
        if self.ended is not None and jti in self.ended:
            return None
        return Session(jti, user, principal, created=created, seen=seen, cookie=cookie)

    def touch(self, session: Session) -> str | None:
        """A fresh cookie (its last-use mark now) when the one in use is over a minute old."""
        now = time.time()
        if now - session.seen < self.refresh_every:
            return None
        session.seen = now
        session.cookie = self._sign(session)
        self.know(session)
        return session.cookie

    def know(self, session: Session) -> None:
        """Enter the session's cookie in Gradio's table (it checks only its own)."""
        tokens = self.gradio_tokens()
        tokens[session.cookie] = session.user
        self._known[session.cookie] = session.token
        self._known.move_to_end(session.cookie)
        while len(self._known) > self.max_known:
            cookie, _ = self._known.popitem(last=False)
            tokens.pop(cookie, None)

    def end(self, session: Session, reason: str, *, record: bool = True) -> None:
        """End a session: on every replica when `record` (sign-out, a new sign-in; this
        writes to the database, so call it off the event loop), else here only (a revoked key,
        which every replica sees for itself)."""
        if record and self.ended is not None:
            self.ended.add(session.token, session.created + self.lifetime)
        tokens = self.gradio_tokens()
        for cookie in [c for c, jti in self._known.items() if jti == session.token]:
            del self._known[cookie]
            tokens.pop(cookie, None)
        tokens.pop(session.cookie, None)
        log.info("session of %r ended: %s", session.user, reason)
        for callback in self.on_end:
            callback(session)


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
        try:
            session, why = await self._session(scope)
        except sa.exc.OperationalError:  # a key version could not be read: refuse, say why
            if path == "/logout":  # but signing out needs no database: it always works
                mine = [s for t in session_tokens(scope) if (s := self.sessions.get(t))]
                await self._logout(scope, send, mine[0] if mine else None)
                return
            await refuse(scope, send, 503, DATABASE_DOWN)
            return
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
        if session is not None and scope["type"] == "http":
            fresh = self.sessions.touch(session)
            if fresh is not None:  # its last-use mark, renewed in the cookie it came in
                cookie = self._cookie(session.cookie_name, fresh, session)
                send = _setting_cookie(send, cookie)
        if path.startswith(SESSION_STREAMS):
            await quietly(self.app, scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _cookie(self, name: str, token: str, session: Session) -> bytes:
        left = max(1, int(session.created + self.sessions.lifetime - time.time()))
        return f"{name}={token}; Max-Age={left}; Path=/; HttpOnly; SameSite=Lax".encode()

    async def _session(self, scope: Scope) -> tuple[Session | None, str]:
        """The request's live session (or why there is none), with its caller. Every token
        it carries is checked, so a decoy cookie in front cannot hide a revoked one. The
        database is read off the event loop, and at most every few seconds (signed-out
        sessions, key versions): what was read recently enough is checked inline."""
        cookies = session_cookies(scope)
        if not cookies:
            return None, NOT_SIGNED_IN
        ended = self.sessions.ended
        if ended is not None and ended.stale():
            await asyncio.to_thread(ended.refresh)
        # Events (the handlers that need the caller) are started by POSTs only; other
        # requests of an owner's session need no database at all.
        events = scope.get("method") == "POST"
        live, why = None, NOT_SIGNED_IN
        for name, token in cookies:
            session = self.sessions.get(token)
            if session is not None:
                session.cookie_name = name
            if session is None:
                self.gradio_tokens().pop(token, None)  # not ours: Gradio must not honour it
                why = SESSION_ENDED
                continue
            try:
                if session.principal.user_id is not None:  # its key checked, its caller found
                    session.caller = await self.auth.session_caller(session.user, session.principal)
                elif events and live is None:
                    session.caller = await self._owner_caller(session)
            except Revoked:
                # Written down: enabling the user again must not bring this session back.
                await asyncio.to_thread(
                    self.sessions.end, session, "its key was disabled or rotated"
                )
                live, why = None, Revoked.default_message
                break
            self.sessions.know(session)  # this replica's Gradio accepts it too
            live = live or session
        return live, why

    async def _owner_caller(self, session: Session) -> Principal:
        """The caller of a session the owner key signed in (resolve(): the user of that name,
        if there is one now). While the database does not answer, the owner its token names:
        the owner needs no database."""
        try:
            return await self.auth.resolve_async(session.user)
        except sa.exc.SQLAlchemyError:
            log.warning("could not look up %r (database down): the owner it is", session.user)
            return session.principal

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
        # Gradio calls the auth hook on the event loop: what it needs from the database is
        # read here, in a thread, and handed to it (the lockout is still decided in the hook).
        try:
            found = await asyncio.to_thread(self.auth.look_up, name)
        except sa.exc.SQLAlchemyError:
            log.warning("a sign-in could not be checked: the database is not answering")
            await refuse(scope, send, 503, SIGN_IN_DOWN)
            return
        tidy = urlencode({"username": name, "password": key}).encode()
        headers = [
            (k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")
        ]
        headers += [
            (b"content-type", b"application/x-www-form-urlencoded"),
            (b"content-length", str(len(tidy)).encode()),
        ]
        await self._login({**scope, "headers": headers}, replay(tidy, receive), send, found)

    async def _login(
        self, scope: Scope, receive: Receive, send: Send, found: SignIn | None = None
    ) -> None:
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
        previous = [s for t in session_tokens(scope) if (s := self.sessions.get(t))]
        holder: dict = {"client": client, "found": found}
        replaced = False
        signed_in = False

        async def watch(message: Message) -> None:
            nonlocal replaced, signed_in
            if replaced:
                return  # the app's own answer was swapped for the lockout's
            if message["type"] == "http.response.start":
                if locked := holder.get("locked"):
                    replaced = True
                    await _locked(scope, send, locked)
                    return
                principal = holder.get("principal")
                if message["status"] == 200 and principal is not None:
                    # Gradio's random token becomes a signed one (the same user name).
                    message = {**message, "headers": self._signed(message, principal)}
                    signed_in = True
            await send(message)

        reset = LOGIN_CAPTURE.set(holder)
        try:
            await self.app(scope, receive, watch)
        finally:
            LOGIN_CAPTURE.reset(reset)
        if signed_in:
            for old in previous:
                await asyncio.to_thread(self.sessions.end, old, "replaced by a new sign-in")

    def _signed(self, message: Message, principal: Principal) -> list[tuple[bytes, bytes]]:
        """The login answer's headers, each session cookie Gradio set swapped for a signed
        token of a new session (Gradio's own token is forgotten: nobody holds it)."""
        headers, session = [], None
        for name, value in message.get("headers", []):
            if name.lower() == b"set-cookie" and value.startswith(SESSION_COOKIE.encode()):
                cookie_name, _, token = value.decode("latin-1").split(";", 1)[0].partition("=")
                user = self.gradio_tokens().pop(token, principal.name)
                if session is None:
                    session = self.sessions.issue(user, principal)
                value = self._cookie(cookie_name, session.cookie, session)
            headers.append((name, value))
        return headers

    async def _logout(self, scope: Scope, send: Send, session: Session | None) -> None:
        """GET shows a confirmation (so a link on another site cannot sign anyone out);
        POST ends this browser's session only, not the user's others."""
        if scope["method"] != "POST":
            headers = [(b"content-type", b"text/html; charset=utf-8")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": LOGOUT_PAGE})
            return
        if session is not None:
            await asyncio.to_thread(self.sessions.end, session, "signed out")
        headers = [(b"location", b"./")]
        for name, _ in session_cookies(scope):
            headers.append((b"set-cookie", f"{name}=; Max-Age=0; Path=/".encode()))
        await send({"type": "http.response.start", "status": 303, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def _setting_cookie(send: Send, cookie: bytes) -> Send:
    """`send`, with a Set-Cookie added to the answer's headers."""

    async def with_cookie(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", []), (b"set-cookie", cookie)]
            message = {**message, "headers": headers}
        await send(message)

    return with_cookie


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
