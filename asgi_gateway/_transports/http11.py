"""One HTTP/1.1 exchange after another on one upstream connection, on asyncio protocols and httptools.

`HTTP11Connection` is the `asyncio.Protocol` fed by the socket; it parses responses with
httptools' `HttpResponseParser` (llhttp, the parser uvicorn uses), whose parser and callbacks
live as long as the connection. A buffered request goes out as one write, head and body
together; a response that arrived whole with its head is handed over without waiting.

Back-pressure works both ways: request bodies wait for `resume_writing` when the socket's
buffer is full, and the socket stops being read while more than `_HIGH_WATER` bytes of
response body sit unconsumed. A streamed request body goes up from a task of its own, so
that a response head arriving first is taken at once.

Which connection serves a request, and whether a failed one is worth sending again, is the
business of its `ConnectionOwner` (the pool).
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Final, Protocol, cast

import httptools

from .._exceptions import BadRequest, ConnectionReset, InvalidResponse, ReadTimeout
from .._loop import CoarseTimer, coarse_timers
from .._types import BufferedStream, Request, RequestBody, Response

__all__ = ["ConnectionOwner", "HTTP11Connection", "encode_head", "framing"]

# Unconsumed response body above which the socket is no longer read.
_HIGH_WATER: Final = 65536
# A response head (its header lines) larger than this is refused, whatever the reads it came in.
_MAX_HEAD: Final = 65536
# Statuses whose responses never have a body, whatever their headers say (RFC 9112 6.3).
_BODILESS: Final = frozenset({204, 304})
_NO_BODY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})
_METHODS: Final = {m: m.encode() for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}
_LAST_CHUNK: Final = b"0\r\n\r\n"


class ConnectionOwner(Protocol):
    """What a connection tells the pool that owns it."""

    #: The server, as error messages name it: "http://host:port".
    label: str

    def release(self, conn: HTTP11Connection) -> None:
        """`conn`'s exchange ended cleanly: it may serve another request."""

    def discard(self, conn: HTTP11Connection) -> None:
        """`conn` is closed."""

    def after_failure(
        self, conn: HTTP11Connection, error: BaseException, request: Request
    ) -> Coroutine[Any, Any, Response] | None:
        """`conn` (closed now) failed to send `request`: a coroutine sending it once more, or None.

        With None, `error` propagates.
        """


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class HTTP11Connection(asyncio.Protocol):
    """One upstream connection and the state of the exchange running on it.

    `idle` and `idle_since` are the owner's bookkeeping; `reused` (an exchange completed on it
    before) and `received` (the current exchange got bytes back) tell the owner whether a
    failure may be the server having closed a keep-alive connection.
    """

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
        "_loop",
        "_owner",
        "_parser",
        "_read_paused",
        "_status",
        "_timer",
        "_tls",
        "_transport",
        "_waiter",
        "_writable",
        "_write_paused",
        "closed",
        "idle",
        "idle_since",
        "peer_address",
        "received",
        "reused",
    )

    def __init__(self, owner: ConnectionOwner, loop: asyncio.AbstractEventLoop, *, tls: bool) -> None:
        self._owner = owner
        self._loop = loop
        self._tls = tls
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.peer_address: str | None = None
        self.closed = False
        self.idle = False
        self.idle_since = 0.0
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

    @property
    def opened(self) -> bool:
        """Whether the loop has handed it its transport (for TLS, once the handshake is done)."""
        return self._transport is not None

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
                self._fail(InvalidResponse(f"invalid response from {self._owner.label}: {exc}"))
            self._keep_alive = False
        else:
            if not self._head_done and self._head_read > _MAX_HEAD:
                # A head arriving in pieces is buffered by the parser until its lines end.
                self._fail(InvalidResponse(f"response head from {self._owner.label} is too large"))
        self._wake()

    def eof_received(self) -> bool:
        # Only a clean close ends a close-delimited body. The stdlib's TLS transport reports a
        # close without close_notify as a plain EOF (uvloop's calls connection_lost instead).
        self._lost(None, not self._tls or _closed_cleanly(self._transport))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        # Without eof_received before it: a reset, an abort, or TLS ended without close_notify.
        self._lost(exc, False)
        self._writable_again()
        if not self.closed:
            self.closed = True
            self._owner.discard(self)

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
                self._refuse(f"{self._owner.label} switched protocols on a plain request")
            # Interim response (100 Continue, 103 Early Hints): the real one follows.
            self._headers = []
            self._framed = self._chunked = False
            self._coding = None
            return
        if self._head_read > _MAX_HEAD and _head_size(self._headers) > _MAX_HEAD:
            # Whole in one read (or the last of a few), the head was not caught piece by piece.
            self._refuse(f"response head from {self._owner.label} is too large")
        if self._is_head:
            # httptools cannot be told the request was HEAD, so it would wait for the body that
            # Content-Length announces (or, without one, for the close): the response ends
            # here, and the parser is replaced.
            self._done = True
            self._keep_alive = _keeps_alive(parser.get_http_version(), self._headers)
        else:
            if self._coding is not None and status not in _BODILESS:
                self._refuse(
                    f"{self._owner.label} sent a body with Transfer-Encoding {self._coding.decode('latin-1')!r}"
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
                    reason = " (no TLS close_notify)" if self._tls else ""
                else:
                    reason = ""
                self._error = ConnectionReset(
                    f"{self._owner.label} closed the connection before the end of {where}{reason}"
                )
        self._wake()

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self.close()

    def close(self) -> None:
        """Close at once; never reused. Safe to call any number of times."""
        if self._active and not self._done and self._error is None:
            self._error = ConnectionReset(f"connection to {self._owner.label} closed")
        self._wake()
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.abort()
            self._owner.discard(self)

    def finish(self) -> None:
        """The response ended: back to the owner if the exchange was clean, else close."""
        self._active = False
        if self._keep_alive and self._body_sent and not self.closed and self._error is None:
            self.reused = True
            if self._read_paused and self._transport is not None:
                self._read_paused = False
                self._transport.resume_reading()
            self._owner.release(self)
        else:
            self.close()

    def _wait(self, deadline: float | None) -> asyncio.Future[bool]:
        """To await until the protocol has news: True; or False when `deadline` (loop time) passed.

        The future itself, so that awaiting it puts no coroutine in between; `_wake` clears it.
        """
        self._stop_timer()
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._waiter = waiter
        if deadline is not None:
            self._timer = coarse_timers(self._loop).call_at(deadline, _expire, waiter)
        return waiter

    def _deadline(self, timeout: float | None) -> float | None:
        return None if timeout is None else self._loop.time() + timeout

    # -- the request ----------------------------------------------------------------------

    async def send(
        self, request: Request, message: bytes | None, length: int | None, chunked: bool
    ) -> Response:
        """Send `request` and return the response head.

        `length` and `chunked` are the request's `framing`. `message` is the whole request,
        encoded (`encode_head` with the body), when its body is buffered; else None, and the
        body is streamed.

        On any exception (cancellation included) the connection is closed, and its owner asked
        whether the request goes again elsewhere (`ConnectionOwner.after_failure`). Asked
        here rather than by a coroutine of the owner's around this one, so that a request on
        an idle connection runs in this coroutine alone.
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
                raise ConnectionReset(f"connection to {self._owner.label} closed")
            if message is not None:
                transport.write(message)
                self._body_sent = True
            else:
                await self._send_streamed(request, length, chunked, timeout)
            deadline = self._deadline(timeout)
            # A Content-Length body is waited for until its first bytes, so that a server dying
            # between its head and its body fails the attempt here, where it can be retried,
            # rather than once the head has gone on to the client. Chunked and close-delimited
            # bodies are not: they may be streams whose first bytes come much later.
            while not self._head_done or (
                not self._done and not self._chunks and self._framed and not self._chunked
            ):
                if self._error is not None:
                    raise self._error
                if not await self._wait(deadline):
                    what = "response body" if self._head_done else "response"
                    raise ReadTimeout(f"no {what} from {self._owner.label} within {timeout}s")
        except BaseException as exc:
            self.close()
            again = self._owner.after_failure(self, exc, request)
            if again is None:
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
        return await again

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
        transport.write(encode_head(request, length, chunked))
        iterator = request.body.__aiter__()
        coroutine = self._upload(iterator, length, chunked, read_timeout)
        upload = self._loop.create_task(coroutine)
        upload.add_done_callback(self._upload_ended)
        try:
            while not self._head_done and not upload.done():
                if self._error is not None:
                    raise self._error
                await self._wait(None)
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
            writable = self._writable = self._loop.create_future()
            timer = (
                None if deadline is None else coarse_timers(self._loop).call_at(deadline, _expire, writable)
            )
            try:
                taken = await writable
            finally:
                if timer is not None:
                    timer.cancel()
            if not taken:
                raise ReadTimeout(f"{self._owner.label} did not take the request body within {read_timeout}s")

    # -- the response body ----------------------------------------------------------------

    def take(self) -> bytes:
        """The response body received and not yet taken; b"" when there is none."""
        chunks = self._chunks
        if not chunks:
            return b""
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
            if not await self._wait(deadline):
                raise ReadTimeout(f"{self._owner.label} sent no response body for {read_timeout}s")

    def close_body(self) -> None:
        """The body's reader closed it: back to the owner if it was read to its clean end, else close."""
        if self._done and not self._chunks and self._error is None:
            self.finish()
        else:
            self.close()


class _BodyStream:
    """A response body still arriving on its connection."""

    __slots__ = ("_conn", "_timeout")

    def __init__(self, conn: HTTP11Connection, timeout: float | None) -> None:
        self._conn: HTTP11Connection | None = conn
        self._timeout = timeout

    def __aiter__(self) -> _BodyStream:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        # What has arrived already is taken without a coroutine to wait for more.
        data = conn.take()
        if data:
            return data
        try:
            body = await conn.next_body(self._timeout)
        except BaseException:
            self._conn = None
            conn.close()
            raise
        if body is None:
            self._conn = None
            conn.finish()
            raise StopAsyncIteration
        return body

    async def aclose(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.close_body()


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


def encode_head(
    request: Request, length: int | None, chunked: bool, body: list[bytes] | None = None
) -> bytes:
    """The request line and headers, framed as `framing` says, followed by `body` if given."""
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


def framing(method: str, body: RequestBody) -> tuple[int | None, bool]:
    """How a request with `body` is framed: (Content-Length or None, chunked)."""
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
