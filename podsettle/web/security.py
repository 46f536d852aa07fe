"""Who may talk to `podsettle serve`: one ASGI middleware in front of every route and mount.

- Host and Origin (DNS rebinding, as the MCP transport spec asks): on a loopback address a request
  must name this server as loopback does (`127.0.0.1:PORT`, `localhost:PORT`, `[::1]:PORT`); a page
  of another site that a rebound name points here carries that site's name and is refused (403).
  An `Origin`, when a browser sends one, must be the server's own.
- The token (`PODSETTLE_TOKEN`): when one is configured, every request must carry it, as
  `Authorization: Bearer TOKEN`, as the cookie the browser is given, or once as `?token=TOKEN`
  (a GET is then redirected to the same address without it, setting a cookie derived from the
  token, so that the address bar and history do not keep it); otherwise 401.
  Off loopback a token is required: `serve` refuses to start without one (`require_token_off_loopback`).

The checks run before the wrapped application sees the request, so a mounted application (the MCP
endpoint) is guarded as the dashboard is, whatever it serves.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Iterable
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "podsettle_token"
TOKEN_REQUIRED = "a token is required (Authorization: Bearer TOKEN, or ?token=TOKEN once in a browser)"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
# Sent with every answer: the page loads nothing from elsewhere and is never framed.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)


class InsecureBind(ValueError):
    """A non-loopback address without a token: anyone on the network could read the store."""


def is_loopback(host: str) -> bool:
    """Whether `host` (an address to bind, or `localhost`) only accepts connections from this machine."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # any other name may resolve to an outside address


def require_token_off_loopback(host: str, token: str | None) -> None:
    if token is None and not is_loopback(host):
        raise InsecureBind(
            f"--host {host} is not a loopback address: set PODSETTLE_TOKEN (at least 16 characters) "
            "so that every request must carry it, or serve on 127.0.0.1"
        )


def loopback_hosts(port: int) -> frozenset[str]:
    """The Host header values a browser or client on this machine sends to a loopback server."""
    names = {f"{name}:{port}" for name in LOOPBACK_NAMES}
    if port == 80:
        names.update(LOOPBACK_NAMES)
    return frozenset(names)


class Guard:
    """ASGI middleware: the Host/Origin checks, then the token, then `app`.

    `loopback`: the server listens on a loopback address, so the Host must be a loopback name with
    `port`. Off loopback the server cannot know every name it is reached by; the token (required
    there) is what keeps a rebound name out, and an Origin must still match the Host.
    """

    def __init__(self, app: ASGIApp, *, port: int, loopback: bool, token: str | None) -> None:
        if token is None and not loopback:
            raise InsecureBind("a server off loopback needs a token")
        self.app = app
        self.loopback = loopback
        self.hosts = loopback_hosts(port)
        self._token = token.encode() if token is not None else None
        self._cookie = cookie_value(token).encode() if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await _refuse_other(scope, receive, send)
            return
        headers = _headers(scope)
        host = headers.get("host", "").lower()
        refusal = self._refusal(host, headers.get("origin"))
        if refusal is not None:
            await _answer(send, 403, {"error": refusal})
            return
        if self._token is not None:
            from_query = _query_token(scope)
            if from_query is not None:
                if not self._matches(from_query):
                    await _answer(send, 401, {"error": "wrong token"}, bearer=True)
                    return
                if scope["method"] in ("GET", "HEAD"):
                    await _redirect_setting_cookie(scope, send, cookie_value(from_query))
                    return
            elif not (self._matches(_bearer(headers)) or self._cookie_matches(_cookie(headers))):
                await _answer(
                    send, 401, {"error": "a token is required (Authorization: Bearer)"}, bearer=True
                )
                return
        await self.app(scope, receive, _with_security_headers(send))

    def _refusal(self, host: str, origin: str | None) -> str | None:
        if self.loopback and host not in self.hosts:
            return "this server answers only to its loopback address (Host)"
        if not host:
            return "a Host header is required"
        if origin is not None:
            parts = urlsplit(origin)
            own = self.hosts if self.loopback else {host}
            if parts.scheme not in ("http", "https") or parts.netloc.lower() not in own:
                return "requests from another origin are refused (Origin)"
        return None

    def _matches(self, presented: str | None) -> bool:
        assert self._token is not None
        return presented is not None and hmac.compare_digest(presented.encode(), self._token)

    def _cookie_matches(self, presented: str | None) -> bool:
        assert self._cookie is not None
        return presented is not None and hmac.compare_digest(presented.encode(), self._cookie)


def cookie_value(token: str) -> str:
    """What the browser keeps for the token: derived from it (hex, safe in a cookie), not the token."""
    return hashlib.sha256(b"podsettle dashboard cookie\n" + token.encode()).hexdigest()


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (a repeated header: its last value)."""
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}


def _bearer(headers: dict[str, str]) -> str | None:
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def _cookie(headers: dict[str, str]) -> str | None:
    cookie: SimpleCookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # a malformed Cookie header is no token
        return None
    morsel = cookie.get(COOKIE)
    return morsel.value if morsel is not None else None


def _query(scope: Scope) -> list[tuple[str, str]]:
    query: bytes = scope.get("query_string", b"")
    return parse_qsl(query.decode("latin-1"), keep_blank_values=True)


def _query_token(scope: Scope) -> str | None:
    return next((value for name, value in _query(scope) if name == "token"), None)


async def _redirect_setting_cookie(scope: Scope, send: Send, value: str) -> None:
    """The same address without `token=`, with the cookie that stands for it from now on."""
    query = urlencode([(name, value) for name, value in _query(scope) if name != "token"])
    location = (scope.get("root_path", "") + scope["path"]) + (f"?{query}" if query else "")
    cookie = f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict"
    headers = [(b"location", location.encode("latin-1")), (b"set-cookie", cookie.encode("latin-1"))]
    await _answer(send, 303, {"redirect": location}, extra=headers)


async def _answer(
    send: Send,
    status: int,
    body: dict[str, Any],
    *,
    bearer: bool = False,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"cache-control", b"no-store"),
        *SECURITY_HEADERS,
        *extra,
    ]
    if bearer:
        headers.append((b"www-authenticate", b'Bearer realm="podsettle"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _with_security_headers(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            present = {name.lower() for name, _ in message.get("headers", [])}
            added = [(name, value) for name, value in SECURITY_HEADERS if name not in present]
            message = {**message, "headers": [*message.get("headers", []), *added]}
        await send(message)

    return sending


async def _refuse_other(scope: Scope, receive: Receive, send: Send) -> None:
    """Nothing here speaks WebSocket: close it before it opens."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008})
