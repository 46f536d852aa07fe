"""The adapters' HTTP client against real loopback servers: keep-alive, the pool, timeouts, cancellation,
proxies, and above all what a failure says about the request (nothing sent, or it may have arrived),
which decides `Unavailable` against `OutcomeUnknown` on a money call."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response
from starlette.routing import Route

from podsettle.adapters.http import (
    Answer,
    HttpClient,
    Sent,
    Timeouts,
    TransportFailure,
    classify,
    status_error,
    transport_error,
)
from podsettle.adapters.ports import (
    BadResponse,
    Conflict,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    Rejected,
    Unavailable,
)
from podsettle.adapters.purpleflea import purple_flea
from podsettle.domain.money import to_money
from podsettle.sandbox.http_server import BackgroundServer

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
JSON_OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{"n":1}'
FAST = Timeouts(connect=1.0, read=2.0, pool=2.0)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


class Server:
    """A raw TCP server running `script` per connection; counts connections and requests."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.url = ""
        self._tcp: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.script(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self._tcp = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._tcp.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._tcp is not None
        self._tcp.close()


def answers(*responses: bytes, delay_s: float = 0.0) -> Script:
    """Answers each request on a connection in turn, then keeps the connection open."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for response in responses:
            await read_request(reader)
            if delay_s:
                await asyncio.sleep(delay_s)
            writer.write(response)
            await writer.drain()
        await reader.read()

    return script


def keep_answering(response: bytes = OK, delay_s: float = 0.0) -> Script:
    return answers(*([response] * 1000), delay_s=delay_s)


@asynccontextmanager
async def client_of(server: Server, **options: Any) -> AsyncIterator[HttpClient]:
    options.setdefault("timeouts", FAST)
    options.setdefault("max_connections", 8)
    client = HttpClient(server.url, headers={"Accept": "application/json"}, **options)
    try:
        yield client
    finally:
        await client.aclose()


async def failure_of(request: Awaitable[Answer]) -> TransportFailure:
    with pytest.raises(TransportFailure) as caught:
        await request
    return caught.value


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------------------------------- exchanges


async def test_requests_share_one_kept_alive_connection() -> None:
    seen: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(
                b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{"n":1}'
            )
            await writer.drain()

    async with Server(echo) as server, client_of(server) as client:
        for _ in range(5):
            answer = await client.request(
                "POST", "/echo?x=%20y", content=b"{}", headers={"Authorization": "Bearer k"}
            )
            assert answer.status == 200 and answer.json() == {"n": 1}
            assert answer.headers["content-type"] == "application/json"
    assert server.connections == 1
    assert seen[0].startswith(b"POST /echo?x=%20y HTTP/1.1\r\n")
    assert b"Authorization: Bearer k" in seen[0] and b"Accept: application/json" in seen[0]


async def test_concurrent_requests_use_at_most_max_connections() -> None:
    async with Server(keep_answering(delay_s=0.02)) as server, client_of(server, max_connections=3) as client:
        answers_ = await asyncio.gather(*(client.request("GET", "/") for _ in range(12)))
    assert all(answer.content == b"ok" for answer in answers_)
    assert server.connections == 3


async def test_a_redirect_is_an_answer_not_followed() -> None:
    moved = b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n"
    async with Server(answers(moved)) as server, client_of(server) as client:
        answer = await client.request("POST", "/", content=b"{}")
    assert answer.status == 307 and answer.headers["location"] == "/elsewhere"


async def test_a_cancelled_request_never_leaves_its_connection_in_the_pool() -> None:
    async def late_then_prompt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(0.3)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
        await writer.drain()
        await answers(OK)(reader, writer)

    async with Server(late_then_prompt) as server, client_of(server, max_connections=1) as client:
        task = asyncio.ensure_future(client.request("GET", "/slow"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        answer = await client.request("GET", "/")  # the late answer must not be read as this one's
        assert answer.content in (b"late", b"ok")
        assert answer.content == b"late"  # a fresh connection: the server's script starts again
    assert server.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_not_used_for_a_post() -> None:
    async def close_after_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()  # then closes, as a server's keep-alive timeout does

    async with Server(close_after_one) as server, client_of(server) as client:
        assert (await client.request("POST", "/", content=b"{}")).content == b"ok"
        await asyncio.sleep(0.05)  # the close arrives while the connection is idle
        assert (await client.request("POST", "/", content=b"{}")).content == b"ok"
    assert server.connections == 2


def test_a_client_used_from_a_second_event_loop_opens_a_new_session() -> None:
    async def ok(request: StarletteRequest) -> Response:
        return Response(b"ok")

    with BackgroundServer(Starlette(routes=[Route("/", ok)])) as server:
        client = HttpClient(server.url, headers={}, timeouts=FAST, max_connections=2)

        async def get() -> bytes:
            return (await client.request("GET", "/")).content

        assert asyncio.run(get()) == b"ok"
        assert asyncio.run(get()) == b"ok"  # the first loop's session went with its loop

        async def close() -> None:
            await client.aclose()

        asyncio.run(close())


# ---------------------------------------------------------------------------------------- nothing sent


async def test_connection_refused_sent_nothing() -> None:
    client = HttpClient(f"http://127.0.0.1:{closed_port()}", headers={}, timeouts=FAST, max_connections=1)
    failure = await failure_of(client.request("POST", "/escrow/create", content=b"{}"))
    await client.aclose()
    assert failure.sent is Sent.NOTHING and failure.kind == "ClientConnectorError"


async def test_an_unknown_host_sent_nothing() -> None:
    client = HttpClient("http://podsettle-test.invalid", headers={}, timeouts=FAST, max_connections=1)
    failure = await failure_of(client.request("GET", "/"))
    await client.aclose()
    assert failure.sent is Sent.NOTHING and failure.kind == "ClientConnectorDNSError"


async def test_a_tls_handshake_that_never_ends_is_a_connect_timeout_with_nothing_sent() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts TCP, never answers the TLS hello

    async with Server(silent) as server:
        https = server.url.replace("http://", "https://")
        client = HttpClient(
            https, headers={}, timeouts=Timeouts(connect=0.2, read=5, pool=5), max_connections=1
        )
        failure = await failure_of(client.request("POST", "/", content=b"{}"))
        await client.aclose()
    assert failure.sent is Sent.NOTHING and failure.timeout and failure.kind == "ConnectionTimeoutError"


async def test_a_full_pool_times_out_with_nothing_sent() -> None:
    timeouts = Timeouts(connect=1.0, read=5.0, pool=0.05)
    async with (
        Server(keep_answering(delay_s=0.4)) as server,
        client_of(server, max_connections=1, timeouts=timeouts) as client,
    ):
        first = asyncio.ensure_future(client.request("GET", "/"))
        await asyncio.sleep(0.1)
        failure = await failure_of(client.request("POST", "/", content=b"{}"))
        assert failure.sent is Sent.NOTHING and failure.timeout
        assert (await first).status == 200
        assert (await client.request("GET", "/")).status == 200  # the slot came back
    assert server.connections == 1


# ---------------------------------------------------------------------------------------- maybe sent


async def test_no_answer_within_the_read_timeout_may_have_arrived() -> None:
    async with (
        Server(keep_answering(delay_s=0.5)) as server,
        client_of(server, timeouts=Timeouts(connect=1, read=0.1, pool=1)) as client,
    ):
        failure = await failure_of(client.request("POST", "/", content=b"{}"))
        assert failure.sent is Sent.MAYBE and failure.timeout and failure.kind == "SocketTimeoutError"
        # A longer read timeout for one request (runsync's wait) outlasts the delay.
        assert (await client.request("GET", "/", read_timeout=2.0)).status == 200


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        (b"", "ServerDisconnectedError"),  # read the request, closed without a word
        (b'HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{"id":', "ClientPayloadError"),
        (b"<html>hello</html>\r\n\r\n", "ClientResponseError"),
    ],
)
async def test_a_connection_lost_after_the_request_may_have_arrived(reply: bytes, kind: str) -> None:
    async def then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()

    async with Server(then_close) as server, client_of(server) as client:
        failure = await failure_of(client.request("POST", "/", content=b"{}"))
    assert failure.sent is Sent.MAYBE and not failure.timeout
    assert failure.kind == kind


def chunked(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


async def test_an_answer_past_the_size_cap_is_refused_as_possibly_taken_effect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server (or a proxy) gone wrong must not fill the engine's memory: an answer larger than the
    cap is not read, whether its length is announced or not; one within it is read whole."""
    monkeypatch.setattr("podsettle.adapters.http.MAX_ANSWER_BYTES", 1000)
    announced = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
    for reply in (announced, chunked(b"y" * 5000)):
        async with Server(answers(reply)) as server, client_of(server) as client:
            failure = await failure_of(client.request("POST", "/", content=b"{}"))
        assert failure.sent is Sent.MAYBE and failure.kind.startswith("AnswerTooLarge")
        error = transport_error(failure, "escrow create", money=True)
        assert isinstance(error, OutcomeUnknown) and "AnswerTooLarge" in str(error)
    async with Server(answers(chunked(b"z" * 900))) as server, client_of(server) as client:
        answer = await client.request("GET", "/")
    assert answer.status == 200 and answer.content == b"z" * 900


async def test_a_reset_after_the_request_may_have_arrived() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # RST, not FIN

    async with Server(reset) as server, client_of(server) as client:
        failure = await failure_of(client.request("POST", "/", content=b"{}"))
    assert failure.sent is Sent.MAYBE


async def test_closing_the_client_fails_requests_in_flight_as_maybe_and_later_ones_as_nothing() -> None:
    async with Server(keep_answering(delay_s=1.0)) as server:
        client = HttpClient(server.url, headers={}, timeouts=FAST, max_connections=2)
        in_flight = asyncio.ensure_future(client.request("POST", "/", content=b"{}"))
        await asyncio.sleep(0.2)
        await client.aclose()
        assert (await failure_of(in_flight)).sent is Sent.MAYBE
        assert (await failure_of(client.request("GET", "/"))).sent is Sent.NOTHING


# ---------------------------------------------------------------------------------------- proxies


def clear_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


async def test_the_environment_s_proxy_carries_the_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            lines.append((await read_request(reader)).split(b"\r\n", 1)[0])
            writer.write(OK)
            await writer.drain()

    clear_proxies(monkeypatch)
    async with Server(proxy) as server:
        monkeypatch.setenv("HTTP_PROXY", server.url)
        client = HttpClient("http://escrow.example", headers={}, timeouts=FAST, max_connections=1)
        assert (await client.request("GET", "/health")).content == b"ok"
        await client.aclose()
    assert lines == [b"GET http://escrow.example/health HTTP/1.1"]


async def test_no_proxy_bypasses_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_proxies(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")  # would refuse
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with Server(keep_answering()) as server, client_of(server) as client:
        assert (await client.request("GET", "/")).content == b"ok"
    assert server.connections == 1


async def test_an_unreachable_proxy_sent_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_proxies(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    client = HttpClient("http://escrow.example", headers={}, timeouts=FAST, max_connections=1)
    failure = await failure_of(client.request("POST", "/", content=b"{}"))
    await client.aclose()
    assert failure.sent is Sent.NOTHING


# ---------------------------------------------------------------------------------------- the table


def test_a_connect_timeout_is_nothing_sent_though_aiohttp_files_it_under_server_timeouts() -> None:
    connect = classify(aiohttp.ConnectionTimeoutError("Connection timeout to host"))
    read = classify(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))
    assert connect is not None and connect.sent is Sent.NOTHING
    assert read is not None and read.sent is Sent.MAYBE
    assert classify(ValueError("not ours")) is None


@pytest.mark.parametrize(
    ("sent", "money", "error"),
    [
        (Sent.NOTHING, True, Unavailable),
        (Sent.NOTHING, False, Unavailable),
        (Sent.MAYBE, True, OutcomeUnknown),
        (Sent.MAYBE, False, Unavailable),
    ],
)
def test_transport_failures_map_by_what_may_have_arrived(sent: Sent, money: bool, error: type) -> None:
    mapped = transport_error(
        TransportFailure(sent, "X", timeout=False), "create", money=money, maybe="queued?"
    )
    assert type(mapped) is error
    assert ("nothing was sent" in str(mapped)) is (sent is Sent.NOTHING)
    assert ("queued?" in str(mapped)) is (sent is Sent.MAYBE and not money)


@pytest.mark.parametrize(
    ("status", "money", "error"),
    [
        (400, True, Rejected),
        (404, False, NotFound),
        (409, True, Conflict),
        (429, True, RateLimited),
        (408, True, OutcomeUnknown),
        (503, True, OutcomeUnknown),
        (503, False, Unavailable),
        (418, True, OutcomeUnknown),  # outside the contract: the answer cannot be trusted
        (418, False, BadResponse),
        (413, True, OutcomeUnknown),  # a status the table knows but this contract does not have
    ],
)
def test_statuses_map_through_one_table(status: int, money: bool, error: type) -> None:
    contract = {400, 404, 409, 429}
    assert type(status_error(status, "x", money=money, contract=contract)) is error


def test_a_route_may_override_a_status_s_meaning() -> None:
    mapped = status_error(404, "create", money=True, contract={404}, overrides={404: Rejected})
    assert isinstance(mapped, Rejected) and mapped.status_code == 404


# ---------------------------------------------------------------------------------------- end to end


async def test_the_escrow_adapter_maps_real_failures_by_what_was_sent() -> None:
    def create(pf: Any) -> Awaitable[Any]:
        return pf.create(key="k", payee="ag_w", amount=to_money("0.5"), description="a job", timeout_hours=1)

    async with purple_flea(f"http://127.0.0.1:{closed_port()}", payer_key="k") as refused:
        with pytest.raises(Unavailable, match="nothing was sent"):
            await create(refused)

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # the request arrived; the answer never comes

    async with Server(swallow) as server, purple_flea(server.url, payer_key="k") as dropped:
        with pytest.raises(OutcomeUnknown, match="may or may not have taken effect"):
            await create(dropped)
