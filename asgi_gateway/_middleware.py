"""`GatewayMiddleware` and the standalone `Gateway` ASGI app."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import anyio.abc

from ._admin_stats import AdminRecords
from ._config import GatewayConfig, load_with_digest
from ._edge.services import EdgeServices
from ._exceptions import BadRequest, ClientDisconnected, ConfigError, GatewayError, NotFound
from ._hosting import freeze_heap, hoist, refreeze_heap
from ._layers.transform import Hooks
from ._prepare import MAX_HEADER_BYTES, prepare, read_body
from ._proxy import make_request_id, relay, sane_request_id, send_error
from ._routing import Router
from ._stack import UpstreamStack
from ._state import GatewayState, build_state, removed_servers
from ._telemetry import Telemetry
from ._transports.auto import AutoTransport, UserTransport
from ._transports.websocket import CLOSE_TIMEOUT
from ._types import Handler

__all__ = ["Gateway", "GatewayMiddleware"]

logger = logging.getLogger("asgi_gateway")

ASGIApp = Any
#: Seconds without a reload after which a frozen heap is collected and frozen again.
_REFREEZE_AFTER = 1.0
Scope = dict[str, Any]
ConfigSource = GatewayConfig | Mapping[str, Any] | str | os.PathLike[str]


class Gateway:
    """The gateway as an ASGI app: forwards matching requests, answers 404 to the rest.

    Mount it (`app.mount("/", gateway)`) with `FastAPI(lifespan=gateway.lifespan)`, or
    wrap an app with `GatewayMiddleware`, which sends the rest to that app instead.
    Served on its own (`uvicorn module:gateway`), it handles the ASGI lifespan itself.

    Args:
        config: A mapping, a path to a `.toml`/`.yaml`/`.yml`/`.json` file or a
            `GatewayConfig`; validated here.
        tracer_provider: The OpenTelemetry tracer provider for the gateway's spans
            (default: the global one; the gateway never sets it).
        meter_provider: The OpenTelemetry meter provider for its metrics (default: the
            global one).
        transport: An `httpx.AsyncClient` or `httpx.AsyncBaseTransport` (or a `Transport`
            of your own) used instead of the built-in HTTP/1.1 client: HTTP/2, custom TLS,
            test doubles. A client passed in stays yours to close.
        app: The ASGI app that gets the requests no route matches (as `GatewayMiddleware`
            passes it); None answers them 404.
        hooks: Python hooks by route `path`: `{"/api/users": Hooks(on_request=...)}`.

    Raises:
        ConfigError: `config` is invalid.

    Attributes:
        config: The validated configuration.
    """

    def __init__(
        self,
        config: ConfigSource,
        *,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        transport: UserTransport | None = None,
        app: ASGIApp | None = None,
        hooks: Mapping[str, Hooks] | None = None,
    ) -> None:
        self.app = app
        #: The file `reload()` re-reads, when the gateway was built from one.
        self.config_path = os.fspath(config) if isinstance(config, str | os.PathLike) else None
        loaded, digest = load_with_digest(config)
        # `{admin.path}/metrics` needs its registry from the start: it sees what the
        # instruments record, and they are made once.
        self.telemetry = Telemetry(tracer_provider, meter_provider, prometheus=loaded.admin.path is not None)
        self._transport = AutoTransport(transport)
        self._hooks = hooks
        self._state: GatewayState = build_state(loaded, digest, self._transport, self.telemetry, hooks)
        #: What the admin page shows beyond `status()`: recent 5xx answers, operator actions.
        self.admin_records = AdminRecords()
        self._state.watch_servers()
        self._last_error: str | None = None
        self._running = 0
        #: Set by `reload()` while the gateway runs: the new state's background work starts.
        self._reloaded: anyio.Event | None = None
        # Graceful drain: requests being proxied, and the WebSocket sessions to close last.
        self._in_flight = 0
        self._idle: anyio.Event | None = None
        self._draining = False
        self._sessions: set[anyio.CancelScope] = set()
        self._sessions_ended: anyio.Event | None = None

    # -- the current config's state (a request keeps the one it arrived under) ----------

    @property
    def config(self) -> GatewayConfig:
        """The validated configuration now serving."""
        return self._state.config

    @property
    def router(self) -> Router:
        return self._state.router

    @property
    def stacks(self) -> Mapping[str, UpstreamStack]:
        """Each upstream's layers, by name."""
        return self._state.stacks

    @property
    def route_handlers(self) -> tuple[Handler, ...]:
        """Each route's handler of HTTP requests, by route index."""
        return self._state.route_handlers

    @property
    def websocket_handlers(self) -> tuple[Handler, ...]:
        """Each route's handler of WebSocket handshakes, by route index."""
        return self._state.websocket_handlers

    @property
    def edge(self) -> EdgeServices:
        return self._state.edge

    # -- lifecycle ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the background work (health checks) and close connections on exit.

        An async context manager, for serving the gateway under something that has no
        lifespan of its own: `async with gateway.running(): ...`.
        """
        self._transport.open()
        self._running += 1
        try:
            async with anyio.create_task_group() as tg:
                if self._running == 1:
                    from ._websocket import warn_if_unavailable

                    warn_if_unavailable()
                    # The first JWKS fetches (each within its timeout) come before serving.
                    await tg.start(self._run_background, name="gateway background")
                try:
                    yield
                finally:
                    self._reloaded = None
                    tg.cancel_scope.cancel()
        finally:
            self._running -= 1
            if self._running == 0:
                with anyio.CancelScope(shield=True):
                    await self._transport.aclose()

    async def _run_background(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Run the current state's background work, and each new state's after a reload.

        `reload()` only sets an event: it may be called from a plain callback of the event
        loop (a signal handler), where no task could be started.
        """
        async with anyio.create_task_group() as tg:
            started = self._state
            await tg.start(started.run)
            task_status.started()
            refreeze = False
            while True:
                if self._state is started:
                    reloaded = self._reloaded = anyio.Event()
                    if refreeze:
                        # One full collection for a burst of reloads, once they have been
                        # quiet for a while, never on the reload's own path.
                        with anyio.move_on_after(_REFREEZE_AFTER):
                            await reloaded.wait()
                        if not reloaded.is_set():
                            refreeze_heap()
                            refreeze = False
                            continue
                    else:
                        await reloaded.wait()
                # Only the latest: a state replaced before it ran has been stopped anyway. A
                # reload during the first state's start (its DNS lookups, JWKS fetches) is
                # seen here too, though no one was waiting for it yet.
                started = self._state
                tg.start_soon(started.run, name="gateway background")
                refreeze = True

    def lifespan(self, app: object = None) -> contextlib.AbstractAsyncContextManager[None]:
        """For `FastAPI(lifespan=gateway.lifespan)` / `Starlette(lifespan=...)`.

        The gateway's health checks run and its connection pool stays open from the app's
        startup to its shutdown, when its connections are closed.
        """
        return self._hosted()

    @contextlib.asynccontextmanager
    async def _hosted(self) -> AsyncIterator[None]:
        async with self.running():
            freeze_heap()
            yield

    def reload(self, config: ConfigSource | None = None) -> None:
        """Replace the running config with `config` (default: re-read `config_path`).

        The new state is built and validated off to the side, then swapped in at once:
        requests already routed finish on the config they arrived under (retries
        included) and WebSocket sessions stay open; new requests see the new routes.
        Servers that stay (same upstream name and URL) keep their health, ejection state
        and pooled connections; removed ones take no new requests and their connections
        close as their last requests end. Call it from the event loop's thread.

        Raises:
            ConfigError: `config` is invalid (every error, with its key path); nothing
                changed and the running config keeps serving. `status()["config"]
                ["last_error"]` says why until the next successful reload.
        """
        source = config if config is not None else self.config_path
        if source is None:
            raise ConfigError("", "reload() needs a config: this gateway was not built from a file")
        old = self._state
        try:
            loaded, digest = load_with_digest(source)
            state = build_state(loaded, digest, self._transport, self.telemetry, self._hooks, previous=old)
        except ConfigError as exc:
            self._last_error = str(exc)
            self.telemetry.config_reloaded("failure")
            logger.error(
                "config reload failed; the running config (version %d) keeps serving:\n%s",
                old.version,
                exc,
                extra={"reason": "reload-failed"},
            )
            raise
        self._state = state
        self._last_error = None
        state.watch_servers()
        if isinstance(source, str | os.PathLike):
            self.config_path = os.fspath(source)
        state.adopt()
        old.stop()
        for name in old.stacks.keys() - state.stacks.keys():
            # An upstream gone from the config leaves the available-servers gauge with it.
            self.telemetry.available.pop(name, None)
        self._transport.retire(removed_servers(old, state))
        if self._reloaded is not None:
            self._reloaded.set()
        self.telemetry.config_reloaded("success")
        logger.info(
            "config reloaded: version %d (sha256 %s), %d routes, %d upstreams",
            state.version,
            state.sha256[:12],
            len(state.config.routes),
            len(state.config.upstreams),
            extra={"reason": "reloaded"},
        )
        if self._reloaded is None:
            # Not running, so no background work to do it later: a heap frozen at start-up
            # (`_hosting.freeze_heap`) lets the old state go now.
            del old
            refreeze_heap()

    @property
    def draining(self) -> bool:
        """Whether draining has begun: `{admin.path}/ready` answers 503 from then on."""
        return self._draining

    def start_draining(self) -> None:
        """Fail the readiness check from now on, while still serving everything."""
        if not self._draining:
            self._draining = True
            logger.info("draining: readiness fails from now on", extra={"reason": "draining"})

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109 - a phase of shutdown, not a deadline of the caller's
        """Wait for the requests in flight (at most `timeout` seconds), then close every
        WebSocket session with 1001 (going away) and wait for them to end.

        Starts draining if it had not begun. True when everything ended in time.
        """
        self.start_draining()
        finished = True
        with anyio.move_on_after(timeout) as waited:
            while self._in_flight:
                # One event for every drain waiting at once (a second SIGTERM's, the admin's):
                # a new one per caller would leave the earlier callers waiting on one never set.
                if self._idle is None or self._idle.is_set():
                    self._idle = anyio.Event()
                await self._idle.wait()
        if waited.cancelled_caught:
            finished = False
            logger.warning(
                "drain timeout: %d request(s) still in flight after %gs",
                self._in_flight,
                timeout,
                extra={"reason": "drain-timeout"},
            )
        if not self._sessions:
            return finished
        if self._sessions_ended is None or self._sessions_ended.is_set():
            self._sessions_ended = anyio.Event()
        logger.info(
            "draining: closing %d WebSocket session(s) with 1001",
            len(self._sessions),
            extra={"reason": "draining"},
        )
        for session in list(self._sessions):
            session.cancel()
        # Each session closes both ends within its own close timeout; a bound on top of it.
        with anyio.move_on_after(CLOSE_TIMEOUT + 2.0) as closing:
            await self._sessions_ended.wait()
        return finished and not closing.cancelled_caught

    def status(self) -> dict[str, Any]:
        """Every upstream's servers and their state, and the config's, as JSON-able data.

        `{"upstreams": {name: {"mode": ..., "available": ..., "servers": [...], ...}},
        "config": {"version", "sha256", "loaded_at", "last_error"}}`: the same view
        `status_path` serves. Each server has its `state` (`healthy`, `unhealthy` or
        `ejected`), `available`, `in_flight`, ejection and failure counts.
        """
        state = self._state
        return {
            "upstreams": {name: stack.status() for name, stack in state.stacks.items()},
            "config": {**state.config_status(), "last_error": self._last_error},
            "draining": self._draining,
        }

    # -- ASGI ------------------------------------------------------------------------

    async def _not_http(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self.handle_websocket(scope, receive, send)
        elif kind == "lifespan" and self.app is None:
            await self._own_lifespan(receive, send)
        elif self.app is not None:
            await self.app(scope, receive, send)

    async def _own_lifespan(self, receive: Any, send: Any) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            async with self.running():
                freeze_heap()
                await send({"type": "lifespan.startup.complete"})
                message = await receive()
        except Exception as exc:
            logger.exception("gateway lifespan failed")
            await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        # HTTP requests are handled right here rather than in one more coroutine (every one
        # between the server and the socket is resumed at each wake-up of the exchange). A
        # coroutine function, as servers tell ASGI 3 apps by that (uvicorn does).
        if scope["type"] != "http":
            await self._not_http(scope, receive, send)
            return
        # Read once: this request is served by the config it arrived under, to its end.
        state = self._state
        method: str = scope["method"]
        raw_path = self._mount_relative(scope)
        if state.status_path is not None and raw_path == state.status_path and method in ("GET", "HEAD"):
            await self._send_status(send)
            return
        admin = state.admin
        if admin is not None and admin.handles(raw_path):
            await admin(scope, send, raw_path, self, _request_id_of(scope))
            return
        host = _host_of(scope) if state.needs_host else None
        try:
            match = state.router.match(method, host, raw_path)
        except BadRequest as exc:
            await send_error(send, exc, _request_id_of(scope))
            return
        if match is None:
            if self.app is not None:
                await self.app(scope, receive, send)
            else:
                await send_error(send, NotFound("no route matches this request"), _request_id_of(scope))
            return
        route, path = match
        stack = state.stacks[route.upstream]
        upstream = stack.config
        request, incoming = prepare(scope, route, path, upstream, state.trusted)
        exchange = request.exchange
        token = self.telemetry.start(scope, route, exchange)
        status = 500
        error: BaseException | None = None
        self._in_flight += 1
        # With `adaptive_concurrency` the request takes its place before its body is read, so
        # that an overflow is refused without reading (or waiting for) the upload.
        limit = stack.concurrency
        held = limit is not None and limit.acquire()
        try:
            try:
                if limit is not None and not held:
                    raise limit.refusal()
                # Most requests have no body and a small head: nothing to read or refuse.
                if (
                    incoming.content_length is not None
                    or incoming.transfer_encoding is not None
                    or incoming.size > MAX_HEADER_BYTES
                ):
                    request.body = await read_body(receive, incoming, route, upstream)
            except GatewayError as exc:
                error = exc
                # With both framings (RFC 9112 6.3) the bytes after this request cannot be
                # trusted to be a request of their own: close the connection after the answer.
                ambiguous = incoming.content_length is not None and incoming.transfer_encoding is not None
                status = await send_error(send, exc, exchange.request_id, close=ambiguous)
                return
            status, error = await relay(
                state.route_handlers[route.index], request, receive, send, request.body.replayable
            )
        except ClientDisconnected as exc:
            status, error = 499, exc
        except Exception as exc:
            # A bug of ours must still give the client a short JSON answer, not a traceback.
            logger.exception("unexpected error while proxying", extra={"request_id": exchange.request_id})
            error = exc
            if not exchange.committed:
                status = await send_error(send, GatewayError("internal error"), exchange.request_id)
        finally:
            if held and limit is not None:
                limit.release()
            self._in_flight -= 1
            if self._idle is not None and not self._in_flight:
                self._idle.set()
            if state.admin is not None:
                self.admin_records.finished(exchange, status, token.span or token.traced)
            self.telemetry.finish(token, exchange, status, error)

    #: An HTTP request (`GatewayMiddleware` hands them over with this name).
    handle_http = __call__

    def _mount_relative(self, scope: Scope) -> bytes:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        if self.app is None and scope.get("root_path"):
            root = scope["root_path"].encode("utf-8")
            if raw_path.startswith(root):
                raw_path = raw_path[len(root) :] or b"/"
        return raw_path

    async def handle_websocket(self, scope: Scope, receive: Any, send: Any) -> None:
        """Relay a WebSocket session whose handshake matches a route."""
        state = self._state
        raw_path = self._mount_relative(scope)
        if state.admin is not None and state.admin.handles(raw_path):
            # Admin paths never reach an upstream or the app, whatever the protocol.
            await send({"type": "websocket.close", "code": 1008})
            return
        host = _host_of(scope) if state.needs_host else None
        from ._websocket import proxy_websocket, refuse_handshake

        try:
            match = state.router.match("GET", host, raw_path)
        except BadRequest as exc:
            await refuse_handshake(scope, send, exc, _request_id_of(scope))
            return
        if match is None:
            if self.app is not None:
                await self.app(scope, receive, send)
            else:
                await refuse_handshake(
                    scope, send, NotFound("no route matches this request"), _request_id_of(scope)
                )
            return
        route, path = match

        # Drain cancels the session's scope: both ends then hear 1001 (going away).
        with anyio.CancelScope() as session:
            self._sessions.add(session)
            try:
                await proxy_websocket(
                    scope,
                    receive,
                    send,
                    route=route,
                    path=path,
                    upstream=state.stacks[route.upstream].config,
                    handler=state.websocket_handlers[route.index],
                    telemetry=self.telemetry,
                    trusted=state.trusted,
                )
            finally:
                self._sessions.discard(session)
                if self._sessions_ended is not None and not self._sessions:
                    self._sessions_ended.set()

    async def _send_status(self, send: Any) -> None:
        body = json.dumps(self.status(), default=str).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _host_of(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"host":
            host: str = value.decode("latin-1").lower()
            if host.startswith("["):
                return host[: host.find("]") + 1]
            return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")
    return None


def _request_id_of(scope: Scope) -> str:
    """The client's X-Request-Id when it is sane, else a new one (off the proxied path).

    The last one the client sent, as `prepare` takes it for a proxied request.
    """
    value: bytes | None = None
    for name, header in scope["headers"]:
        if name == b"x-request-id":
            value = header
    if value is not None and sane_request_id(value):
        return value.decode("ascii")
    return make_request_id()


class GatewayMiddleware:
    """Forward the requests that match a route; everything else reaches `app` untouched.

    `app.add_middleware(GatewayMiddleware, config="gateway.toml")`. The gateway starts and
    stops with the app's lifespan (health checks, connection pool); without a lifespan the
    pool opens on the first request and health checks do not run.

    Args:
        app: The wrapped ASGI app.
        config: A mapping, a path to a `.toml`/`.yaml`/`.yml`/`.json` file or a
            `GatewayConfig`; validated here.
        tracer_provider: As for `Gateway`.
        meter_provider: As for `Gateway`.
        transport: As for `Gateway`.
        hooks: As for `Gateway`.

    Raises:
        ConfigError: `config` is invalid.

    Attributes:
        gateway: The `Gateway` doing the work (`middleware.gateway.status()`).
    """

    def __init__(
        self,
        app: ASGIApp,
        config: ConfigSource,
        *,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        transport: UserTransport | None = None,
        hooks: Mapping[str, Hooks] | None = None,
    ) -> None:
        self.app = app
        self.gateway = Gateway(
            config,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            transport=transport,
            app=app,
            hooks=hooks,
        )
        # Once hoisted on top of the host's stack, the gateway has seen every request that
        # reaches here, and found no route for it: they go on to `app`.
        self._http: ASGIApp = self.gateway.handle_http
        self._websocket: ASGIApp = self.gateway.handle_websocket

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Any, send: Any) -> None:
        # The gateway runs in a task of its own from the app's startup until after its
        # shutdown, so its task group is entered and left in one place.
        stop = anyio.Event()
        stopped = anyio.Event()
        started = False

        async def run_gateway(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            try:
                async with self.gateway.running():
                    task_status.started()
                    await stop.wait()
            finally:
                stopped.set()

        async with anyio.create_task_group() as tg:

            async def wrapped_receive() -> Any:
                nonlocal started
                message = await receive()
                if message["type"] == "lifespan.startup" and not started:
                    started = True
                    await tg.start(run_gateway)
                return message

            async def wrapped_send(message: Any) -> None:
                if message["type"] == "lifespan.startup.complete":
                    self._host_started(scope)
                elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                    stop.set()
                    if started:
                        await stopped.wait()
                await send(message)

            try:
                await self.app(scope, wrapped_receive, wrapped_send)
            finally:
                stop.set()

    def _host_started(self, scope: Scope) -> None:
        """The host app has started: skip its stack for proxied requests where that is safe
        (`_hosting.hoist`), and freeze the heap built so far."""
        host = scope.get("app")
        if host is not None and hoist(host, self, self.gateway):
            self._http = self._websocket = self.app
            logger.debug("serving on top of the host app's middleware stack")
        freeze_heap()
