"""The WebSocket handshake's transport: opens a WebSocket connection to `request.server`.

It sits where the HTTP transport sits in an upstream's stack, under the same retry,
failover and telemetry layers (see `_stack.build_stacks`). An upstream that accepts
answers a 101 whose stream is an `UpgradedStream` holding the open connection, handed to
the session's message pump; one that refuses answers its own status and body, which
reach the client. Errors are translated into the gateway's tree, as any transport's.

The client side is the `websockets` library's asyncio client (the optional
`asgi-gateway[websockets]` extra), imported on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import ssl
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote_from_bytes

from .._exceptions import BadRequest, ConnectError, ConnectionReset, InvalidResponse, ReadTimeout
from .._types import BufferedStream, Request, Response, Server, Transport
from .connect import open_socket

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

__all__ = ["CLOSE_TIMEOUT", "MAX_QUEUE", "UpgradedStream", "WebSocketTransport"]

#: Seconds a closing handshake with the upstream may take before its connection is cut.
CLOSE_TIMEOUT: Final = 5.0
#: The handshake headers the library writes itself (Sec-WebSocket-Key, -Version, -Protocol, ...).
_HANDSHAKE_OWN: Final = b"sec-websocket-"
#: Frames from the upstream buffered before the gateway stops reading its socket: with the
#: message in hand and the socket buffers, this bounds what a session holds per direction.
MAX_QUEUE: Final = 4


class UpgradedStream:
    """The "body" of an accepted handshake: the session's upstream connection.

    It has no bytes to iterate. Closing it cuts whatever the session left open (the
    session closes the connection gracefully first).
    """

    __slots__ = ("connection",)

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration

    async def aclose(self) -> None:
        from websockets.protocol import State

        if self.connection.state is not State.CLOSED:
            self.connection.transport.abort()


class WebSocketTransport(Transport):
    """Opens the WebSocket connection of a handshake (`request.upgrade` set) to `request.server`."""

    async def handle_request(self, request: Request) -> Response:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake, InvalidMessage, InvalidStatus, InvalidURI
        from websockets.typing import Subprotocol
        from websockets.uri import parse_uri

        server = request.server
        upgrade = request.upgrade
        assert server is not None, "the failover layer sets request.server"
        assert upgrade is not None, "a WebSocket handshake carries its upgrade"
        secure = server.scheme == "https"
        # The socket goes to the server chosen; the URI only names the Host (the upstream's
        # or, with preserve_host, the client's) and the target, sent as it came.
        target = _ascii(request.target)
        uri = (
            f"{'wss' if secure else 'ws'}://{(request.host or server.host_header).decode('latin-1')}{target}"
        )
        try:
            parsed = parse_uri(uri)
        except (InvalidURI, ValueError) as exc:
            raise BadRequest(f"cannot forward this WebSocket handshake: {exc}") from exc
        path, _, query = target.partition("?")
        tls: dict[str, Any] = {"ssl": _tls_context(), "server_hostname": server.host} if secure else {}
        # A server found by discovery is reached at its address, under its name (Host, SNI).
        sock = await open_socket(server.connect_host, server.port, request.connect_timeout, label=server.url)
        try:
            peer: str | None = str(sock.getpeername()[0])
        except OSError:
            peer = None
        try:
            client = connect(
                uri,
                sock=sock,
                # The library writes the handshake's own headers: the client's, or any a hook
                # added, would go out beside them and contradict them.
                additional_headers=[
                    (name.decode("latin-1"), value.decode("latin-1"))
                    for name, value in request.headers
                    if not name.startswith(_HANDSHAKE_OWN)
                ],
                user_agent_header=None,
                compression=None,
                subprotocols=[Subprotocol(name) for name in upgrade.subprotocols] or None,
                open_timeout=request.read_timeout,
                close_timeout=CLOSE_TIMEOUT,
                max_size=upgrade.max_size,
                max_queue=MAX_QUEUE,
                **tls,
            )
        except BaseException:
            # Not handed over yet: once `client` runs, its transport owns (and closes) the socket.
            sock.close()
            raise
        # The URI parser drops the ";params" of the last path segment; websockets >= 17 reads
        # this attribute, so the target goes out exactly (older versions ignore it).
        client.ws_uri = dataclasses.replace(parsed, path=path, query=query)
        try:
            connection = await client
        except InvalidStatus as exc:
            return _refusal(exc, server, peer)
        except ssl.SSLError as exc:
            # Before ValueError: a certificate that fails verification is both.
            raise ConnectError(f"TLS handshake with {server.url} failed: {exc}") from exc
        except ValueError as exc:
            # With the socket given, a redirect is not followed: it raises, carrying the 3xx.
            if isinstance(exc.__cause__, InvalidStatus):
                return _refusal(exc.__cause__, server, peer)
            raise InvalidResponse(f"WebSocket handshake with {server.url} failed: {exc}") from exc
        except TimeoutError as exc:
            raise ReadTimeout(f"{server.url} did not answer the WebSocket handshake in time") from exc
        except InvalidMessage as exc:
            if isinstance(exc.__cause__, EOFError | OSError):
                raise ConnectionReset(
                    f"{server.url} closed the connection during the WebSocket handshake"
                ) from exc
            raise InvalidResponse(f"invalid WebSocket handshake answer from {server.url}: {exc}") from exc
        except InvalidHandshake as exc:
            raise InvalidResponse(f"invalid WebSocket handshake answer from {server.url}: {exc}") from exc
        except OSError as exc:
            raise ConnectionReset(
                f"connection to {server.url} broke during the WebSocket handshake: {exc}"
            ) from exc
        assert connection.response is not None
        headers = _headers(connection.response.headers)
        return Response(101, headers, UpgradedStream(connection), server=server, peer_address=peer)


def _refusal(exc: Any, server: Server, peer: str | None) -> Response:
    answer = exc.response
    return Response(
        answer.status_code,
        _headers(answer.headers),
        BufferedStream(bytes(answer.body)),
        server=server,
        peer_address=peer,
    )


def _headers(headers: Any) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.raw_items()]


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Made once: loading the system's CA bundle costs milliseconds.
    return ssl.create_default_context()


def _ascii(target: bytes) -> str:
    if target.isascii():
        return target.decode("ascii")
    return quote_from_bytes(target, safe=bytes(range(0x21, 0x7F)))
