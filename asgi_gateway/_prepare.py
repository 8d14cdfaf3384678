"""A request that matched a route, made ready for its upstream: one way for HTTP requests
and WebSocket handshakes alike.

`prepare` is synchronous, so that it costs no coroutine: the upstream headers (hop-by-hop
removed, X-Forwarded-* set), the request id, and the `Exchange` and `Request` the layers
share, with no body yet. The body policy follows for HTTP: only a request that has a body
(or a head over `MAX_HEADER_BYTES`) calls `read_body`, which checks the head's size and
framing first. A WebSocket handshake has none.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Coroutine
from typing import Any, Final

from ._config import UpstreamConfig
from ._exceptions import BadRequest, ClientDisconnected, PayloadTooLarge
from ._proxy import IncomingHeaders, TrustedProxies, make_request_id, sane_request_id, upstream_headers
from ._routing import Route
from ._types import Exchange, Request, RequestBody

__all__ = ["MAX_HEADER_BYTES", "prepare", "read_body"]

ASGIReceive = Any

# Request header blocks larger than this are not forwarded. uvicorn's httptools parser sets no
# limit of its own; 64 KiB is also the largest response head the built-in client accepts.
MAX_HEADER_BYTES: Final = 65536


def prepare(
    scope: dict[str, Any],
    route: Route,
    path: bytes,
    upstream: UpstreamConfig,
    trusted: TrustedProxies,
    *,
    websocket: bool = False,
) -> tuple[Request, IncomingHeaders]:
    """The request to send upstream for `scope`, matched to `route` with upstream path `path`.

    Its body is empty: an HTTP request's is read by `read_body`. Also returns the
    request headers the gateway itself reads.
    """
    client = scope.get("client")
    peer = client[0] if client else None
    if websocket:
        # X-Forwarded-Proto names the HTTP scheme the upgrade came over, as NGINX's $scheme does.
        scheme = "https" if scope.get("scheme") == "wss" else "http"
    else:
        scheme = scope.get("scheme", "http")
    is_trusted = trusted.configured and peer in trusted
    headers, incoming = upstream_headers(
        scope["headers"], client_host=peer, scheme=scheme, trusted=is_trusted
    )
    sent_id = incoming.request_id
    request_id = (
        sent_id.decode("ascii") if sent_id is not None and sane_request_id(sent_id) else make_request_id()
    )
    headers.append((b"x-request-id", request_id.encode()))
    client_ip = trusted.client_address(peer, incoming.forwarded_for) if is_trusted else peer
    query: bytes = scope.get("query_string", b"")
    exchange = Exchange(
        request_id=request_id,
        route=route.path,
        upstream=upstream,
        client_ip=client_ip or "",
        path=path.decode("latin-1"),
        scheme=scheme,
        peer=peer or "",
        host=incoming.host,
    )
    request = Request(
        method="GET" if websocket else scope["method"],
        target=path + b"?" + query if query else path,
        headers=headers,
        body=RequestBody([], None),
        exchange=exchange,
        host=incoming.host if route.preserve_host else None,
    )
    return request, incoming


def _body_length(incoming: IncomingHeaders) -> int | None:
    """The request body's Content-Length (None: none given), once the head is found sound."""
    if incoming.size > MAX_HEADER_BYTES:
        raise BadRequest(f"the request headers are over {MAX_HEADER_BYTES} bytes")
    value = incoming.content_length
    if value is None:
        return None
    if incoming.transfer_encoding is not None:
        # Parsers disagree on which one wins (httptools refuses, h11 takes Transfer-Encoding):
        # the way requests are smuggled past a proxy. Refused rather than guessed.
        raise BadRequest("the request has both Content-Length and Transfer-Encoding")
    if not value.isdigit():
        raise BadRequest("invalid Content-Length")
    return int(value)


def read_body(
    receive: ASGIReceive,
    incoming: IncomingHeaders,
    route: Route,
    upstream: UpstreamConfig,
) -> Coroutine[Any, Any, RequestBody]:
    """The request body, by the body policy: up to `retry.buffer_limit` bytes are kept for
    replay (none when the upstream makes one attempt only and does not hedge) and the rest
    streams; over the
    route's `max_body_size` is `PayloadTooLarge`.

    Raises `BadRequest` at once for a head over `MAX_HEADER_BYTES`, an invalid
    Content-Length, or both Content-Length and Transfer-Encoding. A plain function handing
    back the coroutine that reads the body: no second one to resume.
    """
    length = _body_length(incoming)
    # A body is kept for replay when a retry or a hedge may send it again.
    keep = upstream.retry.buffer_limit if upstream.retry.attempts > 1 or upstream.hedge is not None else 0
    return _read(receive, length=length, keep=keep, limit=route.max_body_size)


async def _read(
    receive: ASGIReceive,
    *,
    length: int | None,
    keep: int,
    limit: int | None,
) -> RequestBody:
    """Up to `keep` bytes are buffered for replay, the rest streams."""
    if length is not None and limit is not None and length > limit:
        raise PayloadTooLarge(f"request body of {length} bytes is over the limit of {limit}")
    if length == 0:
        return RequestBody([], 0)
    chunks: list[bytes] = []
    size = 0
    more = True
    # With nothing to keep for replay, the first message is still read: a small body comes
    # whole in it, and is then sent in one write like any buffered body.
    if length is None or length <= keep or keep == 0:
        while more and size <= keep:
            chunk, more = await _receive_chunk(receive)
            if chunk:
                size = _counted(size, chunk, limit)
                chunks.append(chunk)
        if not more:
            return RequestBody(chunks, size)
    return RequestBody(chunks, length, _stream_rest(receive, size, limit))


async def _stream_rest(receive: ASGIReceive, size: int, limit: int | None) -> AsyncIterator[bytes]:
    more = True
    while more:
        chunk, more = await _receive_chunk(receive)
        if chunk:
            size = _counted(size, chunk, limit)
            yield chunk


async def _receive_chunk(receive: ASGIReceive) -> tuple[bytes, bool]:
    """The next piece of the request body, and whether more follows."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnected()
    return message.get("body", b""), message.get("more_body", False)


def _counted(size: int, chunk: bytes, limit: int | None) -> int:
    size += len(chunk)
    if limit is not None and size > limit:
        raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    return size
