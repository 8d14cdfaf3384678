"""A WebSocket session's messages, relayed both ways once both handshakes are done.

Messages flow one at a time per direction: neither side is read before the other has
taken the previous message, so memory is bounded by one message plus the libraries' own
small queues. Close codes and reasons pass through both ways; an upstream that vanishes
closes the client with 1011, a client that vanishes closes the upstream with 1001 (going
away). The gateway ends a session itself with 1009 (a message over the route's
`max_message_size`, either way), 1011 (an internal error, a keepalive ping left
unanswered) or 1001 (shutdown, drain).

The upstream end is a `websockets` asyncio client connection (`_transports.websocket`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Final

import anyio

from ._exceptions import ConnectionReset, ReadTimeout, UpstreamError
from ._transports.websocket import CLOSE_TIMEOUT

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection
    from websockets.exceptions import ConnectionClosed

    from ._telemetry import ClosedBy

__all__ = ["Relay"]

logger = logging.getLogger("asgi_gateway")

#: Close codes that may go on the wire (RFC 6455 7.4; 1004-1006 and 1015 never do).
_SENDABLE_CODES: Final = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


class Relay:
    """Moves messages both ways and decides how each end is closed."""

    __slots__ = (
        "_client_close",
        "_client_gone",
        "_upstream_close",
        "close_code",
        "closed_by",
        "connection",
        "error",
        "limit",
        "receive",
        "send",
        "to_client",
        "to_upstream",
    )

    def __init__(self, connection: ClientConnection, receive: Any, send: Any, limit: int | None) -> None:
        self.connection = connection
        self.receive = receive
        self.send = send
        self.limit = limit
        self.to_upstream = 0
        self.to_client = 0
        self.closed_by: ClosedBy | None = None
        self.close_code: int | None = None
        #: Why the upstream side failed, for outlier detection and the span.
        self.error: UpstreamError | None = None
        self._client_close: tuple[int, str] | None = None
        self._upstream_close: tuple[int, str] = (1001, "")
        self._client_gone = False

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._from_client, tg.cancel_scope)
            tg.start_soon(self._from_upstream, tg.cancel_scope)

    async def _from_client(self, done: anyio.CancelScope) -> None:
        from websockets.exceptions import ConnectionClosed

        receive = self.receive
        connection = self.connection
        limit = self.limit
        try:
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    text = message.get("text")
                    data: str | bytes = text if text is not None else message.get("bytes") or b""
                    if limit is not None and _over(data, limit):
                        self.gateway_ends(1009, f"message over the limit of {limit} bytes", None)
                        break
                    await connection.send(data)
                    self.to_upstream += 1
                elif kind == "websocket.disconnect":
                    self.client_left(message.get("code", 1005), message.get("reason") or "")
                    break
        except ConnectionClosed:
            # The upstream's side sees the same close and tells the client.
            return
        done.cancel()

    async def _from_upstream(self, done: anyio.CancelScope) -> None:
        from websockets.exceptions import ConnectionClosed

        connection = self.connection
        send = self.send
        try:
            while True:
                data = await connection.recv()
                try:
                    if isinstance(data, str):
                        await send({"type": "websocket.send", "text": data})
                    else:
                        await send({"type": "websocket.send", "bytes": data})
                except (OSError, RuntimeError):
                    # Servers following ASGI 2.4 raise OSError from send() once the client is
                    # gone; uvicorn raises RuntimeError once it has closed the connection itself
                    # (a message over its --ws-max-size, a keepalive timeout) and sent the client
                    # its close frame. Either way its disconnect message, with that close code,
                    # reaches the other direction.
                    logger.debug("the server in front refused a WebSocket message", exc_info=True)
                    break
                self.to_client += 1
        except ConnectionClosed as exc:
            self._upstream_closed(exc)
            done.cancel()
            return
        with anyio.move_on_after(CLOSE_TIMEOUT):
            await anyio.sleep_forever()
        # No disconnect came: the server in front failed for a reason of its own.
        self.gateway_ends(1011, "internal error", None)
        done.cancel()

    # -- how it ends -------------------------------------------------------------------

    def client_left(self, code: int, reason: str) -> None:
        if self.closed_by is not None:
            return
        self.closed_by = "client"
        self.close_code = code
        self._client_gone = True
        # 1005/1006 say the client closed without a code or vanished; either way it went away.
        self._upstream_close = (code, reason) if _sendable(code) else (1001, "")

    def gateway_ends(self, code: int, reason: str, error: UpstreamError | None) -> None:
        if self.closed_by is not None:
            return
        self.closed_by = "gateway"
        self.close_code = code
        self.error = error
        self._client_close = (code, reason)
        self._upstream_close = (1001, "")

    def _upstream_closed(self, exc: ConnectionClosed) -> None:
        if self.closed_by is not None:
            return
        rcvd, sent = exc.rcvd, exc.sent
        if sent is not None and (rcvd is None or not exc.rcvd_then_sent):
            # The library ended it during the session: a keepalive ping timeout (1011), a
            # message over max_size (1009) or a protocol error by the upstream.
            code = 1009 if sent.code == 1009 else 1011
            error = ReadTimeout(sent.reason) if sent.code == 1011 else None
            self.gateway_ends(code, sent.reason, error)
            return
        self.closed_by = "upstream"
        if rcvd is None:
            self.close_code = 1011
            self.error = ConnectionReset("the upstream's WebSocket connection was lost")
            self._client_close = (1011, "upstream connection lost")
        else:
            # A close frame without a code (1005) is a normal close.
            code = rcvd.code if _sendable(rcvd.code) else 1000
            self.close_code = code
            self._client_close = (code, rcvd.reason if code == rcvd.code else "")

    async def close(self) -> None:
        """Close both ends as decided (shielded by the caller); bounded in time."""
        code, reason = self._upstream_close
        with anyio.move_on_after(CLOSE_TIMEOUT + 1.0):
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._discard_from_upstream)
                    await self.connection.close(code, reason)
                    tg.cancel_scope.cancel()
            except Exception:
                logger.debug("closing the upstream WebSocket connection failed", exc_info=True)
        if not self._client_gone:
            code, reason = self._client_close or (1001, "")
            await _send_close(self.send, code, reason)

    async def _discard_from_upstream(self) -> None:
        # The upstream's close frame comes after the messages it had sent already: reading
        # (and dropping) them lets it through instead of waiting for the close timeout.
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):
            while True:
                await self.connection.recv()


def _sendable(code: int) -> bool:
    """Whether close `code` may go on the wire: a registered one, or one for applications (3000-4999)."""
    return code in _SENDABLE_CODES or 3000 <= code < 5000


def _over(data: str | bytes, limit: int) -> bool:
    """Whether a message takes more than `limit` bytes on the wire (text: in UTF-8)."""
    size = len(data)
    if size > limit:
        return True
    # A code point takes 1 to 4 bytes in UTF-8, and `isascii()` reads a flag CPython keeps:
    # only non-ASCII text within 4x of the limit is encoded to be measured.
    if isinstance(data, str) and size * 4 > limit and not data.isascii():
        return len(data.encode("utf-8")) > limit
    return False


async def _send_close(send: Any, code: int, reason: str) -> None:
    try:
        await send({"type": "websocket.close", "code": code, "reason": reason})
    except (OSError, RuntimeError):
        # Gone, or closed by the server in front already (uvicorn raises RuntimeError then).
        pass
