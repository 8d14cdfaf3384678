"""The adapter that sends the gateway's requests through any httpx client or transport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Final

import httpx

from .._exceptions import (
    BadGateway,
    ConnectError,
    ConnectionReset,
    ConnectTimeout,
    InvalidResponse,
    PoolTimeout,
    ReadTimeout,
    UpstreamError,
)
from .._types import Request, Response, Transport
from .http11 import _MAX_HEAD

__all__ = ["HttpxTransport", "map_httpx_error"]

# Statuses whose responses never have a body (RFC 9112 6.3).
_BODILESS: Final = frozenset({*range(100, 200), 204, 304})


class _NoCookies(httpx.Cookies):
    """A cookie jar that never stores anything: one user's cookies must not reach another."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


def map_httpx_error(exc: httpx.TransportError) -> UpstreamError:
    """Translate an httpx transport error into the gateway's tree."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.PoolTimeout):
        return PoolTimeout(detail)
    if isinstance(exc, httpx.ConnectTimeout):
        return ConnectTimeout(detail)
    if isinstance(exc, httpx.TimeoutException):
        return ReadTimeout(detail)
    if isinstance(exc, httpx.ConnectError):
        return ConnectError(detail)
    if isinstance(exc, httpx.RemoteProtocolError):
        if "without sending" in detail or "peer closed" in detail.lower():
            return ConnectionReset(detail)
        return InvalidResponse(detail)
    if isinstance(exc, httpx.ReadError | httpx.WriteError | httpx.CloseError):
        return ConnectionReset(detail)
    if isinstance(exc, httpx.ProtocolError):
        return InvalidResponse(detail)
    return BadGateway(detail)


class _Stream:
    __slots__ = ("_bodiless", "_first", "_raw", "_response")

    def __init__(self, response: httpx.Response, bodiless: bool) -> None:
        self._response = response
        self._bodiless = bodiless
        self._raw = response.aiter_raw()
        #: The body's first bytes when they were read before the head was handed on (`first`).
        self._first = b""

    async def first(self) -> None:
        """Read the body's first bytes now: a server that closes between its head and its body
        then fails the attempt while it can still be retried (as the built-in client does)."""
        try:
            self._first = await self._raw.__anext__()
        except StopAsyncIteration:
            pass
        except httpx.TransportError as exc:
            await self._response.aclose()
            raise map_httpx_error(exc) from exc

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        if self._first:
            first, self._first = self._first, b""
            yield first
        try:
            async for chunk in self._raw:
                yield chunk
        except httpx.TransportError as exc:
            raise map_httpx_error(exc) from exc

    async def aclose(self) -> None:
        response = self._response
        if self._bodiless and not response.is_stream_consumed:
            # Closed unread, httpcore would drop the connection; reading the end of a response
            # that has no body takes no I/O and keeps it.
            try:
                async for _ in response.aiter_raw():
                    pass
            except httpx.TransportError:
                pass
        await response.aclose()


class HttpxTransport(Transport):
    """Sends requests through an `httpx.AsyncClient` or `httpx.AsyncBaseTransport`.

    Use it for HTTP/2, custom TLS or test doubles. A client passed in belongs to
    the caller, who closes it; one made here is closed by `aclose()`. Its cookie jar is
    replaced by one that stores nothing.
    """

    def __init__(self, client: httpx.AsyncClient | httpx.AsyncBaseTransport | None = None) -> None:
        self._owned = not isinstance(client, httpx.AsyncClient)
        if isinstance(client, httpx.AsyncClient):
            self._client = client
        else:
            self._client = httpx.AsyncClient(
                transport=client,
                timeout=None,
                follow_redirects=False,
                trust_env=False,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
            )
        self._client._cookies = _NoCookies()

    async def handle_request(self, request: Request) -> Response:
        server = request.server
        assert server is not None, "the failover layer sets request.server"
        # A server found by discovery is reached at its address, under its name (Host, SNI).
        url = httpx.URL(scheme=server.scheme, host=server.ip or server.host, port=server.port)
        headers = [(b"host", request.host or server.host_header), *request.headers]
        body = request.body
        if body.length is not None:
            headers.append((b"content-length", str(body.length).encode()))
        elif not body.empty:
            headers.append((b"transfer-encoding", b"chunked"))
        read = request.read_timeout
        timeout = httpx.Timeout(
            connect=request.connect_timeout, read=read, write=read, pool=request.connect_timeout
        )
        extensions: dict[str, Any] = {"timeout": timeout.as_dict()}
        if server.ip is not None and server.scheme == "https":
            extensions["sni_hostname"] = server.host
        http_request = httpx.Request(
            request.method,
            url.copy_with(raw_path=request.target),
            headers=headers,
            content=None if body.empty else body,
            extensions=extensions,
        )
        # httpx computes its own framing headers from `content`; ours are the truth.
        http_request.headers = httpx.Headers(headers)
        try:
            response = await self._client.send(http_request, stream=True)
        except httpx.TransportError as exc:
            raise map_httpx_error(exc) from exc
        headers = []
        size = 0
        for name, value in response.headers.raw:
            size += len(name) + len(value) + 4
            headers.append((name.lower(), value))
        if size > _MAX_HEAD:
            await response.aclose()
            raise InvalidResponse(f"response head from {server.url} is too large")
        network = response.extensions.get("network_stream")
        peer = None
        if network is not None:
            address = network.get_extra_info("server_addr")
            if isinstance(address, tuple):
                peer = str(address[0])
        bodiless = request.method == "HEAD" or response.status_code in _BODILESS
        stream = _Stream(response, bodiless)
        # A Content-Length body's first bytes are awaited (chunked ones may be streams whose
        # first bytes come much later): see HTTP11Connection.send.
        if (
            not bodiless
            and "transfer-encoding" not in response.headers
            and response.headers.get("content-length", "0") not in ("", "0")
        ):
            await stream.first()
        return Response(
            status=response.status_code, headers=headers, stream=stream, server=server, peer_address=peer
        )

    async def aclose(self) -> None:
        if self._owned:
            await self._client.aclose()
