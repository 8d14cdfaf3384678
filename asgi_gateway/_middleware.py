"""`GatewayMiddleware` and the standalone `Gateway` ASGI app."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio

from ._admin_stats import AdminRecords
from ._config import GatewayConfig, load_with_digest
from ._edge.services import EdgeServices
from ._exceptions import BadRequest, ClientDisconnected, ConfigError, GatewayError, NotFound
from ._hosting import freeze_heap, hoist
from ._layers.transform import Hooks
from ._lifecycle import Lifecycle, serve_lifespan, wrap_lifespan
from ._prepare import MAX_HEADER_BYTES, prepare, read_body
from ._proxy import make_request_id, relay, sane_request_id, send_error
from ._routing import Router
from ._stack import UpstreamStack
from ._state import GatewayState, build_state
from ._telemetry import Telemetry
from ._transports.auto import AutoTransport, UserTransport
from ._types import Handler

__all__ = ["Gateway", "GatewayMiddleware"]

logger = logging.getLogger("asgi_gateway")

ASGIApp = Any
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
        self._state: GatewayState = build_state(loaded, digest, self._transport, self.telemetry, hooks)
        #: What the admin page shows beyond `status()`: recent 5xx answers, operator actions.
        self.admin_records = AdminRecords()
        self._state.watch_servers()
        # Background work, reloads and WebSocket sessions; `_state` stays here, where each
        # request reads it.
        self._lifecycle = Lifecycle(self._state, self._transport, self.telemetry, hooks)
        # Graceful drain: readiness, and the requests being proxied (counted in `__call__`).
        self._draining = False
        self._in_flight = 0
        self._idle: anyio.Event | None = None

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
        async with self._lifecycle.running():
            yield

    def lifespan(self, app: object = None) -> contextlib.AbstractAsyncContextManager[None]:
        """For `FastAPI(lifespan=gateway.lifespan)` / `Starlette(lifespan=...)`.

        The gateway's health checks run and its connection pool stays open from the app's
        startup to its shutdown, when its connections are closed.
        """
        return self._lifecycle.hosted()

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
        state = self._lifecycle.build(source)
        self._state = state
        if isinstance(source, str | os.PathLike):
            self.config_path = os.fspath(source)
        self._lifecycle.swapped(state)

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
        closed = await self._lifecycle.close_sessions()
        return finished and closed

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
            "config": {**state.config_status(), "last_error": self._lifecycle.last_error},
            "draining": self._draining,
        }

    # -- ASGI ------------------------------------------------------------------------

    async def _not_http(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self.handle_websocket(scope, receive, send)
        elif kind == "lifespan" and self.app is None:
            await serve_lifespan(self._lifecycle.hosted, receive, send)
        elif self.app is not None:
            await self.app(scope, receive, send)

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
        # The prefix test inline: with the admin endpoints on, every request makes it.
        if admin is not None and raw_path.startswith(admin.prefix) and admin.handles(raw_path):
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
            # The admin page records 5xx answers and rate-limit decisions, nothing else.
            if state.admin is not None and (status >= 500 or exchange.rate_limit_result is not None):
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

        with self._lifecycle.session():
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
            # The host app's lifespan, with the gateway running from its startup until
            # after its shutdown.
            await wrap_lifespan(
                self.app, scope, receive, send, running=self.gateway.running, started=self._host_started
            )
        else:
            await self.app(scope, receive, send)

    def _host_started(self, scope: Scope) -> None:
        """The host app has started: skip its stack for proxied requests where that is safe
        (`_hosting.hoist`), and freeze the heap built so far."""
        host = scope.get("app")
        if host is not None and hoist(host, self, self.gateway):
            self._http = self._websocket = self.app
            logger.debug("serving on top of the host app's middleware stack")
        freeze_heap()
