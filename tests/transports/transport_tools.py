"""What the transport tests share.

Requests and their bodies, raw `asyncio.start_server` servers on 127.0.0.1 that write exact
bytes, and the app of the uvicorn upstream (`conftest.uvicorn_server`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio

from asgi_gateway._config import ServerConfig, UpstreamConfig
from asgi_gateway._transports.pool import PoolTransport
from asgi_gateway._types import Exchange, Headers, Request, RequestBody, Response, Server

HOST = "127.0.0.1"


BLOCK = bytes(range(256)) * 256  # 64 KiB


MiB = 1 << 20


# What one paused read can leave queued: the high-water mark plus one socket read (256 KiB).
MAX_QUEUED = 65536 + 262144


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


def body_on_release(release: asyncio.Event) -> Handler:
    """Each response's body is completed only once `release` is set."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nha")
            await release.wait()
            writer.write(b"lf")

    return handler


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
