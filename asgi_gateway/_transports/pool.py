"""The gateway's own keep-alive HTTP/1.1 client: which connection serves a request.

`PoolTransport` keeps one `_HostPool` per origin, (scheme, host, port) and the address
connected to (a server found by DNS discovery connects to its IP, with the name as Host and
SNI): its idle connections, most recently used first, and the requests waiting for a free one
when `max_connections_per_host` are busy. A request takes an idle connection, or opens one (`connect`'s TCP connect,
then TLS), or waits its turn; the exchange itself is `http11.HTTP11Connection`'s. When a reused
keep-alive connection fails before any answer, the pool sends the request once more on a new one.
A pool whose servers are all retired (removed by discovery or a reload) keeps no connection:
its idle ones close at once, each busy one as its exchange ends.

asyncio only: under trio the gateway uses the httpx adapter instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from time import monotonic
from types import TracebackType
from typing import Any

from .._exceptions import ConnectError, ConnectionReset, PoolTimeout
from .._types import Request, Response, Server, Transport, may_resend
from .connect import connect_errors, connect_socket
from .http11 import HTTP11Connection, _expire, encode_head, framing

__all__ = ["PoolTransport"]

#: (scheme, host, port, ip): the name (Host, SNI) and the address connected to (None: the name).
_Key = tuple[str, str, int, str | None]


class _State(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


class _HostPool:
    """The connections to one origin: (scheme, host, port) and the address connected to.

    `users` are the live servers that have sent through it; once `retire` has taken the last
    of them away the pool is `retired`: it keeps no connection idle and reuses none, though
    an exchange still in flight ends normally and a request that still comes for a retired
    server gets a connection of its own.
    """

    __slots__ = (
        "closed",
        "connections",
        "count",
        "host",
        "idle",
        "idle_timeout",
        "key",
        "label",
        "max_connections",
        "max_idle",
        "on_empty",
        "port",
        "retired",
        "server_hostname",
        "ssl",
        "users",
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
        self.key = _key(server)
        self.host = server.connect_host
        self.port = server.port
        self.label = f"{server.scheme}://{server.host}:{server.port}"
        if server.ip is not None:
            self.label = f"{self.label} ({server.address})"
        self.ssl = ssl_context
        # The name, also when connecting to an address of it.
        self.server_hostname = server.host if ssl_context is not None else None
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.closed = False
        self.retired = False
        self.users: set[Server] = set()
        #: Called once a retired pool's last connection has closed.
        self.on_empty: Callable[[_HostPool], None] | None = None
        #: Open connections, plus those being opened and slots promised to a waiter.
        self.count = 0
        self.connections: set[HTTP11Connection] = set()
        #: Idle connections, most recently used last.
        self.idle: deque[HTTP11Connection] = deque()
        #: Requests waiting for a free connection. Each is handed a connection, True (a slot is
        #: reserved for it: open one) or False (timed out, or the pool closed).
        self.waiters: deque[asyncio.Future[HTTP11Connection | bool]] = deque()

    def take_idle(self, now: float) -> HTTP11Connection | None:
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

    async def acquire(self, connect_timeout: float | None, *, fresh: bool = False) -> HTTP11Connection:
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
    ) -> HTTP11Connection | None:
        """Wait for a connection handed over (returned) or a reserved slot (None)."""
        waiter: asyncio.Future[HTTP11Connection | bool] = loop.create_future()
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
        assert isinstance(result, HTTP11Connection)
        return result

    def _forget(self, waiter: asyncio.Future[HTTP11Connection | bool]) -> None:
        # A waker may have dropped it already, seeing it done.
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)

    def _give_back(self, handed: HTTP11Connection | bool) -> None:
        if handed is True:
            self._free_slot()
        elif isinstance(handed, HTTP11Connection):
            self.release(handed)

    async def _open(
        self, loop: asyncio.AbstractEventLoop, deadline: float | None, connect_timeout: float | None
    ) -> HTTP11Connection:
        """Connect, in a slot already counted in `self.count`."""
        conn = HTTP11Connection(self, loop, tls=self.ssl is not None)
        # Known from the start, so that however it ends, closing it frees the slot once.
        self.connections.add(conn)
        try:
            with connect_errors(self.label, connect_timeout):
                async with asyncio.timeout_at(deadline):
                    sock = await connect_socket(loop, self.host, self.port)
                    try:
                        await loop.create_connection(
                            lambda: conn, sock=sock, ssl=self.ssl, server_hostname=self.server_hostname
                        )
                    except BaseException:
                        # A socket no transport took is still ours to close; closing one the loop
                        # did take is harmless for plain TCP (asyncio's close is idempotent, uvloop
                        # detaches it on failure). With TLS the loop owns it from the start of the
                        # handshake, before `conn` hears of its transport.
                        if not conn.opened and self.ssl is None:
                            sock.close()
                        raise
        except BaseException:
            conn.close()
            raise
        if self.closed:
            conn.close()
            raise ConnectError(f"the connection pool for {self.label} is closed")
        if conn.closed:
            raise ConnectError(f"{self.label} closed the connection as soon as it was opened")
        return conn

    def after_failure(
        self, conn: HTTP11Connection, error: BaseException, request: Request
    ) -> Coroutine[Any, Any, Response] | None:
        """Whether a request that failed on `conn` goes once more, on a new connection.

        A reused keep-alive connection that the server had closed is most likely why it failed
        at once, so the request goes again, as Go's net/http does: only when it can be sent
        again, and only if the server may see it twice (it may also have died handling it).
        """
        body = request.body
        if (
            isinstance(error, ConnectionReset)
            and conn.reused
            and not conn.received
            and (body.replayable or not body.started)
            and may_resend(request)
        ):
            return self._send_fresh(request)
        return None

    async def _send_fresh(self, request: Request) -> Response:
        body = request.body
        length, chunked = framing(request.method, body)
        message = encode_head(request, length, chunked, body.chunks) if body.replayable else None
        conn = await self.acquire(request.connect_timeout, fresh=True)
        return await conn.send(request, message, length, chunked)

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

    def release(self, conn: HTTP11Connection) -> None:
        """Take back a connection whose exchange ended cleanly."""
        if self.closed or self.retired:
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

    def discard(self, conn: HTTP11Connection) -> None:
        """`conn` is closed: forget it and free its slot."""
        if conn.idle:
            conn.idle = False
            self.idle.remove(conn)
        if conn in self.connections:
            self.connections.remove(conn)
            self._free_slot()
            if self.retired and not self.connections and self.on_empty is not None:
                self.on_empty(self)

    def retire(self) -> None:
        """No connection is kept from now on: idle ones close now, busy ones when released."""
        self.retired = True
        idle = self.idle
        while idle:
            conn = idle.pop()
            conn.idle = False
            conn.close()
        if not self.connections and self.on_empty is not None:
            self.on_empty(self)

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
        #: The live pool of each origin.
        self._pools: dict[_Key, _HostPool] = {}
        #: Each live server's pool, found without building its origin key.
        self._by_server: dict[Server, _HostPool] = {}
        #: Retired pools whose last connections are still busy.
        self._draining: set[_HostPool] = set()
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
        """Open connections to `server`'s origin, idle or busy, draining ones included."""
        key = _key(server)
        pools = [pool for pool in self._draining if pool.key == key]
        live = self._pools.get(key)
        if live is not None:
            pools.append(live)
        return sum(len(pool.connections) for pool in pools)

    def idle_count(self, server: Server) -> int:
        """Idle connections to `server`'s origin, ready for the next request."""
        pool = self._pools.get(_key(server))
        return 0 if pool is None else len(pool.idle)

    def retire(self, servers: Iterable[Server]) -> None:
        """`servers` are gone from their upstreams (discovery, a reload): stop keeping their connections.

        A pool is shared by every `Server` object with the same origin (scheme, host, port
        and address), and counts the live ones that have sent through it: it retires once
        the last of them is retired here, so two upstreams (or an old and a new config)
        pointing at the same origin keep the pool until both are done with it. A retired
        pool closes its idle connections now and each busy one when its exchange ends, and
        hands out no connection again; the next server of that origin gets a fresh pool.
        Each server is marked `retired`: a request that still comes for it (a retry under
        a config just replaced) is served on a connection of its own, closed afterwards.
        Callers pass each server they drop, once; one this transport never saw is fine.
        """
        for server in servers:
            server.retired = True
            pool = self._by_server.pop(server, None)
            if pool is None:
                continue
            pool.users.discard(server)
            if pool.users or pool.retired:
                continue
            if self._pools.get(pool.key) is pool:
                del self._pools[pool.key]
            self._draining.add(pool)
            pool.retire()

    def _drained(self, pool: _HostPool) -> None:
        self._draining.discard(pool)

    def _pool(self, server: Server) -> _HostPool:
        if self._state is not _State.OPENED:
            if self._state is _State.CLOSED:
                raise RuntimeError("Cannot send a request, as the transport has been closed.")
            self._state = _State.OPENED
        if server.retired:
            # Not pooled: its own pool, retired from the start, gone with its connection.
            pool = self._new_pool(server)
            self._draining.add(pool)
            pool.retired = True
            return pool
        key = _key(server)
        live = self._pools.get(key)
        if live is None:
            live = self._pools[key] = self._new_pool(server)
        live.users.add(server)
        self._by_server[server] = live
        return live

    def _new_pool(self, server: Server) -> _HostPool:
        context = None
        if server.scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
                self._ssl_context.set_alpn_protocols(["http/1.1"])
            context = self._ssl_context
        pool = _HostPool(server, context, self._max_connections, self._max_idle, self._idle_timeout)
        pool.on_empty = self._drained
        return pool

    def handle_request(self, request: Request) -> Coroutine[Any, Any, Response]:
        server = request.server
        if server is None:
            raise RuntimeError("request.server must be set before the transport sends it")
        pool = self._by_server.get(server)
        if pool is None:
            pool = self._pool(server)
        body = request.body
        length, chunked = framing(request.method, body)
        # A buffered body goes out with its head in one write; a streamed one follows it. Encoded
        # before a connection is taken: a request that cannot be encoded takes none.
        message = encode_head(request, length, chunked, body.chunks) if body.replayable else None
        conn = pool.take_idle(monotonic())
        if conn is None:
            return self._send_when_connected(pool, request, message, length, chunked)
        # The usual case: the request runs in the connection's own coroutine, none of the pool's around it.
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
        pools = [*self._pools.values(), *self._draining]
        self._pools.clear()
        self._by_server.clear()
        self._draining.clear()
        for pool in pools:
            pool.close()


def _key(server: Server) -> _Key:
    return (server.scheme, server.host, server.port, server.ip)
