"""The gateway's own minimal request and response types, shared by every layer.

Every layer (retry, failover, telemetry) and every transport implements `Handler`:
take a `Request`, return a `Response`. Bodies are async byte iterators, headers are
lists of raw `(name, value)` byte pairs with lower-case names.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from ._config import UpstreamConfig

__all__ = [
    "IDEMPOTENT_METHODS",
    "BufferedStream",
    "Exchange",
    "Handler",
    "Headers",
    "Request",
    "RequestBody",
    "Response",
    "ResponseStream",
    "Server",
    "Transport",
    "WebSocketUpgrade",
    "may_resend",
]

Headers = list[tuple[bytes, bytes]]


class ResponseStream(Protocol):
    """A response body: iterate for chunks, then always `aclose()`."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class BufferedStream:
    """A response body already in memory whole: the relay sends it in one message."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    def take(self) -> bytes:
        """All of the body not read yet (after which it is read)."""
        data = self._data
        self._data = b""
        return data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        data = self.take()
        if not data:
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        self._data = b""


class RequestBody:
    """The request body going upstream.

    A buffered body (`chunks` holds all of it) can be sent any number of times; a
    streamed one only once. `length` is the byte count when known in advance
    (sent as Content-Length), else None (sent chunked).
    """

    __slots__ = ("_ended", "_on_end", "_rest", "chunks", "length", "started")

    def __init__(
        self,
        chunks: list[bytes],
        length: int | None,
        rest: AsyncIterator[bytes] | None = None,
    ) -> None:
        self.chunks = chunks
        self.length = length
        self._rest = rest
        self.started = False
        self._ended = rest is None
        self._on_end: list[Callable[[], object]] | None = None

    def on_end(self, callback: Callable[[], object]) -> None:
        """Call `callback()` once the client's body is no longer being read.

        That is once a streamed body has been read to its end, or given up (an upstream
        that answered early, a failed send); at once for a body read in advance.
        """
        if self._ended:
            callback()
        elif self._on_end is None:
            self._on_end = [callback]
        else:
            self._on_end.append(callback)

    def _end(self) -> None:
        self._ended = True
        callbacks, self._on_end = self._on_end, None
        if callbacks is not None:
            for callback in callbacks:
                callback()

    @property
    def replayable(self) -> bool:
        """Whether the whole body is in `chunks`, so that it can be sent again."""
        return self._rest is None

    @property
    def empty(self) -> bool:
        """Whether there is no body at all."""
        return self._rest is None and not any(self.chunks)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        rest = self._rest
        if rest is None:
            for chunk in self.chunks:
                if chunk:
                    yield chunk
            return
        if self.started:
            raise RuntimeError("a streamed request body cannot be sent twice")
        self.started = True
        try:
            for chunk in self.chunks:
                if chunk:
                    yield chunk
            async for chunk in rest:
                if chunk:
                    yield chunk
        finally:
            try:
                # Given up early, the client's body stops being read here and now, before
                # anything else may receive from the client.
                aclose = getattr(rest, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                self._end()


EMPTY_BODY_CHUNKS: list[bytes] = []


@dataclass(slots=True, eq=False)
class Server:
    """One configured upstream server, with the live state the layers keep on it.

    `url`, `weight` and `backup` come from its `ServerConfig`; `scheme`, `host` and
    `port` are the URL's parts, and `index` its position in the upstream's `servers`.
    `host` is the server's name: the Host header and TLS SNI. `ip` is set when DNS
    discovery found the server: one of the addresses of `host`, which connections go
    to; without it connections go to `host`, resolved when they are made.
    """

    url: str
    scheme: str
    host: str
    port: int
    weight: int = 1
    backup: bool = False
    index: int = 0
    upstream: str = ""
    #: Host header value for this server, e.g. b"127.0.0.1:9001".
    host_header: bytes = b""
    #: Requests in flight now (least_connections reads it).
    in_flight: int = 0
    #: Active health check verdict; True unless checks say otherwise.
    healthy: bool = True
    #: Passive outlier detection: monotonic time until which the server is ejected.
    ejected_until: float = 0.0
    ejections: int = 0
    consecutive_failures: int = 0
    recent_failures: int = 0
    #: The IP address connections go to (DNS discovery); None: `host`.
    ip: str | None = None
    #: Set by `PoolTransport.retire`: gone from its upstream, its connections are no longer kept.
    retired: bool = False
    #: Drained by an operator (`POST {admin.path}/servers/.../drain`): no new requests until enabled.
    drained: bool = False
    #: The last active health check: (result, latency in s, wall-clock time); None before one.
    last_check: tuple[str, float, float] | None = None
    #: Its figures over the last minute (`_admin_stats.ServerStats`), kept only while the
    #: admin endpoints are on; None costs the request path one test.
    stats: Any = None

    @property
    def connect_host(self) -> str:
        """Where connections go: `ip` if known, else `host`."""
        return self.ip or self.host

    @property
    def address(self) -> str:
        """`connect_host:port`, an IPv6 address in brackets: `10.0.0.7:8000`, `[fd00::7]:8000`."""
        host = self.ip or self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def __repr__(self) -> str:
        return f"Server({self.url!r})" if self.ip is None else f"Server({self.url!r}, ip={self.ip!r})"


@dataclass(slots=True, eq=False)
class Exchange:
    """What the layers share about one client request across its attempts."""

    request_id: str
    route: str
    upstream: UpstreamConfig
    client_ip: str
    path: str
    scheme: str
    #: The connection's peer address: the client, or the trusted proxy in front of it
    #: (`client_ip` is the client, after `trusted_proxies`). Empty when the server gave none.
    peer: str = ""
    #: The Host header as the gateway received it (None: the request had none).
    host: bytes | None = None
    #: Servers already tried, in order.
    tried: list[Server] = field(default_factory=list)
    #: Attempts made so far (1 during the first attempt).
    attempts: int = 0
    #: The server span (or None when not traced); layers add events to it.
    span: Any = None
    #: The last server an attempt went to.
    server: Server | None = None
    #: Set by the proxy as soon as the first response byte goes to the client.
    committed: bool = False
    #: The asyncio task relaying this exchange (None off asyncio, or outside the relay).
    task: asyncio.Task[Any] | None = None
    #: The verified token's claims, on a route with `auth` (rate_limit.key claim:NAME reads them).
    claims: dict[str, Any] | None = None
    #: The edge layers' decisions, for the access log: "allowed", "expired", "limited", ...
    auth_result: str | None = None
    rate_limit_result: str | None = None


@dataclass(slots=True, eq=False)
class Request:
    """A request on its way upstream.

    `target` is the raw path and query as they go on the request line. `headers` are
    raw `(name, value)` byte pairs, hop-by-hop headers already removed and the
    gateway's own added; they hold no Host and no framing headers: the transport sends
    `host` when set (preserve_host) or the server's own, and frames `body` itself.
    The failover layer sets `server` for each attempt; `connect_timeout` and
    `read_timeout` are the upstream's `timeouts` for this try. `upgrade` is set on a
    WebSocket handshake: what its transport needs besides. `superseded` is set on a hedged
    try that another try of the same request outran, as it is cancelled.
    """

    method: str
    target: bytes
    headers: Headers
    body: RequestBody
    exchange: Exchange
    host: bytes | None = None
    server: Server | None = None
    connect_timeout: float | None = None
    read_timeout: float | None = None
    upgrade: WebSocketUpgrade | None = None
    superseded: bool = False


@dataclass(frozen=True, slots=True)
class WebSocketUpgrade:
    """A WebSocket handshake's own parameters: the client's subprotocols, the message limit."""

    subprotocols: tuple[str, ...] = ()
    max_size: int | None = None


#: Methods that may reach a server twice without changing the outcome (RFC 9110, 9.2.2).
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def may_resend(request: Request) -> bool:
    """Whether the upstream may see `request` twice: an idempotent method or an Idempotency-Key.

    Anything that sends a request again after it may have reached the server (a transport
    replaying it on a fresh connection, say) must ask this first.
    """
    if request.method in IDEMPOTENT_METHODS:
        return True
    return any(name == b"idempotency-key" for name, _ in request.headers)


CloseCallback = Callable[["Response", "BaseException | None"], None]


@dataclass(slots=True, eq=False)
class Response:
    """A response coming back from upstream. Always `aclose()` it.

    `headers` are raw `(name, value)` byte pairs with lower-case names; `stream` is the
    body, iterated for its chunks after the head has been returned.
    """

    status: int
    headers: Headers
    stream: ResponseStream
    server: Server | None = None
    #: Peer IP address of the connection, when the transport knows it.
    peer_address: str | None = None
    _callbacks: list[CloseCallback] | None = None
    _closed: bool = False

    def on_close(self, callback: CloseCallback) -> None:
        """Run `callback(response, error)` once the response is closed."""
        if self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    async def aclose(self, error: BaseException | None = None) -> None:
        """Release the connection. `error` is why the body was not read to its end, if so."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.stream.aclose()
        finally:
            if self._callbacks is not None:
                for callback in reversed(self._callbacks):
                    callback(self, error)


class Handler(abc.ABC):
    """The one interface every layer and transport implements.

    Each layer (retry, failover, telemetry) wraps the handler below it; a transport is
    the bottom one. `handle_request` returns as soon as the response head is in, with
    the body still to be read from `Response.stream`.
    """

    @abc.abstractmethod
    def handle_request(self, request: Request) -> Awaitable[Response]:
        """Send `request` and return the response head, with its body still to read.

        Raises an `UpstreamError` subclass on failure. An `async def` implements it, and so
        does a plain function that returns the awaitable of the handler below (a layer with
        nothing to do after the inner handler answers keeps no coroutine of its own between
        the relay and the socket). Such a function may raise before returning: a refusal.
        """

    async def aclose(self) -> None:  # noqa: B027 - most layers hold nothing
        """Release whatever the handler holds."""


class Transport(Handler):
    """The bottom of the stack: sends `request` to `request.server` on the wire.

    Pass an instance as `transport=` to `Gateway` or `GatewayMiddleware` to replace the
    built-in HTTP/1.1 client. It must translate its own errors into the gateway's
    exceptions (`ConnectError`, `ConnectTimeout`, `ReadTimeout`, `ConnectionReset`,
    `InvalidResponse`, ...): the retry and failover layers decide on those. It may send
    a request a second time (on a fresh connection, say) only when the method is
    idempotent or the request carries an `Idempotency-Key` header.
    """


class GatewayEvents:
    """Hooks the layers call when something worth telling happens.

    The base class does nothing; the telemetry side overrides these to add span
    events, count metrics and log. Implementations must never raise.
    """

    def retry(self, exchange: Exchange, attempt: int, reason: str, backoff: float) -> None:
        """Attempt number `attempt` (2, 3, …) starts after `backoff` seconds because of `reason`."""

    def retry_budget_exhausted(self, exchange: Exchange, reason: str) -> None:
        """A retry was wanted for `reason` but the retry budget refused it."""

    def hedge(self, exchange: Exchange, attempt: int, delay: float) -> None:
        """Attempt number `attempt` starts beside those still waiting, `delay` seconds after the last."""

    def hedge_result(self, exchange: Exchange, result: str) -> None:
        """A hedged request ended its race: "won" (a hedge answered first), "lost" (the first
        try did) or "skipped_budget" (a hedge was due but the retry budget refused it)."""

    def ejected(self, server: Server, duration: float, exchange: Exchange | None) -> None:
        """Outlier detection ejected `server` for `duration` seconds."""

    def readmitted(self, server: Server) -> None:
        """An ejected server's time is up; it takes traffic again."""

    def health_changed(self, server: Server, healthy: bool) -> None:
        """The active health check changed `server`'s state."""

    def failover(self, exchange: Exchange, group: str) -> None:
        """A request was sent to `group` ("backup" or "panic") instead of the primaries."""

    def available_changed(self, upstream: str, available: int) -> None:
        """The number of servers available for `upstream` changed."""


NULL_EVENTS = GatewayEvents()
