"""Opening connections (`connect`).

Through PoolTransport, which connects and then adds TLS, and `open_socket` alone, as a caller
that wants a plain connected socket uses it.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from transports.transport_tools import (
    HOST,
    OK,
    fetch,
    make_request,
    make_server,
    raw_server,
)

from asgi_gateway._exceptions import ConnectError, ConnectTimeout
from asgi_gateway._transports.connect import open_socket
from asgi_gateway._transports.pool import PoolTransport

# -- through the pool --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_closed_port_raises_connect_error(transport: PoolTransport) -> None:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    target = make_server(port)
    with pytest.raises(ConnectError):
        await transport.handle_request(make_request(target))
    assert transport.connection_count(target) == 0


@pytest.mark.anyio
async def test_connect_timeout(transport: PoolTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    never = asyncio.Event()

    async def hang(*args: Any, **kwargs: Any) -> Any:
        await never.wait()

    async with raw_server(OK) as server:
        monkeypatch.setattr(loop, "create_connection", hang)
        with pytest.raises(ConnectTimeout):
            await transport.handle_request(make_request(server.url_server, connect_timeout=0.05))
        monkeypatch.undo()
        assert transport.connection_count(server.url_server) == 0
        _, body = await fetch(transport, make_request(server.url_server))
        assert body == b"ok"


@pytest.mark.anyio
async def test_tiny_connect_timeout_on_a_real_connect(transport: PoolTransport) -> None:
    # A listener that never accepts: the handshake may complete in the kernel, nothing answers.
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(8)
        target = make_server(listener.getsockname()[1])
        with pytest.raises(ConnectTimeout):
            await transport.handle_request(make_request(target, connect_timeout=0))
        assert transport.connection_count(target) == 0


# -- open_socket -------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@pytest.mark.anyio
@pytest.mark.parametrize("host", [HOST, "localhost"], ids=["ip-literal", "name"])
async def test_open_socket_gives_a_connected_socket(host: str) -> None:
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        with await open_socket(host, port, 5.0) as sock:
            assert sock.getpeername() == (HOST, port)
            assert sock.getblocking() is False
            accepted, _ = listener.accept()
            with accepted:
                sock.send(b"ping")
                assert accepted.recv(4) == b"ping"


@pytest.mark.anyio
async def test_open_socket_tries_each_address_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    resolve = loop.getaddrinfo
    refused = closed_port()
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(8)
        port = listener.getsockname()[1]

        async def addresses(host: str, port: int, **kwargs: Any) -> list[Any]:
            if host != "upstream.test":  # uvloop's sock_connect looks its address up too
                return await resolve(host, port, **kwargs)
            stream = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
            return [(*stream, (HOST, refused)), (*stream, (HOST, port))]

        monkeypatch.setattr(loop, "getaddrinfo", addresses)
        with await open_socket("upstream.test", port, 5.0) as sock:
            assert sock.getpeername() == (HOST, port)


@pytest.mark.anyio
async def test_open_socket_failures_name_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    port = closed_port()
    with pytest.raises(ConnectError, match=rf"^cannot connect to ws://{HOST}:{port}: .*{port}"):
        await open_socket(HOST, port, 5.0, label=f"ws://{HOST}:{port}")
    with pytest.raises(ConnectError, match=rf"^cannot connect to {HOST}:{port}: "):
        await open_socket(HOST, port, None)

    loop = asyncio.get_running_loop()
    resolve = loop.getaddrinfo
    other = closed_port()

    async def addresses(host: str, port: int, **kwargs: Any) -> list[Any]:
        if host != "upstream.test":
            return await resolve(host, port, **kwargs)
        stream = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
        return [(*stream, (HOST, port)), (*stream, (HOST, other))]

    monkeypatch.setattr(loop, "getaddrinfo", addresses)
    with pytest.raises(ConnectError, match="Multiple exceptions: .*" + str(other)):
        await open_socket("upstream.test", port, 5.0)


@pytest.mark.anyio
async def test_open_socket_past_its_timeout_is_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    never = asyncio.Event()

    async def hang(*args: Any, **kwargs: Any) -> Any:
        await never.wait()

    monkeypatch.setattr(loop, "sock_connect", hang)
    with pytest.raises(ConnectTimeout, match=rf"^connecting to {HOST}:1 took over 0.05s$"):
        await open_socket(HOST, 1, 0.05)
