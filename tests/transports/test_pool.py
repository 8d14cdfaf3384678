"""Which connection serves a request: `PoolTransport` and its per-host pools, against real servers.

Reuse, the stale keep-alive resend, the per-host limits, cancellation's accounting and the
transport's lifecycle. The exchange on one connection is in `test_http11.py`.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
from pathlib import Path

import anyio
import pytest
from transports.transport_tools import (
    BLOCK,
    HOST,
    OK,
    Handler,
    RawServer,
    body_on_release,
    fetch,
    keep_alive_handler,
    make_request,
    make_server,
    raw_server,
    read_body,
    read_request,
    streamed,
    wait_for,
)

from asgi_gateway._exceptions import (
    ConnectError,
    ConnectionReset,
    PoolTimeout,
)
from asgi_gateway._transports.pool import PoolTransport
from asgi_gateway._types import Headers, RequestBody, Response, Server

# -- connection reuse ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_keep_alive_reuses_one_connection(transport: PoolTransport, uvicorn_server: Server) -> None:
    ports = set()
    for _ in range(5):
        _, body = await fetch(transport, make_request(uvicorn_server, target=b"/echo"))
        ports.add(json.loads(body)["client_port"])
    assert len(ports) == 1
    assert transport.connection_count(uvicorn_server) == 1
    assert transport.idle_count(uvicorn_server) == 1


@pytest.mark.anyio
async def test_idle_connection_closed_by_server_is_dropped(transport: PoolTransport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        writer.close()  # keep-alive promised, then closed while idle

    async with RawServer(handler) as server:
        await fetch(transport, make_request(server.url_server))
        await wait_for(lambda: transport.connection_count(server.url_server) == 0)
        _, body = await fetch(transport, make_request(server.url_server))
        assert body == b"ok"
        assert server.accepted == 2


def stale_on_second_request() -> Handler:
    """Answer the first request of connection 1, then close it when the second arrives."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        if n == 1:
            await reader.readuntil(b"\r\n\r\n")
            writer.transport.abort()
            return
        while True:
            await read_request(reader)
            writer.write(OK)

    return handler


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "headers"),
    [("GET", []), ("PUT", []), ("POST", [(b"idempotency-key", b"k1")])],
    ids=["get", "put", "post-with-idempotency-key"],
)
async def test_stale_keep_alive_is_retried_on_a_new_connection(
    transport: PoolTransport, method: str, headers: Headers
) -> None:
    async with RawServer(stale_on_second_request()) as server:
        await fetch(transport, make_request(server.url_server))
        body = RequestBody([b"replay", b"able"], 10)
        request = make_request(server.url_server, method, headers=headers, body=body)
        response, data = await fetch(transport, request)
        assert (response.status, data) == (200, b"ok")
        assert server.accepted == 2
        assert transport.connection_count(server.url_server) == 1


@pytest.mark.anyio
async def test_stale_keep_alive_post_is_not_sent_twice(transport: PoolTransport) -> None:
    # Indistinguishable from a server that died handling it: a POST may not be repeated.
    async with RawServer(stale_on_second_request()) as server:
        await fetch(transport, make_request(server.url_server))
        request = make_request(server.url_server, "POST", body=RequestBody([b"once"], 4))
        with pytest.raises(ConnectionReset):
            await transport.handle_request(request)
        assert server.accepted == 1


@pytest.mark.anyio
async def test_stale_keep_alive_with_streamed_body_is_not_retried(transport: PoolTransport) -> None:
    async with RawServer(stale_on_second_request()) as server:
        await fetch(transport, make_request(server.url_server))
        request = make_request(server.url_server, "PUT", body=streamed([b"once"]))
        with pytest.raises(ConnectionReset):
            await transport.handle_request(request)
        assert server.accepted == 1


@pytest.mark.anyio
async def test_idle_timeout_closes_old_connections() -> None:
    async with raw_server(OK) as server, PoolTransport(idle_timeout=0.05) as transport:
        await fetch(transport, make_request(server.url_server))
        assert transport.idle_count(server.url_server) == 1
        await asyncio.sleep(0.06)
        await fetch(transport, make_request(server.url_server))
        assert server.accepted == 2
        assert transport.connection_count(server.url_server) == 1
        await wait_for(lambda: server.closed_by_client == 1)


@pytest.mark.anyio
async def test_max_idle_per_host() -> None:
    release = asyncio.Event()
    async with RawServer(body_on_release(release)) as server, PoolTransport(max_idle_per_host=1) as t:
        responses = [await t.handle_request(make_request(server.url_server)) for _ in range(3)]
        assert t.connection_count(server.url_server) == 3
        release.set()
        for response in responses:
            assert await read_body(response) == b"half"
        assert t.connection_count(server.url_server) == 1
        assert t.idle_count(server.url_server) == 1


# -- limits ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_max_connections_per_host_waits_then_times_out() -> None:
    release = asyncio.Event()
    async with RawServer(body_on_release(release)) as server, PoolTransport(max_connections_per_host=1) as t:
        first = await t.handle_request(make_request(server.url_server))
        with pytest.raises(PoolTimeout):
            await t.handle_request(make_request(server.url_server, connect_timeout=0.05))

        async def second() -> bytes:
            _, body = await fetch(t, make_request(server.url_server))
            return body

        waiting = asyncio.ensure_future(second())
        await asyncio.sleep(0)
        assert not waiting.done()
        release.set()
        assert await read_body(first) == b"half"
        assert await waiting == b"half"
        assert server.accepted == 1
        assert t.connection_count(server.url_server) == 1


@pytest.mark.anyio
async def test_waiter_gets_the_slot_of_a_closed_connection() -> None:
    release = asyncio.Event()
    async with RawServer(body_on_release(release)) as server, PoolTransport(max_connections_per_host=1) as t:
        first = await t.handle_request(make_request(server.url_server))
        waiting = asyncio.ensure_future(t.handle_request(make_request(server.url_server)))
        await asyncio.sleep(0)
        await first.aclose()  # early close: the connection goes, its slot is handed over
        release.set()
        assert await read_body(await waiting) == b"half"
        assert server.accepted == 2


# -- cancellation ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["head", "body", "pool"])
async def test_cancellation_closes_the_connection(where: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if where != "head":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await server.wait_client_eof(reader)

    async with RawServer(handler) as server, PoolTransport(max_connections_per_host=1) as transport:
        target = server.url_server
        got_first = anyio.Event()
        holder: list[Response] = []

        async def client() -> None:
            response = await transport.handle_request(make_request(target, read_timeout=None))
            holder.append(response)
            try:
                async for _ in response.stream:
                    got_first.set()
            finally:
                await response.aclose()

        async with anyio.create_task_group() as tg:
            tg.start_soon(client)
            if where == "head":
                await wait_for(lambda: server.accepted == 1)
            else:
                await got_first.wait()
            pool = transport._pools[("http", HOST, server.port, None)]
            if where == "pool":
                async with anyio.create_task_group() as waiting:
                    waiting.start_soon(transport.handle_request, make_request(target, connect_timeout=None))
                    await wait_for(lambda: pool.waiters)
                    waiting.cancel_scope.cancel()
                assert pool.count == 1
            tg.cancel_scope.cancel()
        assert transport.connection_count(target) == 0
        await wait_for(lambda: server.closed_by_client == 1)
        if where != "head":
            assert holder and holder[0].status == 200
        # Nothing leaked: no slot is still taken, no waiter left behind.
        pool = transport._pools[("http", HOST, server.port, None)]
        assert pool.count == 0
        assert not [waiter for waiter in pool.waiters if not waiter.done()]


@pytest.mark.anyio
async def test_pool_accounting_survives_concurrency_and_cancellation(uvicorn_server: Server) -> None:
    rng = random.Random(7)
    completed = 0
    async with PoolTransport(max_connections_per_host=4, max_idle_per_host=2) as transport:

        async def one(delay: float) -> None:
            nonlocal completed
            with anyio.move_on_after(delay):
                _, body = await fetch(transport, make_request(uvicorn_server, target=b"/download?4"))
                assert len(body) == 4 * len(BLOCK)
                completed += 1

        delays = [rng.choice([0.0005, 0.002, 0.01, 10.0]) for _ in range(200)]
        async with anyio.create_task_group() as tg:
            for delay in delays:
                tg.start_soon(one, delay)
        pool = transport._pools[("http", HOST, uvicorn_server.port, None)]
        assert completed >= delays.count(10.0)
        assert pool.count == len(pool.connections) <= 4
        assert len(pool.idle) <= 2
        assert not [waiter for waiter in pool.waiters if not waiter.done()]
        for _ in range(3):
            _, body = await fetch(transport, make_request(uvicorn_server, target=b"/echo"))
            assert json.loads(body)["method"] == "GET"


# -- lifecycle and TLS -----------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_refuses_to_run_outside_asyncio() -> None:
    async with PoolTransport() as transport:
        with pytest.raises(RuntimeError, match="asyncio only"):
            await transport.handle_request(make_request(make_server(1)))


@pytest.mark.anyio
async def test_closed_transport_refuses_requests() -> None:
    async with raw_server(OK) as server:
        transport = PoolTransport()
        await fetch(transport, make_request(server.url_server))
        assert transport.idle_count(server.url_server) == 1
        await transport.aclose()
        assert transport.connection_count(server.url_server) == 0
        await wait_for(lambda: server.closed_by_client == 1)
        with pytest.raises(RuntimeError, match="closed"):
            await transport.handle_request(make_request(server.url_server))
        with pytest.raises(RuntimeError):
            async with transport:
                pass


@pytest.mark.anyio
async def test_tls_upstream(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    ref: list[RawServer] = []
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nsecure\r\n0\r\n\r\n"
    server = RawServer(keep_alive_handler(ref, chunked), ssl_context=server_context)
    ref.append(server)
    async with server, PoolTransport(ssl_context=ssl.create_default_context(cafile=str(cert))) as transport:
        for _ in range(2):
            response, body = await fetch(transport, make_request(server.url_server))
            assert body == b"secure"
            assert response.peer_address == HOST
        assert server.accepted == 1
        assert server.requests[0][0].startswith(b"GET / HTTP/1.1\r\nhost: ")
    async with server, PoolTransport() as untrusting:
        with pytest.raises(ConnectError, match="certificate"):
            await untrusting.handle_request(make_request(server.url_server))


# -- retiring servers (discovery, reload) ----------------------------------------------------


def hold_or_answer(release: asyncio.Event, server_ref: list[RawServer]) -> Handler:
    """`/hold` gets its head and half its body, the rest once `release` is set; others `OK`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            head, _ = await read_request(reader)
            server_ref[0].requests.append((head, b""))
            if head.startswith(b"GET /hold "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nha")
                await writer.drain()
                await release.wait()
                writer.write(b"lf")
            else:
                writer.write(OK)
            await writer.drain()

    return handler


@pytest.mark.anyio
async def test_retire_closes_idle_connections_now_and_busy_ones_when_released(
    transport: PoolTransport,
) -> None:
    release = asyncio.Event()
    ref: list[RawServer] = []
    async with RawServer(hold_or_answer(release, ref)) as server:
        ref.append(server)
        target = server.url_server
        held = await transport.handle_request(make_request(target, target=b"/hold"))
        await fetch(transport, make_request(target, target=b"/quick"))
        assert (transport.connection_count(target), transport.idle_count(target)) == (2, 1)

        transport.retire([target])

        # The idle one closes at once; the busy one finishes its exchange, then closes.
        await wait_for(lambda: server.closed_by_client == 1)
        assert transport.connection_count(target) == 1
        release.set()
        assert await read_body(held) == b"half"
        await wait_for(lambda: server.closed_by_client == 2)
        assert transport.connection_count(target) == 0
        assert not transport._draining

        # The same origin under a live server: a fresh pool, which keeps its connection.
        fresh = make_server(server.port)
        _, body = await fetch(transport, make_request(fresh, target=b"/quick"))
        assert body == b"ok" and server.accepted == 3
        assert transport.idle_count(fresh) == 1
        # The retired server itself is still served (a retry under a replaced config), on a
        # connection of its own that is not kept.
        _, body = await fetch(transport, make_request(target, target=b"/quick"))
        assert body == b"ok" and server.accepted == 4
        await wait_for(lambda: server.closed_by_client == 3)
        assert transport.idle_count(fresh) == 1
        assert not transport._draining


@pytest.mark.anyio
async def test_retire_keeps_a_pool_another_live_server_still_uses(transport: PoolTransport) -> None:
    async with raw_server(OK) as server:
        first, second = make_server(server.port), make_server(server.port)
        await fetch(transport, make_request(first))
        await fetch(transport, make_request(second))
        assert server.accepted == 1

        transport.retire([first])

        assert transport.idle_count(second) == 1
        await fetch(transport, make_request(second))
        assert server.accepted == 1
        transport.retire([second])
        await wait_for(lambda: transport.connection_count(second) == 0)
        assert transport.idle_count(second) == 0


@pytest.mark.anyio
async def test_discovered_server_connects_to_its_address_under_its_name(transport: PoolTransport) -> None:
    async with raw_server(OK) as server:
        named = Server(
            url=f"http://users.invalid:{server.port}",
            scheme="http",
            host="users.invalid",
            port=server.port,
            host_header=f"users.invalid:{server.port}".encode(),
            ip=HOST,
        )
        _, body = await fetch(transport, make_request(named))
        assert body == b"ok"
        assert b"\r\nhost: users.invalid:" in server.requests[0][0].lower()
        # Its own pool: not shared with a server that connects to the same address by another name.
        assert transport.idle_count(named) == 1
        assert transport.idle_count(server.url_server) == 0
