"""The adapters' HTTP/1.1 transport: framing, keep-alive, the pool, timeouts, cancellation, and the
httpx errors the adapters map (ConnectError/PoolTimeout: nothing sent; the rest: maybe sent)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from podsettle.adapters.http_transport import Http11Transport, transport_for
from podsettle.sandbox.http_server import BackgroundServer

# ---------------------------------------------------------------------------------------- a real server


async def echo(request: Request) -> Response:
    body = await request.body()
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "body": body.decode(),
            "auth": request.headers.get("authorization"),
        }
    )


async def slow(request: Request) -> Response:
    await asyncio.sleep(float(request.query_params.get("s", "0.2")))
    return JSONResponse({"slow": True})


async def big(request: Request) -> Response:
    return Response(b"x" * 3_000_000, media_type="application/octet-stream")


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    app = Starlette(
        routes=[
            Route("/echo", echo, methods=["GET", "POST", "HEAD"]),
            Route("/slow", slow),
            Route("/big", big),
        ]
    )
    with BackgroundServer(app) as running:
        yield running


async def test_requests_and_responses_round_trip_over_kept_alive_connections(
    server: BackgroundServer,
) -> None:
    transport = Http11Transport(max_connections=4)
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        for n in range(5):
            response = await client.post(
                "/echo?n=1&x=%20y", content=json.dumps({"n": n}), headers={"Authorization": "Bearer k"}
            )
            assert response.status_code == 200
            assert response.json() == {
                "method": "POST",
                "path": "/echo",
                "query": "n=1&x=%20y",
                "body": json.dumps({"n": n}),
                "auth": "Bearer k",
            }
        assert (await client.get("/echo")).json()["method"] == "GET"
        head = await client.head("/echo")
        assert head.status_code == 200 and head.content == b""
        assert (await client.get("/echo")).status_code == 200  # the HEAD left the connection in step
        assert len((await client.get("/big")).content) == 3_000_000
    assert transport.connections_opened == 1


async def test_concurrent_requests_share_at_most_max_connections(server: BackgroundServer) -> None:
    transport = Http11Transport(max_connections=3)
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        responses = await asyncio.gather(*(client.get("/slow", params={"s": "0.02"}) for _ in range(12)))
    assert all(r.json() == {"slow": True} for r in responses)
    assert transport.connections_opened == 3


async def test_a_full_pool_times_out_with_nothing_sent(server: BackgroundServer) -> None:
    transport = Http11Transport(max_connections=1)
    timeout = httpx.Timeout(5.0, pool=0.05)
    async with httpx.AsyncClient(transport=transport, base_url=server.url, timeout=timeout) as client:
        first = asyncio.ensure_future(client.get("/slow", params={"s": "0.5"}))
        await asyncio.sleep(0.1)
        with pytest.raises(httpx.PoolTimeout, match="nothing was sent"):
            await client.get("/echo")
        assert (await first).status_code == 200
        assert (await client.get("/echo")).status_code == 200  # the slot came back


async def test_a_cancelled_request_never_leaves_its_connection_in_the_pool(server: BackgroundServer) -> None:
    transport = Http11Transport(max_connections=1)
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        task = asyncio.ensure_future(client.get("/slow", params={"s": "0.3"}))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        response = await client.get("/echo")  # its late answer must not be read as this one's
        assert response.json()["path"] == "/echo"
    assert transport.connections_opened == 2


async def test_an_idle_connection_past_its_expiry_is_replaced(server: BackgroundServer) -> None:
    transport = Http11Transport(keepalive_expiry=0.05)
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        await client.get("/echo")
        await asyncio.sleep(0.15)
        await client.get("/echo")
    assert transport.connections_opened == 2


async def test_read_timeout_when_the_answer_is_late(server: BackgroundServer) -> None:
    async with httpx.AsyncClient(
        transport=Http11Transport(), base_url=server.url, timeout=httpx.Timeout(5.0, read=0.1)
    ) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/slow", params={"s": "1"})
        assert (await client.get("/echo")).status_code == 200


async def test_connection_refused_is_a_connect_error() -> None:
    with BackgroundServer(Starlette()) as stopped:
        url = stopped.url
    async with httpx.AsyncClient(transport=Http11Transport(), base_url=url) as client:
        with pytest.raises(httpx.ConnectError, match="nothing was sent"):
            await client.get("/")


async def test_a_header_with_a_line_break_is_refused_before_sending(server: BackgroundServer) -> None:
    transport = Http11Transport()
    async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
        with pytest.raises(httpx.LocalProtocolError):
            await client.get("/echo", headers={"X-Bad": "a\r\nInjected: yes"})
    assert transport.connections_opened == 0


# ---------------------------------------------------------------------------------------- scripted servers

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


@asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[tuple[httpx.AsyncClient, Http11Transport, list[int]]]:
    """A raw TCP server running `script` per connection; yields a client, its transport and the
    number of connections the server saw."""
    seen = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen[0] += 1
        try:
            await script(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    tcp = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    transport = Http11Transport()
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url=f"http://127.0.0.1:{port}", timeout=2.0
        ) as client:
            yield client, transport, seen
    finally:
        tcp.close()


def answers(*responses: bytes, then_close: bool = False) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for response in responses:
            await read_request(reader)
            writer.write(response)
            await writer.drain()
        if then_close:
            return
        await reader.read()  # keep the connection until the client goes

    return script


async def test_chunked_bodies_with_extensions_and_trailers() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
        b'4;ext=1\r\n{"a"\r\n6\r\n: 1, "\r\n7\r\nb": 2}\n\r\n0\r\nX-Trailer: t\r\n\r\n'
    )
    async with scripted(answers(chunked, chunked)) as (client, transport, seen):
        assert (await client.get("/")).json() == {"a": 1, "b": 2}
        assert (await client.get("/")).json() == {"a": 1, "b": 2}
    assert seen[0] == 1 and transport.connections_opened == 1


async def test_interim_100_continue_is_skipped() -> None:
    response = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    async with scripted(answers(response)) as (client, _, _):
        created = await client.post("/", content=b"{}")
    assert created.status_code == 201 and created.content == b"ok"


async def test_a_body_that_ends_with_the_connection() -> None:
    async with scripted(answers(b'HTTP/1.1 200 OK\r\n\r\n{"whole": true}', then_close=True)) as (
        client,
        transport,
        seen,
    ):
        assert (await client.get("/")).json() == {"whole": True}
        assert (await client.get("/")).json() == {"whole": True}  # that connection was not reused
    assert seen[0] == 2 and transport.connections_opened == 2


async def test_connection_close_and_http_1_0_answers_are_not_reused() -> None:
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    old = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with scripted(answers(close, old, close)) as (client, transport, _):
        for _ in range(2):
            assert (await client.get("/")).content == b"ok"
    assert transport.connections_opened == 2


async def test_an_answer_with_both_framings_is_read_chunked_and_its_connection_not_reused() -> None:
    both = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    async with scripted(answers(both, both)) as (client, transport, _):
        for _ in range(2):
            assert (await client.get("/")).content == b"ok"
    assert transport.connections_opened == 2


async def test_closing_the_client_fails_requests_in_flight_with_an_httpx_error(
    server: BackgroundServer,
) -> None:
    transport = Http11Transport()
    client = httpx.AsyncClient(transport=transport, base_url=server.url)
    in_flight = asyncio.ensure_future(client.get("/slow", params={"s": "1"}))
    await asyncio.sleep(0.2)
    await transport.aclose()
    with pytest.raises(httpx.ReadError, match="in flight"):  # it may have reached the server
        await in_flight
    with pytest.raises(httpx.ConnectError, match="nothing was sent"):
        await client.get("/echo")


async def test_no_body_for_204_and_304() -> None:
    async with scripted(
        answers(b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n")
    ) as (client, transport, _):
        assert (await client.get("/")).status_code == 204
        assert (await client.get("/")).status_code == 304
    assert transport.connections_opened == 1


@pytest.mark.parametrize(
    ("reply", "says"),
    [
        (b"", "without sending a response"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{"id":', "in the middle of the response"),
        (b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"id"', "in the middle"),
        (b"<html>hello</html>\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "conflicting"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nok\r\n0\r\n\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\nok\r\n0\r\n\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
    ],
)
async def test_broken_or_dropped_responses_are_remote_protocol_errors(reply: bytes, says: str) -> None:
    async with scripted(answers(reply, then_close=True)) as (client, _, _):
        with pytest.raises(httpx.RemoteProtocolError, match=says):
            await client.post("/", content=b"{}")


async def test_a_connection_the_server_closed_while_idle_is_not_used_again() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def close_after_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok)
        await writer.drain()  # then closes, as a server's keep-alive timeout does

    async with scripted(close_after_one) as (client, transport, seen):
        assert (await client.get("/")).content == b"ok"
        await asyncio.sleep(0.05)  # the close arrives while the connection is idle
        assert (await client.get("/")).content == b"ok"
    assert seen[0] == 2 and transport.connections_opened == 2


async def test_bytes_arriving_on_an_idle_connection_retire_it() -> None:
    async def unsolicited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with scripted(unsolicited) as (client, transport, _):
        assert (await client.get("/")).content == b"ok"
        await asyncio.sleep(0.08)
        assert (await client.get("/")).content == b"ok"  # a fresh connection, not the 408
    assert transport.connections_opened == 2


async def test_a_response_over_the_size_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from podsettle.adapters import http_transport

    monkeypatch.setattr(http_transport, "MAX_BODY_BYTES", 10)
    async with scripted(answers(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n", then_close=True)) as (
        client,
        _,
        _,
    ):
        with pytest.raises(httpx.RemoteProtocolError, match="larger than"):
            await client.get("/")


# ---------------------------------------------------------------------------------------- choosing it


@pytest.mark.parametrize(
    ("env", "url", "ours"),
    [
        ({}, "https://api.runpod.ai/v2", True),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https://api.runpod.ai/v2", False),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "http://127.0.0.1:8787", True),
        ({"ALL_PROXY": "http://proxy:3128"}, "http://127.0.0.1:8787", False),
        ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "runpod.ai"}, "https://api.runpod.ai/v2", True),
    ],
)
def test_the_environment_s_proxies_keep_httpx_s_own_transport(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], url: str, ours: bool
) -> None:
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    chosen = transport_for(url)
    assert isinstance(chosen, Http11Transport) is ours
    assert (chosen is None) is not ours


def test_adapters_use_it_unless_given_a_transport() -> None:
    from podsettle.adapters.purpleflea import PurpleFleaEscrow
    from podsettle.adapters.runpod import RunPodCompute

    def transport_of(client: Any) -> Any:
        return client._client.transport

    assert isinstance(transport_of(RunPodCompute("k", base_url="http://127.0.0.1:1/v2")), Http11Transport)
    assert isinstance(transport_of(PurpleFleaEscrow("http://127.0.0.1:1", payer_key="k")), Http11Transport)
    mock = httpx.MockTransport(lambda request: httpx.Response(200))
    assert transport_of(RunPodCompute("k", transport=mock)) is mock


def test_a_transport_used_from_a_second_event_loop_opens_new_connections(server: BackgroundServer) -> None:
    transport = Http11Transport()
    client = httpx.AsyncClient(transport=transport, base_url=server.url)

    async def get() -> int:
        return (await client.get("/echo")).status_code

    assert asyncio.run(get()) == 200
    assert asyncio.run(get()) == 200  # the first loop's idle connection is gone with its loop
    assert transport.connections_opened == 2
