"""WebSocket sessions, relayed to an upstream server chosen by the same layers as requests.

The handshake is a GET request through the route's handler of handshakes, composed in
`_stack`: the route's edge layers (IP rules, auth, rate limit), then the upstream's retry
policy and failover layer over the WebSocket transport. The balancer picks the server
(`consistent_hash` keeps a user's sockets on one), and connect failures, resets, timeouts
and 502/503/504 refusals go to another server within `retry.attempts` and
`timeouts.total`, counted by outlier detection. The client's handshake completes only
once an upstream has accepted, with the subprotocol that upstream chose. When nothing
accepts, the client is refused: with the gateway's JSON error (403, 401, 429 from the
edge layers; 502/503/504) or the upstream's own refusal (401, 403, ...) where the server
in front supports the "websocket.http.response" extension, else with a close whose code
follows the status (`_close_code`: 1008, 1011, 1013 or 1014), which servers send as a 403.

This module keeps the session's own part: the handshake's outcome, the answers to the
client and the session's telemetry. Then messages flow both ways (`_websocket_relay`),
one at a time per direction; close codes and reasons pass through both ways.

The upstream side is the `websockets` library's asyncio client, the optional
`asgi-gateway[websockets]` extra, so sessions run under asyncio only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

import anyio
import sniffio

from ._config import UpstreamConfig
from ._exceptions import GatewayError, UpstreamError, error_response
from ._prepare import prepare
from ._proxy import TrustedProxies, downstream_headers, make_request_id
from ._routing import Route
from ._telemetry import WEBSOCKET, SessionPending, Telemetry
from ._transports.websocket import CLOSE_TIMEOUT, UpgradedStream
from ._types import Exchange, Handler, Request, Response, WebSocketUpgrade
from ._websocket_relay import Relay

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

__all__ = [
    "CLOSE_TIMEOUT",
    "proxy_websocket",
    "refuse_handshake",
    "unavailable_reason",
    "warn_if_unavailable",
]

logger = logging.getLogger("asgi_gateway")

EXTRA: Final = "pip install 'asgi-gateway[websockets]'"

# Of the upstream's 101 answer, these belong to the upstream connection or are the client-side
# server's to write; the rest (Set-Cookie, ...) reaches the client with the accept.
_NOT_RELAYED_DOWN: Final = frozenset(
    {
        b"sec-websocket-accept",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
        b"date",
        b"server",
        b"content-length",
    }
)
_HTTP_RESPONSE_EXTENSION: Final = "websocket.http.response"


# -- availability -------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why this process cannot proxy WebSocket sessions, or None when it can.

    Needs the `websockets` library (>= 13, the `asgi-gateway[websockets]` extra) and,
    when called from async code, an asyncio event loop.
    """
    try:
        import websockets.asyncio.client  # noqa: F401
    except ImportError:
        return f"WebSocket proxying needs the websockets library (>= 13): {EXTRA}"
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None
    if library != "asyncio":
        return f"WebSocket proxying runs on asyncio only, not on {library}"
    return None


def warn_if_unavailable() -> bool:
    """At start-up: say when WebSocket handshakes would be refused; True when they would.

    INFO, not WARNING: routes are not marked as WebSocket routes, and HTTP-only
    deployments need not install the extra.
    """
    reason = unavailable_reason()
    if reason is not None:
        logger.info("WebSocket handshakes on gateway routes will be refused: %s", reason)
    return reason is not None


# -- the session --------------------------------------------------------------------------


async def proxy_websocket(
    scope: dict[str, Any],
    receive: Any,
    send: Any,
    *,
    route: Route,
    path: bytes,
    upstream: UpstreamConfig,
    handler: Handler,
    telemetry: Telemetry,
    trusted: TrustedProxies,
) -> None:
    """Relay one WebSocket session between the client and a server of `upstream`.

    `handler` is the route's handler of WebSocket handshakes (`build_route_handlers`):
    its edge layers, then the upstream's retry and failover over the WebSocket transport.
    """
    reason = unavailable_reason()
    if reason is not None:
        logger.error(
            "refused a WebSocket handshake on route %r: %s",
            route.path,
            reason,
            extra={"route": route.path, "upstream": route.upstream},
        )
        await _refuse_with_error(scope, send, GatewayError(reason), make_request_id())
        return
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    request, _ = prepare(scope, route, path, upstream, trusted, websocket=True)
    request.upgrade = WebSocketUpgrade(tuple(scope.get("subprotocols") or ()), route.max_message_size)
    exchange = request.exchange
    session = _Session(telemetry, scope, route, exchange)
    try:
        await session.run(scope, receive, send, request, handler)
    except Exception as exc:
        # A bug of ours must still end the client's handshake or session, never hang it.
        logger.exception("unexpected error while relaying a WebSocket session", extra=_log_extra(exchange))
        session.error = exc
        if not session.accepted:
            # An accepted session's relay has closed both ends on its way out.
            with anyio.CancelScope(shield=True):
                await _refuse_with_error(scope, send, GatewayError("internal error"), exchange.request_id)
    finally:
        session.finish()


class _Session:
    """One client's WebSocket session: its handshake, relay, close and telemetry."""

    __slots__ = ("accepted", "error", "exchange", "route", "scope", "status", "telemetry", "token")

    def __init__(self, telemetry: Telemetry, scope: dict[str, Any], route: Route, exchange: Exchange) -> None:
        self.telemetry = telemetry
        self.scope = scope
        self.route = route
        self.exchange = exchange
        self.accepted = False
        self.status = 500
        self.error: BaseException | None = None
        token = telemetry.start(scope, route, exchange, WEBSOCKET)
        assert isinstance(token, SessionPending)
        self.token = token

    # -- handshake ---------------------------------------------------------------------

    async def run(
        self, scope: dict[str, Any], receive: Any, send: Any, request: Request, handler: Handler
    ) -> None:
        exchange = self.exchange
        try:
            response = await handler.handle_request(request)
        except GatewayError as exc:
            if isinstance(exc, UpstreamError):
                logger.info(
                    "WebSocket handshake failed upstream: %s",
                    exc.detail or exc.code,
                    extra=_log_extra(exchange),
                )
            self.error = exc
            self.status = await _refuse_with_error(scope, send, exc, exchange.request_id)
            return
        self.status = response.status
        upgraded = response.stream
        if not isinstance(upgraded, UpgradedStream):
            # The upstream refused the upgrade and no other server was to be tried: its answer goes to the client.
            error: BaseException | None = None
            try:
                await _refuse_with_response(scope, send, response, exchange.request_id)
            except BaseException as exc:
                error = exc
                raise
            finally:
                with anyio.CancelScope(shield=True):
                    await response.aclose(error)
            return
        await self._relay(upgraded.connection, response, receive, send)

    # -- relay -------------------------------------------------------------------------

    async def _relay(self, connection: ClientConnection, response: Response, receive: Any, send: Any) -> None:
        relay = Relay(connection, receive, send, self.route.max_message_size)
        headers = [
            header
            for header in downstream_headers(response.headers, self.exchange.request_id.encode())
            if header[0] not in _NOT_RELAYED_DOWN
        ]
        error: BaseException | None = None
        try:
            try:
                await send(
                    {"type": "websocket.accept", "subprotocol": connection.subprotocol, "headers": headers}
                )
            except OSError:
                relay.client_left(1006, "")
            else:
                self.accepted = True
                self.exchange.committed = True
                self.telemetry.session_opened(self.token, self.exchange)
                await relay.run()
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                # Cancelled from outside (server shutdown): both ends hear that the gateway is going away.
                relay.gateway_ends(1001, "gateway going away", None)
            else:
                relay.gateway_ends(1011, "internal error", None)
            error = exc
            raise
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await relay.close()
                finally:
                    token = self.token
                    token.to_upstream = relay.to_upstream
                    token.to_client = relay.to_client
                    token.closed_by = relay.closed_by
                    token.close_code = relay.close_code
                    if error is None:
                        error = self.error = relay.error
                    # Releases the server for the failover layer, which judges the session's end.
                    await response.aclose(error)

    def finish(self) -> None:
        """Called once the session is over: span, metrics, access log."""
        self.telemetry.finish(self.token, self.exchange, self.status, self.error)


# -- answering the client -----------------------------------------------------------------


def _has_http_response(scope: dict[str, Any]) -> bool:
    return _HTTP_RESPONSE_EXTENSION in (scope.get("extensions") or {})


async def _refuse_with_error(scope: dict[str, Any], send: Any, exc: GatewayError, request_id: str) -> int:
    """Refuse the handshake with the gateway's JSON error where possible; returns the status."""
    status, headers, body = error_response(exc, request_id)
    try:
        if _has_http_response(scope):
            await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": _close_code(status)})
    except OSError:
        pass
    return status


def _close_code(status: int) -> int:
    """The close that refuses a handshake in place of an HTTP answer of `status`, whoever
    made that answer (the gateway, a hook or the upstream); RFC 6455 7.4.1 and IANA's registry.

    503 is 1013 (try again later): nothing is available now, as its Retry-After says. 502
    and 504, an upstream that failed or did not answer, are 1014 (bad gateway). Any other
    5xx is 1011 (internal error). Everything else refuses the client's request as it is
    (IP rules, auth, rate limit, an upstream's 403 or redirect): 1008 (policy violation),
    the generic refusal.
    """
    if status >= 500:
        if status == 503:
            return 1013
        return 1014 if status in (502, 504) else 1011
    return 1008


async def refuse_handshake(scope: dict[str, Any], send: Any, exc: GatewayError, request_id: str) -> int:
    """Refuse a WebSocket handshake with `exc`: its JSON error, else a close by `_close_code`."""
    return await _refuse_with_error(scope, send, exc, request_id)


async def _refuse_with_response(
    scope: dict[str, Any], send: Any, response: Response, request_id: str
) -> None:
    """Pass an upstream's refusal of the upgrade on to the client."""
    try:
        if _has_http_response(scope):
            headers = downstream_headers(response.headers, request_id.encode())
            await send(
                {"type": "websocket.http.response.start", "status": response.status, "headers": headers}
            )
            async for chunk in response.stream:
                await send({"type": "websocket.http.response.body", "body": chunk, "more_body": True})
            await send({"type": "websocket.http.response.body", "body": b""})
        else:
            await send({"type": "websocket.close", "code": _close_code(response.status)})
    except OSError:
        pass


def _log_extra(exchange: Exchange) -> dict[str, Any]:
    return {"request_id": exchange.request_id, "upstream": exchange.upstream.name, "route": exchange.route}
