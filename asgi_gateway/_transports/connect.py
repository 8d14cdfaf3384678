"""Opening a TCP connection to an upstream server: the one place a connect is made and its errors named.

`open_socket` gives a connected, non-blocking socket, for whoever speaks over it next (the pool's
HTTP/1.1 protocol, through `loop.create_connection(..., sock=sock)`; a WebSocket client). A
failure here never reached the upstream: it is a `ConnectError`, or a `ConnectTimeout` past the
connect timeout, either safe to try on another server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator, Sequence
from typing import Any

from .._exceptions import ConnectError, ConnectTimeout

__all__ = ["connect_errors", "connect_socket", "open_socket"]

_AddrInfo = Sequence[tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]]


async def open_socket(
    host: str, port: int, connect_timeout: float | None, *, label: str | None = None
) -> socket.socket:
    """A TCP connection to `host`:`port` within `connect_timeout` seconds (None: no limit).

    `label` names the server in error messages (default `host:port`). asyncio only.
    """
    loop = asyncio.get_running_loop()
    with connect_errors(label or f"{host}:{port}", connect_timeout):
        async with asyncio.timeout(connect_timeout):
            return await connect_socket(loop, host, port)


@contextlib.contextmanager
def connect_errors(label: str, connect_timeout: float | None) -> Iterator[None]:
    """Name a failed connect (a TLS handshake included) `ConnectTimeout` or `ConnectError`."""
    try:
        yield
    except TimeoutError:
        # Before OSError, which it also is.
        raise ConnectTimeout(f"connecting to {label} took over {connect_timeout}s") from None
    except OSError as exc:
        raise ConnectError(f"cannot connect to {label}: {exc}") from exc


async def connect_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """Try each address of `host` in turn, as `loop.create_connection` does; OSError if none answers.

    No deadline of its own, and failures are plain OSErrors: see `open_socket`.
    """
    infos = _numeric_address(host, port)
    if infos is None:
        # The stdlib loop sends every getaddrinfo to a thread; an IP literal needs none.
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError("getaddrinfo() returned empty list")
    errors: list[OSError] = []
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    # Worded as asyncio's own create_connection words it.
    if len(errors) == 1 or all(str(exc) == str(errors[0]) for exc in errors):
        raise errors[0]
    raise OSError("Multiple exceptions: {}".format(", ".join(str(exc) for exc in errors)))


def _numeric_address(host: str, port: int) -> _AddrInfo | None:
    """The address of an IP literal, found without a resolver; None for a name."""
    try:
        return socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        )
    except (socket.gaierror, UnicodeError):
        return None
