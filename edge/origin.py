"""Cross-origin policy: who may read answers and send requests from another site.

- The dashboard (every path but the bearer APIs) is same-origin only: CORS answers carry
  credentials only for origins the operator lists in ALLOWED_ORIGINS, and a state-changing
  request (or a websocket) from any other Origin is refused before it reaches the app.
  Gradio's own CORS layer echoes any Origin with credentials; its headers are replaced here.
- The bearer APIs (/v1, /metrics) take keys in a header, never cookies, so browsers may call
  them from the sites in V1_CORS_ORIGINS (default: any), without credentials.
- Session cookies are rewritten to SameSite=Lax and HttpOnly, Secure over HTTPS, and Gradio's
  cookie twin for plain HTTP is dropped: one cookie, never sent by another site's requests.
- Every answer carries a Content-Security-Policy that keeps pages from loading images or
  posting forms anywhere else, whatever a model's reply contains.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from edge.http import ASGIApp, Message, Receive, Scope, Send, header, is_bearer_api, refuse

SESSION_COOKIE = b"access-token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
ALLOWED_METHODS = b"GET, POST, OPTIONS"
DEFAULT_PORTS = {"http": "80", "https": "443"}


def origin_netloc(origin: str) -> str | None:
    """host[:port] of an Origin header, lower case, without the scheme's default port."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    host = parts.netloc.lower().rsplit("@", 1)[-1]
    default = f":{DEFAULT_PORTS[parts.scheme]}"
    return host[: -len(default)] if host.endswith(default) else host


def content_security_policy(*, remote_images: bool) -> bytes:
    """Images, media and form posts stay on this site; only these frames may embed it."""
    images = "'self' data: blob:" + (" https:" if remote_images else "")
    ancestors = "'self'"
    if os.environ.get("SPACE_ID"):  # Hugging Face shows a Space inside its own page
        ancestors += " https://huggingface.co"
    return (
        f"img-src {images}; media-src 'self' data: blob:; form-action 'self'; "
        f"frame-ancestors {ancestors}; base-uri 'self'; object-src 'none'"
    ).encode()


class OriginPolicy:
    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_origins: tuple[str, ...] = (),
        v1_origins: tuple[str, ...] = ("*",),
        remote_images: bool = False,
    ) -> None:
        self.app = app
        self.allowed = {o.lower() for o in allowed_origins}
        self.v1_any = "*" in v1_origins
        self.v1_allowed = {o.lower() for o in v1_origins}
        self.security_headers = [
            (b"content-security-policy", content_security_policy(remote_images=remote_images)),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"same-origin"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        origin = header(scope, b"origin")
        if is_bearer_api(scope["path"]) and scope["type"] == "http":
            await self._bearer_api(scope, receive, send, origin)
            return
        same = origin is None or self._same_origin(origin, scope)
        trusted = same or (origin or "").lower() in self.allowed
        if scope["type"] == "websocket":
            if not trusted:
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        preflight = scope["method"] == "OPTIONS" and header(scope, b"access-control-request-method")
        if preflight:
            if same or not trusted:
                await refuse(scope, send, 403, "Cross-origin requests are not allowed here.")
            else:
                await self._preflight(scope, send, origin or "", credentials=True)
            return
        if not trusted and scope["method"] not in SAFE_METHODS:
            message = (
                f"Cross-site request refused: {origin!r} is not this dashboard's origin. "
                "An operator can allow a site with ALLOWED_ORIGINS (behind a proxy that "
                "rewrites the Host header, list the dashboard's public origin there)."
            )
            await refuse(scope, send, 403, message)
            return
        cors = [] if same or not trusted else self._cors(origin or "", credentials=True)
        https = scope.get("scheme") == "https"
        await self.app(scope, receive, self._wrap(send, cors, https=https))

    async def _bearer_api(self, scope: Scope, receive: Receive, send: Send, origin: str | None):
        """Keys come in a header, so another site gains nothing it lacks: plain CORS."""
        allowed = origin is not None and (self.v1_any or origin.lower() in self.v1_allowed)
        if scope["method"] == "OPTIONS" and header(scope, b"access-control-request-method"):
            if not allowed:
                await refuse(scope, send, 403, "This origin may not call the API from a browser.")
            else:
                await self._preflight(scope, send, origin or "", credentials=False)
            return
        cors = self._cors(origin or "", credentials=False) if allowed else []
        await self.app(scope, receive, self._wrap(send, cors, https=False, cookies=False))

    def _same_origin(self, origin: str, scope: Scope) -> bool:
        host = (header(scope, b"host") or "").lower()
        scheme = scope.get("scheme", "http")
        default = f":{DEFAULT_PORTS.get(scheme, '')}"
        if host.endswith(default):
            host = host[: -len(default)]
        return bool(host) and origin_netloc(origin) == host

    def _cors(self, origin: str, *, credentials: bool) -> list[tuple[bytes, bytes]]:
        if not credentials and self.v1_any:
            return [(b"access-control-allow-origin", b"*")]
        headers = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if credentials:
            headers.append((b"access-control-allow-credentials", b"true"))
        return headers

    async def _preflight(self, scope: Scope, send: Send, origin: str, *, credentials: bool):
        requested = header(scope, b"access-control-request-headers") or ""
        headers = [
            *self._cors(origin, credentials=credentials),
            (b"access-control-allow-methods", ALLOWED_METHODS),
            (b"access-control-allow-headers", requested.encode("latin-1")),
            (b"access-control-max-age", b"600"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    def _wrap(
        self, send: Send, cors: list[tuple[bytes, bytes]], *, https: bool, cookies: bool = True
    ) -> Send:
        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = []
                for name, value in message.get("headers", ()):
                    lower = name.lower()
                    if lower.startswith(b"access-control-"):
                        continue  # Gradio's layer allows any origin: our policy replaces it
                    if lower == b"set-cookie" and cookies:
                        value = session_cookie(value, https=https)
                        if value is None:
                            continue
                    headers.append((name, value))
                message["headers"] = [*headers, *cors, *self.security_headers]
            await send(message)

        return send_with_policy


def session_cookie(value: bytes, *, https: bool) -> bytes | None:
    """A Gradio session cookie made SameSite=Lax, HttpOnly and (over HTTPS) Secure; None for
    the plain-HTTP twin, which is dropped. Other cookies pass unchanged."""
    name, _, rest = value.partition(b"=")
    if not name.strip().startswith(SESSION_COOKIE):
        return value
    if name.strip().startswith(SESSION_COOKIE + b"-unsecure"):
        return None
    token, *attributes = rest.split(b";")
    kept = [
        a.strip()
        for a in attributes
        if a.strip().split(b"=", 1)[0].lower() in (b"max-age", b"expires")
    ]
    parts = [name.strip() + b"=" + token.strip(), *kept, b"Path=/", b"HttpOnly", b"SameSite=Lax"]
    if https:
        parts.append(b"Secure")
    return b"; ".join(parts)
