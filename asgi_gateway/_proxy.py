"""The ASGI ⇄ upstream relay and the header rules."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Coroutine, Iterable
from typing import Any, Final

import anyio

from ._edge.ip_rules import AddressSet
from ._exceptions import ClientDisconnected, GatewayError, UpstreamError, error_response
from ._loop import CoarseTimer, coarse_timers, running_task
from ._types import BufferedStream, Handler, Headers, Request

__all__ = ["ClientDisconnected", "TrustedProxies", "relay"]

logger = logging.getLogger("asgi_gateway")

ASGIScope = dict[str, Any]
ASGIReceive = Any
ASGISend = Any

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by the gateway itself on the way up: whatever the client sent under these names is replaced.
# Expect is answered by the server in front of us, which then reads the body for us.
_REPLACED_UP: Final = HOP_BY_HOP | {b"host", b"content-length", b"x-request-id", b"expect"}
_FORWARDED_UP: Final = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"}
)
# The server in front of the gateway always adds its own Date; two would be invalid.
_REPLACED_DOWN: Final = HOP_BY_HOP | {b"x-request-id", b"date"}
_REQUEST_ID_CHARS: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:+=/")
# Statuses whose responses never have a body (RFC 9110 6.4.1).
_BODILESS: Final = frozenset({*range(100, 200), 204, 304})


_ids = random.Random()
# Forked workers must not share a sequence of request ids.
os.register_at_fork(after_in_child=_ids.seed)


class TrustedProxies(AddressSet):
    """Addresses whose X-Forwarded-* headers are believed, parsed once; "*" trusts every peer."""

    __slots__ = ("always", "configured")

    def __init__(self, specs: Iterable[str]) -> None:
        specs = list(specs)
        self.always = "*" in specs
        super().__init__(spec for spec in specs if spec != "*")
        #: Whether any peer is trusted: a plain attribute, read on every request.
        self.configured = self.always or bool(self.hosts) or bool(self.networks)

    def __bool__(self) -> bool:
        return self.configured

    def __contains__(self, host: object) -> bool:
        if not isinstance(host, str):
            return False
        if self.always or host in self.hosts:
            return True
        # Most peers are not proxies: no address is parsed unless there are networks to check.
        return bool(self.networks) and super().__contains__(host)

    def client_address(self, peer: str | None, forwarded_for: bytes | None) -> str | None:
        """The first address, from the right of the chain, that is not a trusted proxy."""
        if forwarded_for is None or peer not in self:
            return peer
        hops = [hop.strip() for hop in forwarded_for.decode("latin-1").split(",")]
        for hop in reversed(hops):
            if hop and hop not in self:
                return hop
        return hops[0] or peer


def make_request_id() -> str:
    # An identifier, not a secret: no system call per request.
    return _ids.getrandbits(128).to_bytes(16).hex()


def sane_request_id(value: bytes) -> bool:
    return 0 < len(value) <= 128 and all(c in _REQUEST_ID_CHARS for c in value)


def _connection_tokens(value: bytes) -> set[bytes]:
    if value in _PLAIN_CONNECTION:
        # The usual values name no header beyond those always removed.
        return set()
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


_PLAIN_CONNECTION: Final = frozenset(
    {b"keep-alive", b"close", b"Keep-Alive", b"Close", b"upgrade", b"Upgrade"}
)


class IncomingHeaders:
    """The request headers the gateway itself reads."""

    __slots__ = ("content_length", "forwarded_for", "host", "request_id", "size", "transfer_encoding")

    def __init__(
        self,
        host: bytes | None = None,
        content_length: bytes | None = None,
        transfer_encoding: bytes | None = None,
        request_id: bytes | None = None,
        forwarded_for: bytes | None = None,
        size: int = 0,
    ) -> None:
        self.host = host
        self.content_length = content_length
        self.transfer_encoding = transfer_encoding
        self.request_id = request_id
        self.forwarded_for = forwarded_for
        #: Bytes of all request header names and values, to refuse oversized sets.
        self.size = size


def upstream_headers(
    scope_headers: Iterable[tuple[bytes, bytes]],
    *,
    client_host: str | None,
    scheme: str,
    trusted: bool,
) -> tuple[Headers, IncomingHeaders]:
    """Headers to send upstream (X-Request-Id still to add), and the ones the gateway reads.

    Hop-by-hop headers and those named in Connection go; the gateway's own headers are
    added after that, so no header can name them away.
    """
    host = content_length = transfer_encoding = request_id_in = forwarded_for = None
    forwarded_proto = forwarded_host = None
    dropped: set[bytes] | None = None
    kept: Headers = []
    size = 0
    for name, value in scope_headers:
        size += len(name) + len(value)
        if name in _REPLACED_UP or name in _FORWARDED_UP:
            if name == b"host":
                host = value
            elif name == b"content-length":
                content_length = value
            elif name == b"transfer-encoding":
                transfer_encoding = value
            elif name == b"connection":
                dropped = (
                    _connection_tokens(value) if dropped is None else dropped | _connection_tokens(value)
                )
            elif name == b"x-request-id":
                request_id_in = value
            elif name == b"x-forwarded-for":
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            elif name == b"x-forwarded-proto":
                forwarded_proto = value
            elif name == b"x-forwarded-host":
                forwarded_host = value
            elif trusted:
                # Forwarded and X-Real-IP name the client too: an upstream that believes them
                # must only ever see a trusted proxy's, as with X-Forwarded-*.
                kept.append((name, value))
            continue
        kept.append((name, value))
    if dropped:
        kept = [(name, value) for name, value in kept if name not in dropped]
    client = client_host.encode("latin-1") if client_host else b"unknown"
    if trusted and forwarded_for:
        kept.append((b"x-forwarded-for", forwarded_for + b", " + client))
    else:
        kept.append((b"x-forwarded-for", client))
    kept.append((b"x-forwarded-proto", forwarded_proto if trusted and forwarded_proto else scheme.encode()))
    forwarded_host = forwarded_host if trusted and forwarded_host else host
    if forwarded_host:
        kept.append((b"x-forwarded-host", forwarded_host))
    incoming = IncomingHeaders(host, content_length, transfer_encoding, request_id_in, forwarded_for, size)
    return kept, incoming


def downstream_headers(headers: Headers, request_id: bytes) -> Headers:
    """Headers to send to the client: hop-by-hop removed, our X-Request-Id added."""
    out = [pair for pair in headers if pair[0] not in _REPLACED_DOWN]
    if len(out) != len(headers):
        # Something went: a Connection header among it may name more to drop.
        dropped: set[bytes] = set()
        for name, value in headers:
            if name == b"connection":
                dropped |= _connection_tokens(value)
        if dropped:
            out = [(name, value) for name, value in out if name not in dropped]
    out.append((b"x-request-id", request_id))
    return out


async def send_error(send: ASGISend, exc: GatewayError, request_id: str, *, close: bool = False) -> int:
    status, headers, body = error_response(exc, request_id)
    if close:
        # ASGI servers (uvicorn's both parsers) close the connection after this response.
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return status


def relay(
    handler: Handler,
    request: Request,
    receive: ASGIReceive,
    send: ASGISend,
    body_done: bool,
) -> Coroutine[Any, Any, tuple[int, BaseException | None]]:
    """Send `request` through `handler` and stream the answer to the client.

    Returns the status the client saw and the error that cut the exchange short,
    if any. An upstream that fails after the response started leaves the client's
    response incomplete, so the server closes the connection: a truncated body is
    never passed off as complete. `body_done` tells that the request body has been
    read already; else the client's disconnect is watched for once it has.

    A plain function handing back the coroutine that does the work: on asyncio that is
    the one coroutine between the server and the upstream socket, resumed at each
    wake-up of the exchange.
    """
    task = running_task()
    watch = _Watch(receive, task)
    if body_done:
        watch.arm()
    else:
        request.body.on_end(watch.arm)
    if task is None:
        return watch.around(handler, request, send)
    request.exchange.task = task
    return _relay(handler, request, send, watch)


class _Watch:
    """Waits for the client's disconnect and then cancels the exchange.

    With the request body read, the only message left to receive is the disconnect;
    waiting for it lets a client that leaves cancel the upstream request at any point.
    (Servers do not tell from send(): uvicorn's returns quietly once the client is gone.)
    A body still streaming up is the transport's to receive until it ends: `arm()` says
    that receive() is the watch's from now on.

    On asyncio (`task` given) the watch is a receive() future started only `_WATCH_DELAY`
    after arming, which cancels the task: most exchanges are over before, and never pay
    for it. Elsewhere it is a task beside the relay (`around`) that cancels their scope.
    """

    __slots__ = ("_armed", "closing", "disconnected", "receive", "stopped", "task", "timer", "waiter")

    def __init__(self, receive: ASGIReceive, task: asyncio.Task[Any] | None) -> None:
        self.receive = receive
        self.task = task
        self.waiter: asyncio.Future[Any] | None = None
        self.timer: CoarseTimer | None = None
        self._armed = anyio.Event() if task is None else None
        self.disconnected = False
        #: Set while the response is being closed: that must not be interrupted.
        self.closing = False
        self.stopped = False

    def arm(self) -> None:
        """Start watching (soon, on asyncio): receive() is ours from now on."""
        if self.stopped:
            return
        task = self.task
        if task is None:
            assert self._armed is not None
            self._armed.set()
        else:
            loop = task.get_loop()
            self.timer = coarse_timers(loop).call_at(loop.time() + _WATCH_DELAY, self._start)

    def _start(self) -> None:
        assert self.task is not None
        self.waiter = asyncio.ensure_future(self.receive(), loop=self.task.get_loop())
        self.waiter.add_done_callback(self._received)

    def _received(self, waiter: asyncio.Future[Any]) -> None:
        if waiter.cancelled() or waiter.exception() is not None:
            return
        if waiter.result()["type"] != "http.disconnect":
            # The request's own (empty) body message; the disconnect comes next.
            self._start()
        elif not self.closing:
            self.disconnected = True
            assert self.task is not None
            self.task.cancel()

    def cancelled_the_task(self) -> bool:
        """On a CancelledError: whether it is this watch's, which is then taken back."""
        return self.disconnected and self.task is not None and self.task.uncancel() == 0

    def stop(self) -> None:
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.remove_done_callback(self._received)
            waiter.cancel()

    async def around(
        self, handler: Handler, request: Request, send: ASGISend
    ) -> tuple[int, BaseException | None]:
        """The relay, with this watch beside it in a task of its own (off asyncio)."""
        outcome: tuple[int, BaseException | None] = (499, None)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._wait, tg.cancel_scope)
            outcome = await _relay(handler, request, send, self)
            tg.cancel_scope.cancel()
        if self.disconnected and outcome[0] == 499:
            return 499, ClientDisconnected()
        # Servers report a disconnect once the response is complete (uvicorn does at
        # once): only one that cut the exchange short counts.
        return outcome

    async def _wait(self, scope: anyio.CancelScope) -> None:
        assert self._armed is not None
        await self._armed.wait()
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                if not self.closing:
                    self.disconnected = True
                    scope.cancel()
                return


# Most exchanges end sooner than this, even under load: they never pay for a task watching
# the client. A client that left earlier is noticed this late at worst.
_WATCH_DELAY: Final = 0.05


async def _relay(
    handler: Handler, request: Request, send: ASGISend, watch: _Watch
) -> tuple[int, BaseException | None]:
    # One coroutine from the request to the last body byte: every coroutine between the
    # server and the socket is resumed at each wake-up of the exchange.
    exchange = request.exchange
    try:
        try:
            response = await handler.handle_request(request)
        except GatewayError as exc:
            if isinstance(exc, UpstreamError):
                # The access log carries the outcome; this adds the detail for debugging.
                logger.debug(
                    "upstream failed: %s",
                    exc.detail or exc.code,
                    extra={"request_id": exchange.request_id, "upstream": exchange.upstream.name},
                )
            return await send_error(send, exc, exchange.request_id), exc
        except ClientDisconnected as exc:
            return 499, exc
        error: BaseException | None = None
        try:
            status = response.status
            headers = downstream_headers(response.headers, exchange.request_id.encode())
            if status in _BODILESS:
                # RFC 9110 allows a 304 the Content-Length of the body it stands for, but
                # servers in front count it against the (empty) body sent: uvicorn's httptools
                # protocol fails the response and drops the connection. These have no body.
                headers = [pair for pair in headers if pair[0] != b"content-length"]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            exchange.committed = True
            stream = response.stream
            if status in _BODILESS or request.method == "HEAD":
                # Whatever an upstream sends after such a head is not a body (RFC 9112 6.3).
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            elif type(stream) is BufferedStream:
                # The whole body is here already: one message, not a chunk and then the end.
                await send({"type": "http.response.body", "body": stream.take(), "more_body": False})
            else:
                async for chunk in stream:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except UpstreamError as exc:
            logger.warning(
                "upstream response broke off: %s",
                exc.detail or exc.code,
                extra={"request_id": exchange.request_id, "upstream": exchange.upstream.name},
            )
            error = exc
        except OSError as exc:
            # Servers following ASGI 2.4 raise OSError from send() once the client is gone.
            error = ClientDisconnected(str(exc))
        except BaseException as exc:
            error = exc
            raise
        finally:
            watch.closing = True
            if error is None or isinstance(error, Exception):
                await response.aclose(error)
            else:
                # Cancelled: the connection must still be released, whatever cancels us next.
                with anyio.CancelScope(shield=True):
                    await response.aclose(error)
        return response.status, error
    except asyncio.CancelledError:
        if watch.cancelled_the_task():
            return 499, ClientDisconnected()
        raise
    finally:
        watch.stop()
