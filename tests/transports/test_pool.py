"""PoolTransport against real servers on 127.0.0.1.

A real uvicorn upstream (in a thread) for the ordinary exchanges and big streams, and raw
`asyncio.start_server` servers that write exact bytes for framing and failure cases.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from servers import ScriptedServer, serve_app

from asgi_gateway._config import ServerConfig, UpstreamConfig
from asgi_gateway._exceptions import (
    BadRequest,
    ConnectError,
    ConnectionReset,
    ConnectTimeout,
    InvalidResponse,
    PoolTimeout,
    ReadTimeout,
)
from asgi_gateway._transports.pool import PoolTransport
from asgi_gateway._types import Exchange, Headers, Request, RequestBody, Response, Server

HOST = "127.0.0.1"
BLOCK = bytes(range(256)) * 256  # 64 KiB
MiB = 1 << 20
# What one paused read can leave queued: the high-water mark plus one socket read (256 KiB).
MAX_QUEUED = 65536 + 262144


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """The pool runs wherever uvicorn does: plain asyncio, and uvloop (uvicorn's default)."""
    return request.param  # type: ignore[no-any-return]


# -- helpers ---------------------------------------------------------------------------------


def make_server(port: int, scheme: str = "http") -> Server:
    return Server(
        url=f"{scheme}://{HOST}:{port}",
        scheme=scheme,
        host=HOST,
        port=port,
        host_header=f"{HOST}:{port}".encode(),
    )


_EXCHANGE = Exchange(
    request_id="test",
    route="/",
    upstream=UpstreamConfig(name="up", servers=(ServerConfig(url=f"http://{HOST}:1"),)),
    client_ip=HOST,
    path="/",
    scheme="http",
)


def make_request(
    server: Server,
    method: str = "GET",
    target: bytes = b"/",
    headers: Headers | None = None,
    body: RequestBody | None = None,
    *,
    host: bytes | None = None,
    connect_timeout: float | None = 5.0,
    read_timeout: float | None = 5.0,
) -> Request:
    return Request(
        method=method,
        target=target,
        headers=headers or [],
        body=body if body is not None else RequestBody([], None),
        exchange=_EXCHANGE,
        host=host,
        server=server,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )


def streamed(chunks: Iterator[bytes] | list[bytes], length: int | None = None) -> RequestBody:
    async def rest() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return RequestBody([], length, rest())


async def read_body(response: Response) -> bytes:
    try:
        return b"".join([chunk async for chunk in response.stream])
    finally:
        await response.aclose()


async def fetch(transport: PoolTransport, request: Request) -> tuple[Response, bytes]:
    response = await transport.handle_request(request)
    return response, await read_body(response)


async def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll `predicate` until it holds, failing at the deadline."""
    with anyio.fail_after(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def sha256_of_blocks(count: int) -> str:
    digest = hashlib.sha256()
    for _ in range(count):
        digest.update(BLOCK)
    return digest.hexdigest()


# -- raw servers -----------------------------------------------------------------------------


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request: its head (up to the blank line) and its de-framed body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    body = b""
    if b"\r\ncontent-length:" in lower:
        length = int(lower.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
    elif b"\r\ntransfer-encoding: chunked" in lower:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    return head, body


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawServer:
    """asyncio.start_server on 127.0.0.1 running `handler(reader, writer, connection_number)`."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.accepted = 0
        self.closed_by_client = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._handle, HOST, 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url_server = make_server(self.port, "https" if self.ssl_context else "http")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.transport.abort()
        await self.server.wait_closed()

    def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Called in connection_made, so every accepted transport is known even if the test ends
        # before its handler task gets to run.
        self._writers.append(writer)
        self.accepted += 1
        self._tasks.add(asyncio.ensure_future(self._run(reader, writer, self.accepted)))

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        try:
            await self.handler(reader, writer, n)
        except (OSError, asyncio.IncompleteReadError):
            self.closed_by_client += 1  # reset, or EOF in the middle of a request
        except asyncio.CancelledError:
            pass  # the test is over
        finally:
            writer.transport.abort()

    async def wait_client_eof(self, reader: asyncio.StreamReader) -> None:
        """Read until the client closes (EOF, or a reset that `_handle` counts)."""
        while await reader.read(65536):
            pass
        self.closed_by_client += 1


def keep_alive_handler(server_ref: list[RawServer], response: bytes) -> Handler:
    """Answer every request on the connection with `response`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            request = await read_request(reader)
            server_ref[0].requests.append(request)
            writer.write(response)
            await writer.drain()

    return handler


def raw_server(response: bytes) -> RawServer:
    ref: list[RawServer] = []
    server = RawServer(keep_alive_handler(ref, response))
    ref.append(server)
    return server


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# -- the uvicorn upstream --------------------------------------------------------------------


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    path = scope["path"]
    if path == "/download":
        blocks = int(scope["query_string"] or b"1")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(blocks):
            await send({"type": "http.response.body", "body": BLOCK, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    digest = hashlib.sha256()
    size = 0
    more = True
    while more:
        message = await receive()
        chunk = message.get("body", b"")
        digest.update(chunk)
        size += len(chunk)
        more = message.get("more_body", False)
    payload = {
        "method": scope["method"],
        "raw_path": scope["raw_path"].decode(),
        "query_string": scope["query_string"].decode(),
        "headers": [[name.decode(), value.decode()] for name, value in scope["headers"]],
        "client_port": scope["client"][1],
        "size": size,
        "sha256": digest.hexdigest(),
    }
    body = json.dumps(payload).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def uvicorn_server() -> Iterator[Server]:
    with serve_app(upstream_app, lifespan="off", http="httptools") as url:
        yield make_server(int(url.rsplit(":", 1)[1]))


@pytest.fixture
async def transport() -> AsyncIterator[PoolTransport]:
    async with PoolTransport() as pool:
        yield pool


# -- against uvicorn -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_roundtrip_through_uvicorn(transport: PoolTransport, uvicorn_server: Server) -> None:
    request = make_request(
        uvicorn_server,
        target=b"/echo/a%2Fb?a=1&a=2&flag",
        headers=[(b"x-multi", b"1"), (b"x-multi", b"2"), (b"user-agent", b"test")],
    )
    response, body = await fetch(transport, request)
    assert response.status == 200
    assert response.peer_address == HOST
    assert [v for k, v in response.headers if k == b"set-cookie"] == [b"a=1", b"b=2"]
    assert (b"content-type", b"application/json") in response.headers
    echoed = json.loads(body)
    assert echoed["method"] == "GET"
    assert echoed["raw_path"] == "/echo/a%2Fb"
    assert echoed["query_string"] == "a=1&a=2&flag"
    # Exactly what was given, in order, after Host; nothing added (no Accept-Encoding, no framing).
    assert echoed["headers"] == [
        ["host", uvicorn_server.host_header.decode()],
        ["x-multi", "1"],
        ["x-multi", "2"],
        ["user-agent", "test"],
    ]


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
async def test_buffered_body_is_sent_with_content_length(
    transport: PoolTransport, uvicorn_server: Server
) -> None:
    body = RequestBody([b"hello", b" ", b"world"], None)
    _, data = await fetch(transport, make_request(uvicorn_server, "POST", b"/echo", body=body))
    echoed = json.loads(data)
    assert ["content-length", "11"] in echoed["headers"]
    assert echoed["sha256"] == hashlib.sha256(b"hello world").hexdigest()


@pytest.mark.anyio
@pytest.mark.parametrize("known_length", [False, True], ids=["chunked", "content-length"])
async def test_large_upload_streams_with_back_pressure(
    transport: PoolTransport, uvicorn_server: Server, known_length: bool
) -> None:
    blocks = 800  # 50 MiB
    most_queued = 0

    def produce() -> Iterator[bytes]:
        nonlocal most_queued
        for i in range(blocks):
            if i:
                # The producer only runs when the socket takes more, so little waits in memory.
                (conn,) = transport._pools[("http", HOST, uvicorn_server.port)].connections
                most_queued = max(most_queued, conn._transport.get_write_buffer_size())
            yield BLOCK

    length = blocks * len(BLOCK) if known_length else None
    request = make_request(uvicorn_server, "POST", b"/upload", body=streamed(produce(), length))
    _, data = await fetch(transport, request)
    echoed = json.loads(data)
    assert echoed["size"] == blocks * len(BLOCK)
    assert echoed["sha256"] == sha256_of_blocks(blocks)
    framing = ["transfer-encoding", "chunked"] if not known_length else ["content-length", str(length)]
    assert framing in echoed["headers"]
    assert most_queued <= 65536 + len(BLOCK)
    assert transport.idle_count(uvicorn_server) == 1


@pytest.mark.anyio
async def test_large_download_is_not_buffered(transport: PoolTransport, uvicorn_server: Server) -> None:
    blocks = 800  # 50 MiB
    response = await transport.handle_request(make_request(uvicorn_server, target=b"/download?800"))
    digest = hashlib.sha256()
    total = 0
    try:
        iterator = response.stream.__aiter__()
        first = await iterator.__anext__()
        digest.update(first)
        total += len(first)
        conn = response.stream._conn  # type: ignore[attr-defined]
        # A slow consumer: the upstream keeps sending until the transport stops reading.
        await wait_for(lambda: conn._read_paused)
        assert conn._buffered <= MAX_QUEUED
        async for chunk in iterator:
            assert len(chunk) <= MAX_QUEUED
            digest.update(chunk)
            total += len(chunk)
    finally:
        await response.aclose()
    assert total == blocks * len(BLOCK)
    assert digest.hexdigest() == sha256_of_blocks(blocks)
    assert transport.idle_count(uvicorn_server) == 1


# -- framing, against exact bytes -------------------------------------------------------------


@pytest.mark.anyio
async def test_request_framing_on_the_wire(transport: PoolTransport) -> None:
    async with raw_server(OK) as server:
        target = server.url_server
        await fetch(transport, make_request(target, "GET", b"/a?b=1", [(b"x-one", b"1")]))
        await fetch(transport, make_request(target, "POST", b"/empty"))
        await fetch(transport, make_request(target, "DELETE", b"/d", host=b"example.com"))
        await fetch(transport, make_request(target, "PUT", b"/s", body=streamed([b"abc", b"defgh"])))
        await fetch(transport, make_request(target, "PATCH", b"/l", body=streamed([b"abc"], 3)))
        heads = [head for head, _ in server.requests]
        host = f"host: {HOST}:{server.port}\r\n".encode()
        assert heads[0] == b"GET /a?b=1 HTTP/1.1\r\n" + host + b"x-one: 1\r\n\r\n"
        assert heads[1] == b"POST /empty HTTP/1.1\r\n" + host + b"content-length: 0\r\n\r\n"
        assert heads[2] == b"DELETE /d HTTP/1.1\r\nhost: example.com\r\n\r\n"
        assert heads[3] == b"PUT /s HTTP/1.1\r\n" + host + b"transfer-encoding: chunked\r\n\r\n"
        assert server.requests[3][1] == b"abcdefgh"
        assert heads[4] == b"PATCH /l HTTP/1.1\r\n" + host + b"content-length: 3\r\n\r\n"
        assert server.requests[4][1] == b"abc"
        assert server.accepted == 1


@pytest.mark.anyio
@pytest.mark.parametrize("chunks", [[b"abc"], [b"abc", b"defg"]], ids=["short", "long"])
async def test_streamed_body_not_matching_its_length_is_refused(
    transport: PoolTransport, chunks: list[bytes]
) -> None:
    async with raw_server(OK) as server:
        request = make_request(server.url_server, "POST", body=streamed(chunks, 5))
        with pytest.raises(BadRequest):
            await transport.handle_request(request)
        assert transport.connection_count(server.url_server) == 0


@pytest.mark.anyio
async def test_chunked_response_is_dechunked_and_reused(transport: PoolTransport) -> None:
    response_bytes = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    async with raw_server(response_bytes) as server:
        for _ in range(2):
            response, body = await fetch(transport, make_request(server.url_server))
            assert body == b"hello world"
            assert response.headers == [(b"transfer-encoding", b"chunked"), (b"x-a", b"1")]
        assert server.accepted == 1
        assert transport.idle_count(server.url_server) == 1


@pytest.mark.anyio
async def test_close_delimited_body_is_read_to_eof(transport: PoolTransport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nfirst ")
        await writer.drain()
        writer.write(b"second")
        writer.close()

    async with RawServer(handler) as server:
        response, body = await fetch(transport, make_request(server.url_server))
        assert response.status == 200
        assert body == b"first second"
        await wait_for(lambda: transport.connection_count(server.url_server) == 0)


@pytest.mark.anyio
async def test_head_response_has_no_body_and_connection_is_reused(transport: PoolTransport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            head, _ = await read_request(reader)
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")

    async with RawServer(handler) as server:
        target = server.url_server
        response, body = await fetch(transport, make_request(target, "HEAD"))
        assert (response.status, body) == (200, b"")
        assert (b"content-length", b"1234") in response.headers
        _, body = await fetch(transport, make_request(target, "GET"))
        assert body == b"get"
        response, body = await fetch(transport, make_request(target, "HEAD"))
        assert body == b""
        assert server.accepted == 1
        assert transport.idle_count(target) == 1


@pytest.mark.anyio
async def test_interim_responses_are_skipped(transport: PoolTransport) -> None:
    response_bytes = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone"
    )
    async with raw_server(response_bytes) as server:
        response, body = await fetch(transport, make_request(server.url_server, "POST"))
        assert response.status == 201
        assert response.headers == [(b"content-length", b"4")]
        assert body == b"done"
        _, body = await fetch(transport, make_request(server.url_server, "POST"))
        assert body == b"done"
        assert server.accepted == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\nETag: x\r\n\r\n",
    ],
)
async def test_responses_without_body(transport: PoolTransport, head: bytes) -> None:
    async with raw_server(head) as server:
        for _ in range(2):
            response, body = await fetch(transport, make_request(server.url_server))
            assert response.status in (204, 304)
            assert body == b""
        assert server.accepted == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    "response_bytes",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_no_reuse_when_upstream_says_close(transport: PoolTransport, response_bytes: bytes) -> None:
    async with raw_server(response_bytes) as server:
        for _ in range(2):
            _, body = await fetch(transport, make_request(server.url_server))
            assert body == b"ok"
            assert transport.connection_count(server.url_server) == 0
        assert server.accepted == 2


@pytest.mark.anyio
async def test_switching_protocols_on_a_plain_request_is_invalid(transport: PoolTransport) -> None:
    # The pool never asks to switch (the gateway removes Upgrade): a 101 is an invalid answer.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nraw1")
        await server.wait_client_eof(reader)

    async with RawServer(handler) as server:
        with pytest.raises(InvalidResponse, match="switched protocols"):
            await transport.handle_request(make_request(server.url_server))
        assert transport.connection_count(server.url_server) == 0
        await wait_for(lambda: server.closed_by_client == 1)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "framing",
    [
        b"Transfer-Encoding: gzip\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked, gzip\r\n",
        b"Transfer-Encoding: chunked, chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
    ],
    ids=["gzip", "gzip-chunked", "chunked-gzip", "chunked-twice", "two-chunked-headers", "two-headers"],
)
async def test_transfer_codings_other_than_chunked_are_invalid(
    transport: PoolTransport, framing: bytes
) -> None:
    # Transfer-Encoding is hop-by-hop: a coding not undone here would reach the client unnamed.
    response = b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n5\r\nhello\r\n0\r\n\r\n"
    async with raw_server(response) as server:
        with pytest.raises(InvalidResponse, match="Transfer-Encoding"):
            await transport.handle_request(make_request(server.url_server))
        assert transport.connection_count(server.url_server) == 0


@pytest.mark.anyio
@pytest.mark.parametrize("value", [b"Chunked", b"chunked "], ids=["case", "whitespace"])
async def test_chunked_is_recognised_in_any_case(transport: PoolTransport, value: bytes) -> None:
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + value + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    async with raw_server(response) as server:
        for _ in range(2):
            _, body = await fetch(transport, make_request(server.url_server))
            assert body == b"hello"
        assert server.accepted == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "head"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
    ],
    ids=["head", "304"],
)
async def test_any_transfer_coding_is_fine_without_a_body(
    transport: PoolTransport, method: str, head: bytes
) -> None:
    # RFC 9112 6.1: such answers may name the coding the body would have had.
    async with raw_server(head) as server:
        response, body = await fetch(transport, make_request(server.url_server, method))
        assert body == b""
        assert response.status in (200, 304)


@pytest.mark.anyio
async def test_response_head_over_the_limit_in_one_read_is_invalid(transport: PoolTransport) -> None:
    big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\nContent-Length: 2\r\n\r\nok"
    written = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(OK)
        await read_request(reader)
        writer.write(big)
        await wait_for(lambda: writer.transport.get_write_buffer_size() == 0)
        written.set()
        await server.wait_client_eof(reader)

    async with RawServer(handler) as server:
        target = server.url_server
        await fetch(transport, make_request(target))
        (conn,) = transport._pools[("http", HOST, server.port)].connections
        # Not read until all of it is in: the whole head then comes in one read.
        conn._transport.pause_reading()
        answer = asyncio.ensure_future(transport.handle_request(make_request(target)))
        await written.wait()
        conn._transport.resume_reading()
        with pytest.raises(InvalidResponse, match="too large"):
            await answer
        assert transport.connection_count(target) == 0


# -- bodiless answers -------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("head", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", True),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\n\r\n", False),
    ],
    ids=["no-length", "chunked", "http-1.0-keep-alive", "connection-close", "http-1.0"],
)
async def test_head_answer_keeps_its_connection_without_content_length(
    transport: PoolTransport, head: bytes, reused: bool
) -> None:
    # RFC 9112 6.3: an answer to HEAD has no body, so it needs no framing to keep the connection.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            request_head, _ = await read_request(reader)
            writer.write(head if request_head.startswith(b"HEAD") else OK)

    async with RawServer(handler) as server:
        target = server.url_server
        for method in ("HEAD", "GET", "HEAD"):
            response, body = await fetch(transport, make_request(target, method))
            assert (response.status, body) == (200, b"" if method == "HEAD" else b"ok")
        # Closed after each HEAD answer, the GET in between opens the one the last HEAD reuses.
        assert server.accepted == (1 if reused else 2)


@pytest.mark.anyio
@pytest.mark.parametrize("when", ["same-packet", "while-idle"])
async def test_unexpected_bytes_after_the_response_prevent_reuse(transport: PoolTransport, when: str) -> None:
    done = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if when == "same-packet":
            writer.write(OK + b"HTTP/1.1 200 OK\r\n\r\n")
        else:
            writer.write(OK)
            await done.wait()
            writer.write(b"surprise")
        await server.wait_client_eof(reader)

    async with RawServer(handler) as server:
        _, body = await fetch(transport, make_request(server.url_server))
        assert body == b"ok"
        done.set()
        await wait_for(lambda: transport.connection_count(server.url_server) == 0)
        await wait_for(lambda: server.closed_by_client == 1)


# -- failures --------------------------------------------------------------------------------


def cut_after(data: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(data)
        await writer.drain()
        writer.close()

    return handler


@pytest.mark.anyio
@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nhalf\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nhalf",
    ],
    ids=["after-head", "mid-length-body", "before-last-chunk", "mid-chunk"],
)
async def test_truncated_body_raises_reset(transport: PoolTransport, data: bytes) -> None:
    async with RawServer(cut_after(data)) as server:
        response = await transport.handle_request(make_request(server.url_server))
        received = b""
        with pytest.raises(ConnectionReset):
            async for chunk in response.stream:
                received += chunk
        await response.aclose()
        assert received == (b"half" if b"half" in data else b"")
        assert transport.connection_count(server.url_server) == 0


@pytest.mark.anyio
async def test_close_delimited_body_cut_by_a_reset_raises_reset(transport: PoolTransport) -> None:
    got_first = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nfirst ")
        await writer.drain()
        await got_first.wait()
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()  # an RST, not a FIN

    async with RawServer(handler) as server:
        response = await transport.handle_request(make_request(server.url_server))
        iterator = response.stream.__aiter__()
        assert await iterator.__anext__() == b"first "
        got_first.set()
        # Only a clean close ends a body framed by the close: this one was cut off.
        with pytest.raises(ConnectionReset):
            await iterator.__anext__()
        await response.aclose()
        assert transport.connection_count(server.url_server) == 0


@pytest.mark.anyio
@pytest.mark.parametrize("data", [b"", b"HTTP/1.1 200 OK\r\nContent-Le"], ids=["nothing", "half-head"])
async def test_close_before_response_raises_reset(transport: PoolTransport, data: bytes) -> None:
    async with RawServer(cut_after(data)) as server:
        with pytest.raises(ConnectionReset):
            await transport.handle_request(make_request(server.url_server))
        assert server.accepted == 1  # a fresh connection: no retry
        assert transport.connection_count(server.url_server) == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (1 * MiB) + b"\r\n\r\n",
    ],
    ids=["status", "not-http", "content-length", "huge-head"],
)
async def test_malformed_response_raises_invalid(transport: PoolTransport, data: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(data)
        await server.wait_client_eof(reader)

    async with RawServer(handler) as server:
        with pytest.raises(InvalidResponse):
            await transport.handle_request(make_request(server.url_server))
        assert transport.connection_count(server.url_server) == 0
        await wait_for(lambda: server.closed_by_client == 1)


@pytest.mark.anyio
async def test_hanging_server_raises_read_timeout(transport: PoolTransport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 2:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await server.wait_client_eof(reader)

    async with RawServer(handler) as server:
        with pytest.raises(ReadTimeout):
            await transport.handle_request(make_request(server.url_server, read_timeout=0.1))
        response = await transport.handle_request(make_request(server.url_server, read_timeout=0.1))
        chunks = []
        with pytest.raises(ReadTimeout):
            async for chunk in response.stream:
                chunks.append(chunk)
        await response.aclose()
        assert chunks == [b"half"]
        assert transport.connection_count(server.url_server) == 0
        await wait_for(lambda: server.closed_by_client == 2)


@pytest.mark.anyio
async def test_upstream_not_reading_the_body_raises_read_timeout(transport: PoolTransport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.Event().wait()  # never reads the body, never answers

    async with RawServer(handler) as server:
        request = make_request(
            server.url_server, "PUT", body=streamed(BLOCK for _ in range(800)), read_timeout=0.2
        )
        with pytest.raises(ReadTimeout, match="request body"):
            await transport.handle_request(request)
        assert transport.connection_count(server.url_server) == 0


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


# -- connection reuse --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_early_close_does_not_reuse(transport: PoolTransport) -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (4 * MiB) + b"x" * (4 * MiB)
    async with raw_server(big) as server:
        response = await transport.handle_request(make_request(server.url_server))
        first = await response.stream.__aiter__().__anext__()
        assert first
        await response.aclose()
        assert transport.connection_count(server.url_server) == 0
        await wait_for(lambda: server.closed_by_client == 1)
        _, body = await fetch(transport, make_request(server.url_server))
        assert len(body) == 4 * MiB
        assert server.accepted == 2


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


# -- early response while uploading ----------------------------------------------------------


@pytest.mark.anyio
async def test_early_response_stops_the_upload(transport: PoolTransport) -> None:
    answered = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await writer.drain()
        # Like a server that refuses the body: read nothing more until the client is done.
        await answered.wait()
        await server.wait_client_eof(reader)

    produced = 0

    def endless() -> Iterator[bytes]:
        nonlocal produced
        while True:
            produced += len(BLOCK)
            yield BLOCK

    async with RawServer(handler) as server:
        request = make_request(server.url_server, "POST", body=streamed(endless()))
        response, body = await fetch(transport, request)
        answered.set()
        assert (response.status, body) == (413, b"big")
        assert produced < 64 * MiB
        assert transport.connection_count(server.url_server) == 0
        await wait_for(lambda: server.closed_by_client == 1)


def waiting_body(first: bytes, more: asyncio.Event, rest: bytes, closed: list[str]) -> AsyncIterator[bytes]:
    """A client's body: `first`, then `rest` once `more` is set; `closed` records how it ended."""

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            await more.wait()
            yield rest
        except BaseException as exc:
            closed.append(type(exc).__name__)
            raise
        else:
            closed.append("end")

    return body()


@pytest.mark.anyio
async def test_early_response_does_not_wait_for_the_next_body_chunk(transport: PoolTransport) -> None:
    more = asyncio.Event()
    go_on = asyncio.Event()
    closed: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nConnection: close\r\nContent-Length: 6\r\n\r\nden")
        await go_on.wait()
        writer.write(b"ied")
        await server.wait_client_eof(reader)

    async with RawServer(handler) as server:
        body = RequestBody([], 11, waiting_body(b"first", more, b"second", closed))
        request = make_request(server.url_server, "POST", body=body, read_timeout=5)
        # The client's next chunk never comes before the answer: waiting for it would time out.
        with anyio.fail_after(2):
            response = await transport.handle_request(request)
        assert response.status == 401
        # The body is no longer read once the answer is handed over: its iterator is closed.
        assert closed in (["GeneratorExit"], ["CancelledError"])
        go_on.set()
        assert await read_body(response) == b"denied"
        # Left in the middle of a request, the connection is not reused.
        assert transport.connection_count(server.url_server) == 0
        await wait_for(lambda: server.closed_by_client == 1)
        assert not [task for task in asyncio.all_tasks() if "_upload" in repr(task.get_coro())]


@pytest.mark.anyio
async def test_read_timeout_starts_once_the_body_is_sent(transport: PoolTransport) -> None:
    async def slow_client() -> AsyncIterator[bytes]:
        for _ in range(3):
            await asyncio.sleep(0.15)  # the client's pace, longer in all than the read timeout
            yield b"abc"

    async with raw_server(OK) as server:
        request = make_request(
            server.url_server, "PUT", body=RequestBody([], 9, slow_client()), read_timeout=0.2
        )
        response, body = await fetch(transport, request)
        assert (response.status, body) == (200, b"ok")
        assert server.requests[0][1] == b"abcabcabc"
        assert transport.idle_count(server.url_server) == 1


@pytest.mark.anyio
async def test_cancellation_while_uploading_closes_the_body_and_the_connection() -> None:
    more = asyncio.Event()
    closed: list[str] = []
    got_first = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(5)
        got_first.set()
        await server.wait_client_eof(reader)

    async with RawServer(handler) as server, PoolTransport(max_connections_per_host=1) as transport:
        target = server.url_server
        body = RequestBody([], 11, waiting_body(b"first", more, b"second", closed))
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                transport.handle_request, make_request(target, "POST", body=body, read_timeout=None)
            )
            await got_first.wait()
            tg.cancel_scope.cancel()
        await wait_for(lambda: bool(closed))
        assert closed in (["GeneratorExit"], ["CancelledError"])
        assert transport.connection_count(target) == 0
        await wait_for(lambda: server.closed_by_client == 1)
        pool = transport._pools[("http", HOST, server.port)]
        assert pool.count == 0
        assert not [waiter for waiter in pool.waiters if not waiter.done()]
        await wait_for(lambda: not [t for t in asyncio.all_tasks() if "_upload" in repr(t.get_coro())])


# -- limits --------------------------------------------------------------------------------------


def body_on_release(release: asyncio.Event) -> Handler:
    """Each response's body is completed only once `release` is set."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nha")
            await release.wait()
            writer.write(b"lf")

    return handler


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


# -- cancellation ----------------------------------------------------------------------------------


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
            pool = transport._pools[("http", HOST, server.port)]
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
        pool = transport._pools[("http", HOST, server.port)]
        assert pool.count == 0
        assert not [waiter for waiter in pool.waiters if not waiter.done()]


# -- lifecycle and TLS ---------------------------------------------------------------------------


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


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    assert openssl is not None, "the TLS tests need the openssl command"
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=IP:{HOST}",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


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


@pytest.mark.anyio
@pytest.mark.parametrize("close_notify", [True, False], ids=["close-notify", "fin-only"])
async def test_tls_close_delimited_body_ends_only_with_close_notify(
    certificate: tuple[Path, Path], close_notify: bool
) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    finished = threading.Event()

    def script(conn: socket.socket, n: int) -> None:
        with server_context.wrap_socket(conn, server_side=True) as tls:
            head = b""
            while b"\r\n\r\n" not in head:
                head += tls.recv(65536)
            tls.sendall(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nsecure body")
            if close_notify:
                # TLS's own end of the data (sent, and the client's awaited), then the TCP close.
                plain = tls.unwrap()
                plain.shutdown(socket.SHUT_WR)
            else:
                # A TCP FIN with no close_notify before it: what a truncation attack looks like.
                plain = tls
                tls.shutdown(socket.SHUT_WR)
            while plain.recv(65536):
                pass
        finished.set()

    with ScriptedServer(script) as upstream:
        target = make_server(upstream.port, "https")
        async with PoolTransport(ssl_context=ssl.create_default_context(cafile=str(cert))) as transport:
            response = await transport.handle_request(make_request(target))
            received = b""
            try:
                if close_notify:
                    async for chunk in response.stream:
                        received += chunk
                else:
                    with pytest.raises(ConnectionReset, match="close_notify"):
                        async for chunk in response.stream:
                            received += chunk
            finally:
                await response.aclose()
            assert received == b"secure body"
            assert transport.connection_count(target) == 0
            # The server's thread sees the connection closed (the loop must run for that).
            await wait_for(finished.is_set)
        assert not upstream.errors


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
        pool = transport._pools[("http", HOST, uvicorn_server.port)]
        assert completed >= delays.count(10.0)
        assert pool.count == len(pool.connections) <= 4
        assert len(pool.idle) <= 2
        assert not [waiter for waiter in pool.waiters if not waiter.done()]
        for _ in range(3):
            _, body = await fetch(transport, make_request(uvicorn_server, target=b"/echo"))
            assert json.loads(body)["method"] == "GET"
