"""The HTTP/1.1 exchange on one connection (`http11.HTTP11Connection`), through PoolTransport.

Against a real uvicorn upstream (in a thread) for the ordinary exchanges and big streams, and
raw `asyncio.start_server` servers that write exact bytes for framing and failure cases.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from servers import ScriptedServer
from transports.transport_tools import (
    BLOCK,
    HOST,
    MAX_QUEUED,
    OK,
    Handler,
    MiB,
    RawServer,
    fetch,
    make_request,
    make_server,
    raw_server,
    read_body,
    read_request,
    sha256_of_blocks,
    streamed,
    wait_for,
)

from asgi_gateway._exceptions import (
    BadRequest,
    ConnectionReset,
    InvalidResponse,
    ReadTimeout,
)
from asgi_gateway._transports.pool import PoolTransport
from asgi_gateway._types import RequestBody, Server

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
                (conn,) = transport._pools[("http", HOST, uvicorn_server.port, None)].connections
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


# -- framing, against exact bytes ------------------------------------------------------------


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
        (conn,) = transport._pools[("http", HOST, server.port, None)].connections
        # Not read until all of it is in: the whole head then comes in one read.
        conn._transport.pause_reading()
        answer = asyncio.ensure_future(transport.handle_request(make_request(target)))
        await written.wait()
        conn._transport.resume_reading()
        with pytest.raises(InvalidResponse, match="too large"):
            await answer
        assert transport.connection_count(target) == 0


# -- bodiless answers ------------------------------------------------------------------------


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
        if data.endswith(b"\r\n\r\n") and b"Content-Length" in data:
            # Cut before a Content-Length body's first byte: the attempt fails before any
            # response is handed on, where the retry layer may still send it elsewhere.
            with pytest.raises(ConnectionReset, match="before the end of the response body"):
                await transport.handle_request(make_request(server.url_server))
            assert transport.connection_count(server.url_server) == 0
            return
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
        pool = transport._pools[("http", HOST, server.port, None)]
        assert pool.count == 0
        assert not [waiter for waiter in pool.waiters if not waiter.done()]
        await wait_for(lambda: not [t for t in asyncio.all_tasks() if "_upload" in repr(t.get_coro())])


# -- TLS -------------------------------------------------------------------------------------


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
