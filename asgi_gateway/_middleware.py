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

from ._config import GatewayConfig, load_config
from ._edge.services import EdgeServices
from ._exceptions import BadRequest, ClientDisconnected, GatewayError, NotFound
from ._layers.transform import Hooks
from ._prepare import MAX_HEADER_BYTES, prepare, read_body
from ._proxy import TrustedProxies, make_request_id, relay, sane_request_id, send_error
from ._routing import Router
from ._stack import UpstreamStack, build_route_handlers, build_stacks
from ._telemetry import Telemetry
from ._transports.auto import AutoTransport, UserTransport

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
        self.config = load_config(config)
        self.app = app
        self.router = Router(self.config)
        self._trusted = TrustedProxies(self.config.trusted_proxies)
        self._needs_host = any(route.host is not None for route in self.router.routes)
        self.telemetry = Telemetry(tracer_provider, meter_provider)
        self._transport = AutoTransport(transport)
        self.stacks: Mapping[str, UpstreamStack] = build_stacks(self.config, self._transport, self.telemetry)
        self.edge = EdgeServices(self.config.redis)
        #: Each route's handler of HTTP requests and of WebSocket handshakes, by route index.
        self.route_handlers, self.websocket_handlers = build_route_handlers(
            self.config, self.stacks, self.telemetry, self.edge, hooks
        )
        self._status_path = self.config.status_path.encode() if self.config.status_path else None
        self._running = 0

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
                    for stack in self.stacks.values():
                        if stack.checker is not None:
                            tg.start_soon(stack.checker.run, name=f"health check {stack.config.name}")
                    if self.edge.active:
                        # The first JWKS fetches (each within its timeout) before serving.
                        await tg.start(self.edge.run, name="edge protection")
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._running -= 1
            if self._running == 0:
                with anyio.CancelScope(shield=True):
                    await self._transport.aclose()

    def lifespan(self, app: object = None) -> contextlib.AbstractAsyncContextManager[None]:
        """For `FastAPI(lifespan=gateway.lifespan)` / `Starlette(lifespan=...)`.

        The gateway's health checks run and its connection pool stays open from the app's
        startup to its shutdown, when its connections are closed.
        """
        return self.running()

    def status(self) -> dict[str, Any]:
        """Every upstream's servers and their state, as JSON-able data.

        `{"upstreams": {name: {"mode": ..., "available": ..., "servers": [...], ...}}}`:
        the same view `status_path` serves. Each server has its `state` (`healthy`,
        `unhealthy` or `ejected`), `available`, `in_flight`, ejection and failure counts.
        """
        return {"upstreams": {name: stack.status() for name, stack in self.stacks.items()}}

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
        method: str = scope["method"]
        raw_path = self._mount_relative(scope)
        if self._status_path is not None and raw_path == self._status_path and method in ("GET", "HEAD"):
            await self._send_status(send)
            return
        host = _host_of(scope) if self._needs_host else None
        try:
            match = self.router.match(method, host, raw_path)
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
        upstream = self.stacks[route.upstream].config
        request, incoming = prepare(scope, route, path, upstream, self._trusted)
        exchange = request.exchange
        token = self.telemetry.start(scope, route, exchange)
        status = 500
        error: BaseException | None = None
        try:
            try:
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
                self.route_handlers[route.index], request, receive, send, request.body.replayable
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
        host = _host_of(scope) if self._needs_host else None
        try:
            match = self.router.match("GET", host, self._mount_relative(scope))
        except BadRequest:
            await send({"type": "websocket.close", "code": 1008, "reason": "ambiguous path"})
            return
        if match is None:
            if self.app is not None:
                await self.app(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1000})
            return
        route, path = match
        from ._websocket import proxy_websocket

        await proxy_websocket(
            scope,
            receive,
            send,
            route=route,
            path=path,
            upstream=self.stacks[route.upstream].config,
            handler=self.websocket_handlers[route.index],
            telemetry=self.telemetry,
            trusted=self._trusted,
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

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await self.gateway.handle_http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.gateway.handle_websocket(scope, receive, send)
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
                if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                    stop.set()
                    if started:
                        await stopped.wait()
                await send(message)

            try:
                await self.app(scope, wrapped_receive, wrapped_send)
            finally:
                stop.set()
