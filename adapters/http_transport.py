"""`Http11Transport`: a lean HTTP/1.1 transport for `httpx.AsyncClient`, on asyncio's own protocols.

Why: httpx's default transport (httpcore over anyio) costs about 2 ms of CPU per request with 32
requests in flight (its pool scans every connection per request, asking each socket for all its
attributes), which made the HTTP client most of the engine's CPU (bench/peer_bench.py). This
transport keeps httpx's client (requests, responses, decoding, the exception types the adapters map)
and replaces only the connection layer: keep-alive connections per origin, a connection learns at
once that the server closed it (`connection_lost`), and a response is parsed as it arrives.

What it speaks: HTTP/1.1 over TCP or TLS (certifi's roots, or `SSL_CERT_FILE`/`SSL_CERT_DIR`, as
httpx); bodies framed by Content-Length, chunked transfer coding, or the end of the connection;
interim 1xx responses skipped; no body for HEAD, 204 and 304. No proxies: `transport_for()` gives
httpx's own transport when the environment names a proxy for the URL.

Errors are httpx's, with the meaning the adapters rely on: `ConnectError`/`ConnectTimeout`/
`PoolTimeout` only when nothing was sent; once a request may have reached the server, a failure is
`ReadTimeout`, `WriteTimeout`, `ReadError` or `RemoteProtocolError` (the call may have taken effect).
A request whose caller is cancelled closes its connection (a half-read response is never reused).
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import urllib.request
from collections import deque
from collections.abc import Callable
from typing import Literal

import httpx

__all__ = ["DirectClient", "Http11Transport", "http_client", "transport_for"]

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}
URLS_KEPT = 256
_FORBIDDEN_IN_HEADERS = (b"\r", b"\n", b"\0")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")

Origin = tuple[str, str, int]


def transport_for(
    url: str | httpx.URL,
    *,
    max_connections: int = 100,
    keepalive_expiry: float = 4.0,
) -> httpx.AsyncBaseTransport | None:
    """The transport for a client of `url`: this module's, or None (httpx's own, which honours the
    environment's proxies) when `HTTP(S)_PROXY`/`ALL_PROXY` apply to the URL."""
    parsed = httpx.URL(str(url))
    proxies = urllib.request.getproxies_environment()
    if (proxies.get(parsed.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(parsed.host):
        return None
    return Http11Transport(max_connections=max_connections, keepalive_expiry=keepalive_expiry)


def http_client(
    base_url: str,
    *,
    headers: dict[str, str],
    timeout: httpx.Timeout,
    max_connections: int,
    transport: httpx.AsyncBaseTransport | Literal["httpx"] | None = None,
) -> DirectClient | httpx.AsyncClient:
    """The adapters' client: requests go straight to `transport` (given, or this module's); when the
    environment names a proxy for `base_url`, or `transport` is "httpx" (the operator's choice,
    `PODSETTLE_HTTP_TRANSPORT=httpx`), an `httpx.AsyncClient` with httpx's own transport."""
    chosen = (
        None
        if transport == "httpx"
        else transport or transport_for(base_url, max_connections=max_connections)
    )
    if chosen is None:
        return httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
    return DirectClient(base_url, chosen, headers=headers, timeout=timeout)


class DirectClient:
    """The part of `httpx.AsyncClient` the adapters use, without its per-request machinery (cookie
    jar, redirects, auth flows, event hooks): about half the client's CPU per request. JSON APIs
    with bearer keys need none of it; responses are read whole, and errors are the transport's
    httpx exceptions, unchanged."""

    DEFAULT_HEADERS = {
        "Accept": "*/*",
        "Accept-Encoding": "gzip, deflate",
        "Connection": "keep-alive",
        "User-Agent": f"python-httpx/{httpx.__version__}",
    }

    def __init__(
        self,
        base_url: str,
        transport: httpx.AsyncBaseTransport,
        *,
        headers: dict[str, str] | None = None,
        timeout: httpx.Timeout,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.transport = transport
        self._headers = {**self.DEFAULT_HEADERS, **(headers or {})}
        self._timeouts = timeout.as_dict()
        # Parsed URLs by path: parsing is a good part of a request's cost, and most paths repeat
        # (create, release, runsync); a URL is immutable, so sharing one is safe.
        self._urls: dict[str, httpx.URL] = {}

    async def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,  # noqa: ASYNC109 (httpx.AsyncClient.request's name)
    ) -> httpx.Response:
        """`path` is relative to the base URL (it starts with '/', it may carry a query)."""
        url = self._urls.get(path)
        if url is None:
            url = httpx.URL(self.base_url + path)
            if len(self._urls) >= URLS_KEPT:
                self._urls.clear()
            self._urls[path] = url
        request = httpx.Request(
            method,
            url,
            headers={**self._headers, **headers} if headers else self._headers,
            content=content,
            extensions={"timeout": self._timeouts if timeout is None else timeout.as_dict()},
        )
        response = await self.transport.handle_async_request(request)
        response.request = request
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()


def _ssl_context() -> ssl.SSLContext:
    """The same trust as httpx's default: `SSL_CERT_FILE`, `SSL_CERT_DIR`, else certifi's roots."""
    if os.environ.get("SSL_CERT_FILE"):
        context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    elif os.environ.get("SSL_CERT_DIR"):
        context = ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    else:
        import certifi

        context = ssl.create_default_context(cafile=certifi.where())
    context.set_alpn_protocols(["http/1.1"])
    return context


# ---------------------------------------------------------------------------------------- parsing


class _ResponseParser:
    """Parses one response (after any interim 1xx ones) from bytes fed as they arrive."""

    __slots__ = (
        "body",
        "chunk_left",
        "close_delimited",
        "done",
        "headers",
        "keep_alive",
        "length",
        "mode",
        "no_body",
        "reason",
        "status",
        "version",
    )

    def __init__(self, method: bytes) -> None:
        self.no_body = method == b"HEAD"
        self.status = 0
        self.reason = b""
        self.version = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.mode = "head"  # head, length, chunk-size, chunk-data, chunk-end, trailers, until-close, done
        self.length = 0
        self.chunk_left = 0
        self.close_delimited = False
        self.keep_alive = False
        self.done = False

    def feed(self, buffer: bytearray) -> None:
        """Consume what it can from `buffer` (in place); sets `done` when the response is complete."""
        while not self.done:
            mode = self.mode
            if mode == "head":
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise httpx.RemoteProtocolError("the response's head is larger than 64 KiB")
                    return
                head = bytes(buffer[:end])
                del buffer[: end + 4]
                self._head(head)
            elif mode == "length":
                take = min(self.length, len(buffer))
                self.body += buffer[:take]
                del buffer[:take]
                self.length -= take
                if self.length:
                    return
                self.done = True
            elif mode == "chunk-size":
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > 4096:
                        raise httpx.RemoteProtocolError("a chunk-size line is too long")
                    return
                line = bytes(buffer[:end]).split(b";", 1)[0].strip()
                del buffer[: end + 2]
                if _HEX.fullmatch(line) is None:  # int() would also take "0x1f", "1_0" and "+5"
                    raise httpx.RemoteProtocolError(f"invalid chunk size {line[:20]!r}")
                size = int(line, 16)
                self._check_size(len(self.body) + size)
                self.chunk_left = size
                self.mode = "chunk-data" if size else "trailers"
            elif mode == "chunk-data":
                take = min(self.chunk_left, len(buffer))
                self.body += buffer[:take]
                del buffer[:take]
                self.chunk_left -= take
                if self.chunk_left:
                    return
                self.mode = "chunk-end"
            elif mode == "chunk-end":
                if len(buffer) < 2:
                    return
                if buffer[:2] != b"\r\n":
                    raise httpx.RemoteProtocolError("a chunk is not followed by CRLF")
                del buffer[:2]
                self.mode = "chunk-size"
            elif mode == "trailers":
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise httpx.RemoteProtocolError("the response's trailers are too large")
                    return
                del buffer[: end + 2]
                if end == 0:
                    self.done = True
            else:  # until-close
                self.body += buffer
                buffer.clear()
                self._check_size(len(self.body))
                return

    def feed_eof(self) -> None:
        """The server closed the connection: that ends a close-delimited body, else it is an error."""
        if self.mode == "until-close":
            self.done = True
            return
        if self.mode == "head" and self.status == 0:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        raise httpx.RemoteProtocolError("Server disconnected in the middle of the response.")

    def _check_size(self, size: int) -> None:
        if size > MAX_BODY_BYTES:
            raise httpx.RemoteProtocolError(f"the response body is larger than {MAX_BODY_BYTES} bytes")

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if (
            len(parts) < 2
            or not parts[0].startswith(b"HTTP/1.")
            or len(parts[1]) != 3
            or not parts[1].isdigit()
        ):
            raise httpx.RemoteProtocolError(f"not an HTTP/1.x status line: {lines[0][:40]!r}")
        status = int(parts[1])
        if 100 <= status < 200 and status != 101:
            return  # an interim response (100 Continue, 103 Early Hints): the real one follows
        self.version = parts[0]
        self.status = status
        self.reason = parts[2] if len(parts) > 2 else b""
        headers: list[tuple[bytes, bytes]] = []
        length: bytes | None = None
        transfer: bytes | None = None
        connection = b""
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            name = name.strip()
            if not colon or not name or b" " in name or b"\t" in name:
                raise httpx.RemoteProtocolError("a malformed header line in the response")
            value = value.strip()
            headers.append((name, value))
            lower = name.lower()
            if lower == b"content-length":
                if length is not None and length != value:
                    raise httpx.RemoteProtocolError("conflicting Content-Length headers")
                length = value
            elif lower == b"transfer-encoding":
                transfer = value.lower() if transfer is None else transfer + b"," + value.lower()
            elif lower == b"connection":
                connection += b"," + value.lower()
        self.headers = headers
        self.keep_alive = self.version == b"HTTP/1.1" and b"close" not in [
            token.strip() for token in connection.split(b",")
        ]
        if self.no_body or status in (204, 304) or status == 101:
            self.done = True
            self.keep_alive = self.keep_alive and status != 101
        elif transfer is not None:
            if length is not None:
                self.keep_alive = False  # both framings: Transfer-Encoding wins, and the connection ends
            if transfer.split(b",")[-1].strip() == b"chunked":
                self.mode = "chunk-size"
            else:
                self.mode, self.close_delimited, self.keep_alive = "until-close", True, False
        elif length is not None:
            if not length.isdigit():
                raise httpx.RemoteProtocolError(f"invalid Content-Length {length[:20]!r}")
            self.length = int(length)
            self._check_size(self.length)
            self.mode = "length"
            if self.length == 0:
                self.done = True
        else:
            self.mode, self.close_delimited, self.keep_alive = "until-close", True, False


# ---------------------------------------------------------------------------------------- connection


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: Origin) -> None:
        self.loop = loop
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = loop.time()
        self._buffer = bytearray()
        self._parser: _ResponseParser | None = None
        self._future: asyncio.Future[_ResponseParser] | None = None
        self._can_write: asyncio.Future[None] | None = None
        self._last_data = 0.0
        self._read_timeout: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._parser is None:
            self.close()  # bytes nobody asked for (e.g. a 408 on an idle connection): never reuse it
            return
        self._last_data = self.loop.time()
        self._buffer += data
        try:
            self._parser.feed(self._buffer)
        except httpx.HTTPError as error:
            self._fail(error)
            return
        if self._parser.done:
            self._finish()

    def eof_received(self) -> bool | None:
        self.closed = True
        if self._parser is not None:
            try:
                self._parser.feed_eof()
            except httpx.HTTPError as error:
                self._fail(error)
            else:
                self._finish()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._parser is not None:
            if self._parser.mode == "until-close" and exc is None:
                self._parser.done = True
                self._finish()
            elif exc is None:
                try:
                    self._parser.feed_eof()
                except httpx.HTTPError as error:
                    self._fail(error)
            else:
                self._fail(httpx.ReadError(f"the connection was lost: {type(exc).__name__}: {exc}"))
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)  # the writer goes on to read the failure

    def pause_writing(self) -> None:
        if self._can_write is None or self._can_write.done():
            self._can_write = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    # ------------------------------------------------------------------ one exchange

    async def exchange(
        self, data: bytes, method: bytes, read_timeout: float | None, write_timeout: float | None
    ) -> _ResponseParser:
        """Send one request and return its parsed response."""
        assert self.transport is not None
        if self.closed:  # the server closed it before anything was written
            raise httpx.ConnectError("the connection closed before the request was sent; nothing was sent")
        parser = self._parser = _ResponseParser(method)
        future = self._future = self.loop.create_future()
        self._last_data = self.loop.time()
        self._read_timeout = read_timeout
        self.transport.write(data)
        if self._can_write is not None and not self._can_write.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._can_write), write_timeout)
            except TimeoutError:
                raise httpx.WriteTimeout("the request could not be written in time") from None
        if read_timeout is not None and not future.done():
            self._timer = self.loop.call_later(read_timeout, self._check_timeout)
        try:
            await future
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if self._buffer:  # bytes after the response's end: the connection is out of step
            parser.keep_alive = False
        return parser

    def _check_timeout(self) -> None:
        self._timer = None
        if self._future is None or self._future.done() or self._read_timeout is None:
            return
        quiet = self.loop.time() - self._last_data
        if quiet >= self._read_timeout:
            self._fail(httpx.ReadTimeout(f"no response data for {self._read_timeout:g} s"))
        else:
            self._timer = self.loop.call_later(self._read_timeout - quiet, self._check_timeout)

    def _finish(self) -> None:
        future, parser = self._future, self._parser
        self._parser = None
        if future is not None and parser is not None and not future.done():
            future.set_result(parser)

    def _fail(self, error: Exception) -> None:
        future = self._future
        self._parser = None
        if future is not None and not future.done():
            future.set_exception(error)
        self.close()

    def reset(self) -> None:
        """After a complete exchange, before the connection goes back to the pool."""
        self._future = None
        self.idle_since = self.loop.time()

    def close(self) -> None:
        """Abort the connection; an exchange still waiting (its caller was cancelled) is dropped."""
        self.closed = True
        self._parser = None
        if self._future is not None and not self._future.done():
            self._future.cancel()
        if self.transport is not None:
            self.transport.abort()


# ---------------------------------------------------------------------------------------- transport


class Http11Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 with keep-alive: at most `max_connections` open connections over all origins; an idle
    connection is closed after `keepalive_expiry` seconds (below the common 5 s server timeouts)."""

    def __init__(
        self,
        *,
        max_connections: int = 100,
        keepalive_expiry: float = 4.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.connections_opened = 0  # for tests and figures: keep-alive means few
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("the client is closed; nothing was sent")
        url = request.url
        scheme = url.scheme
        if scheme not in DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        origin: Origin = (scheme, url.host, url.port or DEFAULT_PORTS[scheme])
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        data = await self._encode(request)
        method = request.method.encode("ascii")
        connection = await self._acquire(origin, timeouts.get("pool"), timeouts.get("connect"))
        reusable = False
        try:
            parser = await connection.exchange(data, method, timeouts.get("read"), timeouts.get("write"))
            reusable = parser.keep_alive and not connection.closed
        finally:
            self._release(connection, reusable)
        return httpx.Response(
            parser.status,
            headers=parser.headers,
            stream=httpx.ByteStream(bytes(parser.body)),
            extensions={"http_version": parser.version, "reason_phrase": parser.reason},
        )

    async def aclose(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        for connection in list(self._busy):
            # The request may have reached the server: an error that says so (ReadError), as for a
            # lost connection, not a cancellation the adapters would not map.
            connection._fail(httpx.ReadError("the client was closed while the request was in flight"))
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ internals

    @staticmethod
    async def _encode(request: httpx.Request) -> bytes:
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        raw = request.headers.raw
        # One look at all names and values together (a line break in any would inject headers).
        names = b"\t".join(name for name, _ in raw)
        values = b"\t".join(value for _, value in raw)
        if any(bad in names or bad in values for bad in _FORBIDDEN_IN_HEADERS) or b":" in names:
            bad_name = next(
                name
                for name, value in raw
                if b":" in name or any(bad in name or bad in value for bad in _FORBIDDEN_IN_HEADERS)
            )
            raise httpx.LocalProtocolError(f"header {bad_name[:40]!r} has a forbidden character")
        chunked = b"transfer-encoding" in names.lower() and any(
            name.lower() == b"transfer-encoding" and b"chunked" in value.lower() for name, value in raw
        )
        lines = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
        for name, value in raw:
            lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        if chunked:
            if body:
                lines += (f"{len(body):x}\r\n".encode(), body, b"\r\n")
            lines.append(b"0\r\n\r\n")
        elif body:
            lines.append(body)
        return b"".join(lines)

    async def _acquire(
        self, origin: Origin, pool_timeout: float | None, connect_timeout: float | None
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        deadline = None if pool_timeout is None else loop.time() + pool_timeout
        while True:
            connection = self._idle_connection(origin, loop.time())
            if connection is not None:
                self._busy.add(connection)
                return connection
            if self._open >= self.max_connections:
                self._evict_idle()
            if self._open < self.max_connections:
                self._open += 1
                try:
                    connection = await self._connect(loop, origin, connect_timeout)
                except BaseException:
                    self._open -= 1
                    self._wake()
                    raise
                self._busy.add(connection)
                return connection
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            woken = False
            try:
                remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
                await asyncio.wait_for(waiter, remaining)
                woken = True
            except TimeoutError:
                raise httpx.PoolTimeout("no connection became free in time; nothing was sent") from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif not woken and waiter.done() and not waiter.cancelled():
                    self._wake()  # woken but leaving (cancelled): pass the free slot on
            if self._closed:
                raise httpx.ConnectError("the client is closed; nothing was sent")

    def _idle_connection(self, origin: Origin, now: float) -> _Connection | None:
        idle = self._idle.get(origin)
        loop = asyncio.get_running_loop()
        while idle:
            connection = idle.pop()
            if connection.loop is not loop:  # made on an event loop that is gone: drop it
                self._open -= 1
                if not connection.loop.is_closed():
                    connection.close()
                continue
            if connection.closed or now - connection.idle_since > self.keepalive_expiry:
                connection.close()
                self._open -= 1
                continue
            return connection
        return None

    def _evict_idle(self) -> None:
        """At the limit: close the longest-idle connection of any origin to make room."""
        oldest: _Connection | None = None
        for connections in self._idle.values():
            if connections and (oldest is None or connections[0].idle_since < oldest.idle_since):
                oldest = connections[0]
        if oldest is not None:
            self._idle[oldest.origin].remove(oldest)
            oldest.close()
            self._open -= 1

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, origin: Origin, limit_s: float | None
    ) -> _Connection:
        scheme, host, port = origin
        context: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = _ssl_context()
            context = self._ssl_context
        factory: Callable[[], _Connection] = lambda: _Connection(loop, origin)  # noqa: E731
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    factory, host, port, ssl=context, server_hostname=host if context else None
                ),
                limit_s,
            )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out; nothing was sent") from None
        except OSError as error:
            raise httpx.ConnectError(
                f"could not connect to {host}:{port} ({type(error).__name__}: {error}); nothing was sent"
            ) from None
        self.connections_opened += 1
        return connection

    def _release(self, connection: _Connection, reusable: bool) -> None:
        self._busy.discard(connection)
        if reusable and not self._closed:
            connection.reset()
            idle = self._idle.setdefault(connection.origin, [])
            idle.append(connection)
            while idle[0].closed or connection.idle_since - idle[0].idle_since > self.keepalive_expiry:
                idle.pop(0).close()  # the oldest first: expired, or closed by the server
                self._open -= 1
        else:
            connection.close()
            self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def __repr__(self) -> str:
        return f"Http11Transport(max_connections={self.max_connections}, open={self._open})"
