"""The gateway's own keep-alive HTTP/1.1 client, on asyncio protocols and httptools.

One `_HostPool` per (scheme, host, port) keeps the open connections to that server; each
connection is an `asyncio.Protocol` fed by the socket, parsing responses with httptools'
`HttpResponseParser` (llhttp, the parser uvicorn uses). The hot path allocates little: the
request head is joined into one write, the parser and its callbacks live as long as the
connection, and a response that arrived whole with its head is handed over without waiting.

Back-pressure works both ways: request bodies wait for `resume_writing` when the socket's
buffer is full, and the socket stops being read while more than `_HIGH_WATER` bytes of
response body sit unconsumed. A streamed request body goes up from a task of its own, so
that a response head arriving first is taken at once.

asyncio only: under trio the gateway uses the httpx adapter instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import ssl
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from time import monotonic
from types import TracebackType
from typing import Any, Final, cast

import httptools

from .._exceptions import (
    BadRequest,
    ConnectError,
    ConnectionReset,
    ConnectTimeout,
    InvalidResponse,
    PoolTimeout,
    ReadTimeout,
)
from .._loop import CoarseTimer, coarse_timers
from .._types import BufferedStream, Request, RequestBody, Response, Server, Transport, may_resend

__all__ = ["PoolTransport"]

# Unconsumed response body above which the socket is no longer read.
_HIGH_WATER: Final = 65536
# A response head (its header lines) larger than this is refused, whatever the reads it came in.
_MAX_HEAD: Final = 65536
# Statuses whose responses never have a body, whatever their headers say (RFC 9112 6.3).
_BODILESS: Final = frozenset({204, 304})
_NO_BODY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})
_METHODS: Final = {m: m.encode() for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}
_LAST_CHUNK: Final = b"0\r\n\r\n"

_Key = tuple[str, str, int]


class _State(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class _Connection(asyncio.Protocol):
    """One upstream connection and the state of the exchange running on it."""

    __slots__ = (
        "_active",
        "_body_sent",
        "_buffered",
        "_chunked",
        "_chunks",
        "_coding",
        "_done",
        "_error",
        "_framed",
        "_head_done",
        "_head_read",
        "_headers",
        "_is_head",
        "_keep_alive",
        "_parser",
        "_read_paused",
        "_status",
        "_timer",
        "_transport",
        "_waiter",
        "_writable",
        "_write_paused",
        "closed",
        "idle",
        "idle_since",
        "loop",
        "peer_address",
        "pool",
        "received",
        "reused",
    )

    def __init__(self, pool: _HostPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.peer_address: str | None = None
        self.closed = False
        self.idle = False
        self.idle_since = 0.0
        #: True once an exchange completed on it: a failure may then be a stale keep-alive.
        self.reused = False
        self._waiter: asyncio.Future[bool] | None = None
        self._timer: CoarseTimer | None = None
        self._write_paused = False
        #: What a request body upload waits on while the socket's write buffer is full.
        self._writable: asyncio.Future[bool] | None = None
        self._chunks: list[bytes] = []
        self._active = False
        self._is_head = False
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_done = False
        #: Bytes read up to and including the one that completed the head.
        self._head_read = 0
        self._framed = False
        self._chunked = False
        #: A Transfer-Encoding other than chunked, if the response has one.
        self._coding: bytes | None = None
        self._buffered = 0
        self._read_paused = False
        self._done = False
        self.received = False
        self._error: Exception | None = None
        self._keep_alive = True
        self._body_sent = False

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_address = str(peer[0])

    def data_received(self, data: bytes) -> None:
        if not self._active or self._done:
            # Bytes nobody asked for: this connection's framing can no longer be trusted.
            self._keep_alive = False
            if not self._active:
                self.close()
            return
        self.received = True
        if not self._head_done:
            self._head_read += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # A callback's own refusal is in `_error` already, and `_fail` keeps the first.
            if not self._done:
                self._fail(InvalidResponse(f"invalid response from {self.pool.label}: {exc}"))
            self._keep_alive = False
        else:
            if not self._head_done and self._head_read > _MAX_HEAD:
                # A head arriving in pieces is buffered by the parser until its lines end.
                self._fail(InvalidResponse(f"response head from {self.pool.label} is too large"))
        self._wake()

    def eof_received(self) -> bool:
        # Only a clean close ends a close-delimited body. The stdlib's TLS transport reports a
        # close without close_notify as a plain EOF (uvloop's calls connection_lost instead).
        self._lost(None, self.pool.ssl is None or _closed_cleanly(self._transport))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        # Without eof_received before it: a reset, an abort, or TLS ended without close_notify.
        self._lost(exc, False)
        self._writable_again()
        if not self.closed:
            self.closed = True
            self.pool.discard(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._writable_again()

    def _writable_again(self) -> None:
        writable = self._writable
        if writable is not None:
            self._writable = None
            if not writable.done():
                writable.set_result(True)

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._head_done:
            # A second response to one request: raising stops the parser.
            raise InvalidResponse("unexpected data after the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # a chunked body's trailer: the head was handed over already
        name = name.lower()
        if name == b"content-length":
            self._framed = True
        elif name == b"transfer-encoding":
            # Only chunked is undone here. Any other coding would reach the client still applied
            # and no longer named (the header is hop-by-hop): refused below, as nginx does.
            if self._chunked or (value != b"chunked" and value.strip().lower() != b"chunked"):
                self._coding = value
            self._chunked = self._framed = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                # The gateway never asks a pooled connection to switch protocols (RFC 9110 15.2.2).
                self._refuse(f"{self.pool.label} switched protocols on a plain request")
            # Interim response (100 Continue, 103 Early Hints): the real one follows.
            self._headers = []
            self._framed = self._chunked = False
            self._coding = None
            return
        if self._head_read > _MAX_HEAD and _head_size(self._headers) > _MAX_HEAD:
            # Whole in one read (or the last of a few), the head was not caught piece by piece.
            self._refuse(f"response head from {self.pool.label} is too large")
        if self._is_head:
            # httptools cannot be told the request was HEAD, so it would wait for the body that
            # Content-Length announces (or, without one, for the close): the response ends
            # here, and the parser is replaced.
            self._done = True
            self._keep_alive = _keeps_alive(parser.get_http_version(), self._headers)
        else:
            if self._coding is not None and status not in _BODILESS:
                self._refuse(
                    f"{self.pool.label} sent a body with Transfer-Encoding {self._coding.decode('latin-1')!r}"
                )
            self._keep_alive = parser.should_keep_alive()
        self._status = status
        self._head_done = True

    def on_body(self, body: bytes) -> None:
        if self._done:
            self._keep_alive = False
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._head_done:
            self._done = True

    def _refuse(self, detail: str) -> None:
        """Fail the exchange with InvalidResponse; raised, it also stops the parser."""
        if self._error is None:
            self._error = InvalidResponse(detail)
        raise self._error

    # -- state changes --------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(True)
            self._stop_timer()

    def _stop_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()

    def _lost(self, exc: Exception | None, clean: bool) -> None:
        """The peer closed the connection (EOF; `clean` unless TLS ended without close_notify) or it broke."""
        self._keep_alive = False
        if not self._active:
            self.close()
            return
        if not self._done and self._error is None:
            if clean and self._head_done and not self._framed:
                self._done = True  # a close-delimited body ends here
            else:
                where = "the response body" if self._head_done else "any response"
                if exc is not None:
                    reason = f": {exc}"
                elif not clean:
                    reason = " (no TLS close_notify)" if self.pool.ssl is not None else ""
                else:
                    reason = ""
                self._error = ConnectionReset(
                    f"{self.pool.label} closed the connection before the end of {where}{reason}"
                )
        self._wake()

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self.close()

    def close(self) -> None:
        """Close at once; never reused. Safe to call any number of times."""
        if self._active and not self._done and self._error is None:
            self._error = ConnectionReset(f"connection to {self.pool.label} closed")
        self._wake()
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.abort()
            self.pool.discard(self)

    def finish(self) -> None:
        """The response ended: back to the pool if the exchange was clean, else close."""
        self._active = False
        if self._keep_alive and self._body_sent and not self.closed and self._error is None:
            self.reused = True
            if self._read_paused and self._transport is not None:
                self._read_paused = False
                self._transport.resume_reading()
            self.pool.release(self)
        else:
            self.close()

    def wait(self, deadline: float | None) -> asyncio.Future[bool]:
        """To await until the protocol has news: True; or False when `deadline` (loop time) passed.

        The future itself, awaited with no coroutine of its own in between; `_wake` clears it.
        """
        self._stop_timer()
        waiter: asyncio.Future[bool] = self.loop.create_future()
        self._waiter = waiter
        if deadline is not None:
            self._timer = coarse_timers(self.loop).call_at(deadline, _expire, waiter)
        return waiter

    def _deadline(self, timeout: float | None) -> float | None:
        return None if timeout is None else self.loop.time() + timeout

    # -- the exchange ---------------------------------------------------------------------

    async def send(
        self, request: Request, message: bytes | None, length: int | None, chunked: bool
    ) -> Response:
        """Send `request` and return the response head.

        `message` is the whole request, encoded, when its body is buffered; else None and the
        body is streamed.

        On any exception (cancellation included) the connection is closed. A reused keep-alive
        connection that the server had closed is most likely why it failed at once, so the
        request goes once more on a new connection, as Go's net/http does: only when it can be
        sent again, and only if the server may see it twice (it may also have died handling it).
        """
        if self._is_head:
            self._parser = httptools.HttpResponseParser(self)
        self._reset()
        self._active = True
        self._is_head = request.method == "HEAD"
        transport = self._transport
        assert transport is not None
        timeout = request.read_timeout
        try:
            if self.closed:
                raise ConnectionReset(f"connection to {self.pool.label} closed")
            if message is not None:
                transport.write(message)
                self._body_sent = True
            else:
                await self._send_streamed(request, length, chunked, timeout)
            deadline = self._deadline(timeout)
            while not self._head_done:
                if self._error is not None:
                    raise self._error
                if not await self.wait(deadline):
                    raise ReadTimeout(f"no response from {self.pool.label} within {timeout}s")
        except BaseException as exc:
            self.close()
            body = request.body
            if not (
                isinstance(exc, ConnectionReset)
                and self.reused
                and not self.received
                and (body.replayable or not body.started)
                and may_resend(request)
            ):
                raise
        else:
            response = Response(self._status, self._headers, _EMPTY, request.server, self.peer_address)
            if not self._done:
                response.stream = _BodyStream(self, timeout)
            else:
                # The whole response came with its head: the connection is free at once.
                if self._chunks:
                    response.stream = BufferedStream(self.take())
                self.finish()
            return response
        fresh = await self.pool.acquire(request.connect_timeout, fresh=True)
        return await fresh.send(request, message, length, chunked)

    async def _send_streamed(
        self, request: Request, length: int | None, chunked: bool, read_timeout: float | None
    ) -> None:
        """Send the head, then the body, until all of it is sent or the response head comes first.

        The body goes from a task of its own, so that an upstream answering early (401, 413)
        is heard at once rather than when the client's next chunk arrives. Then the body stops
        being read and sent, its iterator closed before this returns, and the connection,
        left in the middle of a request, is never reused.
        """
        transport = self._transport
        assert transport is not None
        transport.write(_encode_head(request, length, chunked))
        iterator = request.body.__aiter__()
        coroutine = self._upload(iterator, length, chunked, read_timeout)
        upload = self.loop.create_task(coroutine)
        upload.add_done_callback(self._upload_ended)
        try:
            while not self._head_done and not upload.done():
                if self._error is not None:
                    raise self._error
                await self.wait(None)
        finally:
            if not upload.done():
                upload.cancel()
                if inspect.getcoroutinestate(coroutine) == inspect.CORO_CREATED:
                    # Cancelled before it ran, it never will: the iterator is closed here.
                    await _aclose(iterator)
                else:
                    # It closes the iterator as it ends: nothing may still be reading the
                    # client's body once this returns.
                    await asyncio.wait((upload,))
            error = upload.exception() if upload.done() and not upload.cancelled() else None
        if error is not None and not self._head_done:
            raise error

    def _upload_ended(self, upload: asyncio.Task[None]) -> None:
        if not upload.cancelled():
            # Retrieved, so that one outrun by the response head or a cancellation is not logged.
            upload.exception()
        self._wake()

    async def _upload(
        self, iterator: AsyncIterator[bytes], length: int | None, chunked: bool, read_timeout: float | None
    ) -> None:
        transport = self._transport
        assert transport is not None
        sent = 0
        try:
            async for chunk in iterator:
                if self._head_done or self.closed:
                    # The upstream answered (413, say) or gave up before taking the whole body.
                    return
                sent += len(chunk)
                if length is not None and sent > length:
                    raise BadRequest(f"request body is longer than its Content-Length of {length}")
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                if self._write_paused:
                    await self._drain(read_timeout)
        finally:
            await _aclose(iterator)
        if length is not None and sent != length:
            raise BadRequest(f"request body ended after {sent} of {length} bytes")
        if self.closed:
            return
        if chunked:
            transport.write(_LAST_CHUNK)
        self._body_sent = True

    async def _drain(self, read_timeout: float | None) -> None:
        deadline = self._deadline(read_timeout)
        while self._write_paused and not self.closed:
            writable = self._writable = self.loop.create_future()
            timer = (
                None if deadline is None else coarse_timers(self.loop).call_at(deadline, _expire, writable)
            )
            try:
                taken = await writable
            finally:
                if timer is not None:
                    timer.cancel()
            if not taken:
                raise ReadTimeout(f"{self.pool.label} did not take the request body within {read_timeout}s")

    def take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._read_paused and self._transport is not None:
            self._read_paused = False
            self._transport.resume_reading()
        return data

    async def next_body(self, read_timeout: float | None) -> bytes | None:
        """The next piece of response body; None at its clean end."""
        deadline = None
        while True:
            if self._chunks:
                return self.take()
            if self._done:
                return None
            if self._error is not None:
                raise self._error
            if deadline is None:
                deadline = self._deadline(read_timeout)
            if not await self.wait(deadline):
                raise ReadTimeout(f"{self.pool.label} sent no response body for {read_timeout}s")


class _BodyStream:
    """A response body still arriving on its connection."""

    __slots__ = ("_conn", "_timeout")

    def __init__(self, conn: _Connection, timeout: float | None) -> None:
        self._conn: _Connection | None = conn
        self._timeout = timeout

    def __aiter__(self) -> _BodyStream:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        if conn._chunks:
            return conn.take()
        try:
            data = await conn.next_body(self._timeout)
        except BaseException:
            self._conn = None
            conn.close()
            raise
        if data is None:
            self._conn = None
            conn.finish()
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            if conn._done and not conn._chunks and conn._error is None:
                conn.finish()
            else:
                conn.close()


_EMPTY: Final = BufferedStream(b"")


async def _aclose(iterator: AsyncIterator[bytes]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def _head_size(headers: list[tuple[bytes, bytes]]) -> int:
    return sum(len(name) + len(value) + 4 for name, value in headers)


def _keeps_alive(version: str, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a response's connection may carry another exchange, by its version and Connection."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    if b"close" in tokens:
        return False
    return version != "1.0" or b"keep-alive" in tokens


def _closed_cleanly(transport: asyncio.Transport | None) -> bool:
    """Whether a TLS connection at EOF received the peer's close_notify.

    Everything the peer sent has been decrypted by then; a read on the TLS object gives b""
    once close_notify has come, and wants more data (SSLWantReadError) when it never did.
    """
    ssl_object = None if transport is None else transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return True
    try:
        return cast(bytes, ssl_object.read(1)) == b""
    except ssl.SSLZeroReturnError:
        return True
    except ssl.SSLError:
        return False


def _encode_head(
    request: Request, length: int | None, chunked: bool, body: list[bytes] | None = None
) -> bytes:
    server = request.server
    assert server is not None
    method = request.method
    parts = [
        _METHODS.get(method) or method.encode("ascii"),
        b" ",
        request.target or b"/",
        b" HTTP/1.1\r\nhost: ",
        request.host or server.host_header,
        b"\r\n",
    ]
    for name, value in request.headers:
        parts += (name, b": ", value, b"\r\n")
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n\r\n")
    elif length is None:
        parts.append(b"\r\n")
    else:
        parts.append(b"content-length: %d\r\n\r\n" % length)
    if body:
        parts += body
    return b"".join(parts)


def _framing(method: str, body: RequestBody) -> tuple[int | None, bool]:
    """The request's framing: (Content-Length or None, chunked)."""
    length = body.length
    if length is not None:
        return length, False
    if not body.replayable:
        return None, True
    # A buffered body's size is known, so it goes with a Content-Length rather than chunked.
    length = sum(map(len, body.chunks))
    if length == 0 and method in _NO_BODY_METHODS:
        return None, False
    return length, False


class _HostPool:
    """The connections to one (scheme, host, port)."""

    __slots__ = (
        "closed",
        "connections",
        "count",
        "host",
        "idle",
        "idle_timeout",
        "label",
        "max_connections",
        "max_idle",
        "port",
        "server_hostname",
        "ssl",
        "waiters",
    )

    def __init__(
        self,
        server: Server,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        max_idle: int,
        idle_timeout: float,
    ) -> None:
        self.host = server.host
        self.port = server.port
        self.label = f"{server.scheme}://{server.host}:{server.port}"
        self.ssl = ssl_context
        self.server_hostname = server.host if ssl_context is not None else None
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.closed = False
        #: Open connections, plus those being opened and slots promised to a waiter.
        self.count = 0
        self.connections: set[_Connection] = set()
        #: Idle connections, most recently used last.
        self.idle: deque[_Connection] = deque()
        #: Requests waiting for a free connection. Each is handed a connection, True (a slot is
        #: reserved for it: open one) or False (timed out, or the pool closed).
        self.waiters: deque[asyncio.Future[_Connection | bool]] = deque()

    def take_idle(self, now: float) -> _Connection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            conn.idle = False
            if now - conn.idle_since < self.idle_timeout:
                return conn
            conn.close()
            # Every older one has been idle too long as well.
            while idle:
                old = idle.pop()
                old.idle = False
                old.close()
        return None

    async def acquire(self, connect_timeout: float | None, *, fresh: bool = False) -> _Connection:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("PoolTransport runs on asyncio only: use HttpxTransport elsewhere") from None
        deadline = None if connect_timeout is None else loop.time() + connect_timeout
        while True:
            if self.closed:
                raise ConnectError(f"the connection pool for {self.label} is closed")
            if not fresh:
                conn = self.take_idle(monotonic())
                if conn is not None:
                    return conn
            if self.count < self.max_connections:
                self.count += 1
                return await self._open(loop, deadline, connect_timeout)
            handed = await self._wait_turn(loop, deadline, connect_timeout)
            if handed is None:
                return await self._open(loop, deadline, connect_timeout)
            if not handed.closed:
                return handed

    async def _wait_turn(
        self, loop: asyncio.AbstractEventLoop, deadline: float | None, connect_timeout: float | None
    ) -> _Connection | None:
        """Wait for a connection handed over (returned) or a reserved slot (None)."""
        waiter: asyncio.Future[_Connection | bool] = loop.create_future()
        self.waiters.append(waiter)
        timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
        try:
            result = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Cancelled after being handed something: pass it on.
                self._give_back(waiter.result())
            else:
                self._forget(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if result is False:
            if self.closed:
                raise ConnectError(f"the connection pool for {self.label} is closed")
            self._forget(waiter)
            raise PoolTimeout(
                f"no connection to {self.label} became free within {connect_timeout}s "
                f"(max_connections_per_host={self.max_connections})"
            )
        if result is True:
            return None
        assert isinstance(result, _Connection)
        return result

    def _forget(self, waiter: asyncio.Future[_Connection | bool]) -> None:
        # A waker may have dropped it already, seeing it done.
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)

    def _give_back(self, handed: _Connection | bool) -> None:
        if handed is True:
            self._free_slot()
        elif isinstance(handed, _Connection):
            self.release(handed)

    async def _open(
        self, loop: asyncio.AbstractEventLoop, deadline: float | None, connect_timeout: float | None
    ) -> _Connection:
        """Connect, in a slot already counted in `self.count`."""
        conn = _Connection(self, loop)
        # Known from the start, so that however it ends, closing it frees the slot once.
        self.connections.add(conn)
        try:
            async with asyncio.timeout_at(deadline):
                await loop.create_connection(
                    lambda: conn, self.host, self.port, ssl=self.ssl, server_hostname=self.server_hostname
                )
        except BaseException as exc:
            conn.close()
            # TimeoutError first: it is an OSError too.
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(f"connecting to {self.label} took over {connect_timeout}s") from None
            if isinstance(exc, OSError):
                raise ConnectError(f"cannot connect to {self.label}: {exc}") from exc
            raise
        if self.closed:
            conn.close()
            raise ConnectError(f"the connection pool for {self.label} is closed")
        if conn.closed:
            raise ConnectError(f"{self.label} closed the connection as soon as it was opened")
        return conn

    def _free_slot(self) -> None:
        self.count -= 1
        if self.closed:
            return
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                self.count += 1
                waiter.set_result(True)
                return

    def release(self, conn: _Connection) -> None:
        """Take back a connection whose exchange ended cleanly."""
        if self.closed:
            conn.close()
            return
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        idle = self.idle
        if len(idle) >= self.max_idle:
            conn.close()
            return
        now = monotonic()
        conn.idle = True
        conn.idle_since = now
        idle.append(conn)
        # No timer per connection: the long-idle ones are closed whenever the pool is used.
        while idle and now - idle[0].idle_since >= self.idle_timeout:
            old = idle.popleft()
            old.idle = False
            old.close()

    def discard(self, conn: _Connection) -> None:
        """`conn` is closed: forget it and free its slot."""
        if conn.idle:
            conn.idle = False
            self.idle.remove(conn)
        if conn in self.connections:
            self.connections.remove(conn)
            self._free_slot()

    def close(self) -> None:
        self.closed = True
        for conn in list(self.connections):
            conn.close()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(False)


class PoolTransport(Transport):
    """The built-in HTTP/1.1 client: keep-alive connection pools per upstream server (asyncio only).

    `max_connections_per_host` bounds the open connections to one server; a request that finds
    them all busy waits for one, up to its connect timeout (then `PoolTimeout`, a 503 that
    does not count against the server).
    `max_idle_per_host` idle connections are kept, each for at most `idle_timeout` seconds.
    `ssl_context` is used for https servers (default: the system's trusted CAs).
    """

    def __init__(
        self,
        *,
        max_connections_per_host: int = 1024,
        max_idle_per_host: int = 32,
        idle_timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections_per_host < 1:
            raise ValueError("max_connections_per_host must be at least 1")
        if max_idle_per_host < 0:
            raise ValueError("max_idle_per_host must not be negative")
        if idle_timeout < 0:
            raise ValueError("idle_timeout must not be negative")
        self._max_connections = max_connections_per_host
        self._max_idle = max_idle_per_host
        self._idle_timeout = idle_timeout
        self._ssl_context = ssl_context
        self._pools: dict[_Key, _HostPool] = {}
        self._state = _State.UNOPENED

    async def __aenter__(self) -> PoolTransport:
        if self._state is not _State.UNOPENED:
            raise RuntimeError(
                "Cannot open a transport that is already open or closed."
                if self._state is _State.OPENED
                else "Cannot reopen a transport once it has been closed."
            )
        self._state = _State.OPENED
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()

    def connection_count(self, server: Server) -> int:
        """Open connections to `server`, idle or busy."""
        pool = self._pools.get((server.scheme, server.host, server.port))
        return 0 if pool is None else len(pool.connections)

    def idle_count(self, server: Server) -> int:
        """Idle connections to `server`, ready for the next request."""
        pool = self._pools.get((server.scheme, server.host, server.port))
        return 0 if pool is None else len(pool.idle)

    def _pool(self, server: Server) -> _HostPool:
        if self._state is not _State.OPENED:
            if self._state is _State.CLOSED:
                raise RuntimeError("Cannot send a request, as the transport has been closed.")
            self._state = _State.OPENED
        key = (server.scheme, server.host, server.port)
        pool = self._pools.get(key)
        if pool is None:
            context = None
            if server.scheme == "https":
                if self._ssl_context is None:
                    self._ssl_context = ssl.create_default_context()
                    self._ssl_context.set_alpn_protocols(["http/1.1"])
                context = self._ssl_context
            pool = _HostPool(server, context, self._max_connections, self._max_idle, self._idle_timeout)
            self._pools[key] = pool
        return pool

    def handle_request(self, request: Request) -> Coroutine[Any, Any, Response]:
        server = request.server
        if server is None:
            raise RuntimeError("request.server must be set before the transport sends it")
        pool = self._pool(server)
        body = request.body
        length, chunked = _framing(request.method, body)
        # A buffered body goes out with its head in one write; a streamed one follows it.
        message = _encode_head(request, length, chunked, body.chunks) if body.replayable else None
        conn = pool.take_idle(monotonic())
        if conn is None:
            return self._send_when_connected(pool, request, message, length, chunked)
        # The connection's own coroutine, not one more awaiting it: the usual case.
        return conn.send(request, message, length, chunked)

    @staticmethod
    async def _send_when_connected(
        pool: _HostPool, request: Request, message: bytes | None, length: int | None, chunked: bool
    ) -> Response:
        conn = await pool.acquire(request.connect_timeout)
        return await conn.send(request, message, length, chunked)

    async def aclose(self) -> None:
        """Close every connection; the transport cannot be used afterwards."""
        self._state = _State.CLOSED
        pools = list(self._pools.values())
        self._pools.clear()
        for pool in pools:
            pool.close()
