"""HTTP for the production adapters (Purple Flea escrow, RunPod serverless), over aiohttp, and the one
table that turns an HTTP answer or a transport failure into the ports' errors.

What a failure means for money is decided here, once, for both clients:

- nothing was sent (`Sent.NOTHING`): no byte of the request left this process. The connection could
  not be opened (refused, DNS, TLS, an unreachable proxy), opening it or waiting for a free one timed
  out, or the client was closed. aiohttp drops a pooled connection the server closed while it was
  idle before writing to it, and retries an idempotent request (GET) once when such a connection
  fails under it. Always `Unavailable`: safe to try again.
- the request may have reached the server (`Sent.MAYBE`): everything else (no answer within the read
  timeout, the connection reset or closed after the request was written, a truncated or malformed
  answer). On a call that moves money that is `OutcomeUnknown`, never retried blindly; otherwise
  `Unavailable`.

Answers are mapped by `status_error` through `STATUS_ERRORS`; a status outside the caller's contract
is an answer that cannot be trusted (`OutcomeUnknown` on a money call, else `BadResponse`).

The environment's proxy settings (HTTP_PROXY, HTTPS_PROXY, NO_PROXY, as aiohttp's `trust_env` reads
them) are resolved once per session for the client's one origin rather than on every request; TLS
trusts the system's roots (OpenSSL also honours SSL_CERT_FILE and SSL_CERT_DIR).
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import inspect
import json as jsonlib
import math
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

if TYPE_CHECKING:  # aiohttp is imported on first use: the in-process compute imports this module too
    import aiohttp

from podsettle.adapters.ports import (
    BadResponse,
    Conflict,
    Forbidden,
    GatewayError,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    Rejected,
    Unauthorized,
    Unavailable,
)

__all__ = [
    "STATUS_ERRORS",
    "TRANSPORT_FAILURES",
    "Answer",
    "HttpClient",
    "Replier",
    "Request",
    "Sent",
    "Timeouts",
    "TransportFailure",
    "classify",
    "status_error",
    "transport_error",
]

# The largest answer read (RunPod's results are at most ~20 MB; escrow answers are small).
MAX_ANSWER_BYTES = 64 * 1024 * 1024
KEEPALIVE_S = 4.0  # below the common 5 s server keep-alive timeouts
URLS_KEPT = 256
MAY_HAVE_TAKEN_EFFECT = "the call may or may not have taken effect"

# ---------------------------------------------------------------------------------------- the table


class Sent(Enum):
    NOTHING = "nothing was sent"
    MAYBE = "the request may have reached the server"


# aiohttp's exceptions (builtins last), checked in order: the first match decides (several are
# subclasses of later ones: a connect timeout is a ServerTimeoutError, a connector error a
# ClientOSError). Whatever is not listed is not a transport failure and propagates unchanged.
TRANSPORT_FAILURES: tuple[tuple[str, Sent], ...] = (
    ("ConnectionTimeoutError", Sent.NOTHING),  # waiting for a pooled slot, TCP or TLS connect
    ("ClientConnectorError", Sent.NOTHING),  # refused, DNS, TLS handshake or certificate, proxy
    ("ClientHttpProxyError", Sent.NOTHING),  # the proxy refused the tunnel: the server saw nothing
    ("InvalidURL", Sent.NOTHING),
    ("ServerTimeoutError", Sent.MAYBE),  # no answer within the read timeout
    ("ServerDisconnectedError", Sent.MAYBE),  # closed after the request was written
    ("ClientPayloadError", Sent.MAYBE),  # the body was cut short
    ("ClientResponseError", Sent.MAYBE),  # an answer that is not HTTP
    ("ClientError", Sent.MAYBE),  # ClientOSError: reset mid-exchange, and the rest
    ("TimeoutError", Sent.MAYBE),
    ("OSError", Sent.MAYBE),
)


@functools.cache
def _failure_types() -> tuple[tuple[type[BaseException], Sent], ...]:
    import aiohttp

    return tuple(
        (getattr(aiohttp, name, None) or getattr(builtins, name), sent) for name, sent in TRANSPORT_FAILURES
    )


# The meaning of an error status; 408 and 5xx: the request may have taken effect.
STATUS_ERRORS: Mapping[int, type[GatewayError]] = {
    400: Rejected,
    401: Unauthorized,
    402: Rejected,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: Rejected,
    422: Rejected,
    429: RateLimited,
}


class TransportFailure(Exception):
    """The exchange failed below HTTP; `sent` says whether the server may have seen the request."""

    def __init__(self, sent: Sent, kind: str, *, timeout: bool) -> None:
        self.sent = sent
        self.kind = kind  # the library's exception class name: what the logs and messages show
        self.timeout = timeout
        super().__init__(f"{kind}: {sent.value}")


def classify(error: BaseException) -> TransportFailure | None:
    """The failure `error` is by `TRANSPORT_FAILURES`, or None when it is no transport failure."""
    if isinstance(error, TransportFailure):
        return error
    for kind, sent in _failure_types():
        if isinstance(error, kind):
            return TransportFailure(sent, type(error).__name__, timeout=isinstance(error, TimeoutError))
    return None


async def _body(response: aiohttp.ClientResponse) -> bytes:
    """The answer's body, refused past MAX_ANSWER_BYTES (a server or a proxy gone wrong must not
    fill the engine's memory): the request was answered, so it may have taken effect."""
    length = response.content_length
    if length is not None and length <= MAX_ANSWER_BYTES:
        return await response.read()
    if length is not None:
        raise TransportFailure(Sent.MAYBE, f"AnswerTooLarge ({length} bytes announced)", timeout=False)
    body = bytearray()
    async for chunk in response.content.iter_chunked(1 << 16):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise TransportFailure(
                Sent.MAYBE, f"AnswerTooLarge (over {MAX_ANSWER_BYTES} bytes)", timeout=False
            )
    return bytes(body)


def transport_error(failure: TransportFailure, what: str, *, money: bool, maybe: str = "") -> GatewayError:
    """The port error for a failed exchange. `maybe` is said when the request may have arrived on a
    call that moves no money (e.g. "the job may have been queued")."""
    if failure.sent is Sent.NOTHING:
        return Unavailable(f"{what}: could not reach the service ({failure.kind}); nothing was sent")
    happened = (
        "timed out waiting for the answer" if failure.timeout else "connection failed or response dropped"
    )
    detail = f"{what}: {happened} ({failure.kind}) after the request was sent"
    if money:
        return OutcomeUnknown(f"{detail}; {MAY_HAVE_TAKEN_EFFECT}")
    return Unavailable(f"{detail}; {maybe}" if maybe else detail)


def status_error(
    status: int,
    detail: str,
    *,
    money: bool,
    contract: Collection[int],
    overrides: Mapping[int, type[GatewayError]] | None = None,
    code: str | None = None,
    retry_after: float = 1.0,
) -> GatewayError:
    """The port error for an error answer (`status` not a success). `contract` holds the 4xx statuses
    the service documents; any other is an answer that cannot be trusted. `overrides` changes the
    meaning of a status for one route (e.g. 404 on create: the payee does not exist, `Rejected`)."""
    if status >= 500 or status == 408:
        return OutcomeUnknown(f"{detail}; {MAY_HAVE_TAKEN_EFFECT}") if money else Unavailable(detail)
    meaning = (overrides or {}).get(status) or STATUS_ERRORS.get(status)
    if meaning is None or status not in contract:
        if money:
            return OutcomeUnknown(f"{detail} (not in the contract); {MAY_HAVE_TAKEN_EFFECT}")
        return BadResponse(f"{detail} (not in the contract)")
    if meaning is Rejected:
        return Rejected(detail, status_code=status, code=code)
    if meaning is RateLimited:
        return RateLimited(detail, retry_after=retry_after)
    return meaning(detail)


def reason(status: int) -> str:
    """`404 Not Found`: the status and its phrase, for messages."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


# ---------------------------------------------------------------------------------------- exchanges


@dataclass(frozen=True)
class Timeouts:
    """Seconds per phase; None waits for ever. Both connect phases end before any byte is sent."""

    connect: float | None = 5.0  # opening a connection (TCP, TLS, a proxy's tunnel)
    read: float | None = 20.0  # silence while waiting for (the rest of) the answer
    pool: float | None = 10.0  # waiting for a free connection, opening included

    def longest_s(self, read: float | None = None) -> float:
        """The longest one exchange can last while the server keeps it waiting (a free connection,
        connecting, then the silence before the answer): infinite when a phase has no bound."""
        phases = (self.pool, self.connect, self.read if read is None else read)
        return math.inf if any(p is None for p in phases) else sum(p or 0.0 for p in phases)

    def aiohttp(self, read: float | None = None) -> aiohttp.ClientTimeout:
        import aiohttp

        return aiohttp.ClientTimeout(
            total=None,
            connect=self.pool,
            sock_connect=self.connect,
            sock_read=self.read if read is None else read,
        )


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole HTTP answer: status, headers (case-insensitive), body."""

    status: int
    content: bytes = b""
    headers: Mapping[str, str] = field(default_factory=CIMultiDict)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body as JSON (UTF-8/16/32 by its first bytes); raises ValueError when it is not."""
        return jsonlib.loads(self.content)

    @classmethod
    def of(
        cls,
        status: int,
        *,
        json: Any = None,
        text: str | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """An answer built by hand (a test's replier): `json`, `text` or raw `content`."""
        merged: CIMultiDict[str] = CIMultiDict()
        body = b""
        if content is not None:
            body = content
        elif text is not None:
            body = text.encode()
            merged["Content-Type"] = "text/plain; charset=utf-8"
        elif json is not None:
            body = jsonlib.dumps(json).encode()
            merged["Content-Type"] = "application/json"
        merged.update(headers or {})
        return cls(status, body, CIMultiDictProxy(merged))


@dataclass(frozen=True, slots=True)
class Request:
    """A request as a `Replier` sees it."""

    method: str
    url: URL
    headers: Mapping[str, str]
    content: bytes | None
    read_timeout: float | None


# Answers requests instead of the network (tests); what it raises is classified as the network's.
Replier = Callable[[Request], "Answer | Awaitable[Answer]"]


class HttpClient:
    """Requests to one service: keep-alive connections (at most `max_connections`), default
    `headers`, `timeouts`, whole answers. Failures below HTTP raise `TransportFailure`.

    The aiohttp session is made on first use in the running event loop (the adapters are built
    before one runs), and again when used from another loop."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        timeouts: Timeouts,
        max_connections: int,
        replier: Replier | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts
        self.max_connections = max_connections
        self._headers = dict(headers)
        self._timeout: aiohttp.ClientTimeout | None = None
        self._replier = replier
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Parsed URLs by path: most paths repeat (create, release, runsync), and a URL is immutable.
        self._urls: dict[str, URL] = {}
        if replier is None:
            # aiohttp is imported when a client is built (importing this module stays light), not on
            # the first request: that import would stall the running event loop for ~0.1 s mid-batch.
            _failure_types()

    async def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        read_timeout: float | None = None,
    ) -> Answer:
        """`path` is relative to the base URL (it starts with '/', it may carry a query)."""
        if self._closed:
            raise TransportFailure(Sent.NOTHING, "ClientClosed", timeout=False)
        url = self._urls.get(path)
        if url is None:
            url = URL(self.base_url + path)
            if len(self._urls) >= URLS_KEPT:
                self._urls.clear()
            self._urls[path] = url
        try:
            if self._replier is not None:
                merged: CIMultiDict[str] = CIMultiDict(self._headers)
                merged.update(headers or {})
                request = Request(method, url, CIMultiDictProxy(merged), content, read_timeout)
                reply = self._replier(request)
                return await reply if inspect.isawaitable(reply) else reply
            session = self._session_here()
            timeout = self._timeout if read_timeout is None else self.timeouts.aiohttp(read_timeout)
            assert timeout is not None  # made with the session
            async with session.request(
                method, url, data=content, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                return Answer(response.status, await _body(response), response.headers)
        except Exception as error:
            failure = classify(error)
            if failure is None:
                raise
            raise failure from error

    async def aclose(self) -> None:
        """Close every connection; requests in flight fail as `Sent.MAYBE`, later ones `Sent.NOTHING`."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._loop is asyncio.get_running_loop():
            await session.close()
        elif session is not None:
            self._abandon(session)

    def _session_here(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._session
        if session is not None and self._loop is loop:
            return session
        if session is not None:
            self._abandon(session)
        import aiohttp
        from aiohttp.helpers import get_env_proxy_for_url

        self._timeout = self.timeouts.aiohttp()
        url = URL(self.base_url)
        try:
            proxy, proxy_auth = get_env_proxy_for_url(url)
        except LookupError:
            proxy, proxy_auth = None, None
        session = self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self.max_connections, limit_per_host=0, keepalive_timeout=KEEPALIVE_S
            ),
            headers=self._headers,
            timeout=self._timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            proxy=proxy,
            proxy_auth=proxy_auth,
        )
        self._loop = loop
        return session

    def _abandon(self, session: aiohttp.ClientSession) -> None:
        """A session of an event loop that is no longer running: its connections died with their loop
        (or are closed by it); mark it closed without touching them from this loop."""
        session.detach()

    def __repr__(self) -> str:
        return f"HttpClient(base_url={self.base_url!r}, max_connections={self.max_connections})"
