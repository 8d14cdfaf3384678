"""The names the gateway's spans, metrics and attributes go by, and the small helpers that pick values.

The stable OpenTelemetry HTTP semantic conventions, spelled out so that the package does
not depend on opentelemetry-semantic-conventions' module layout, and the gateway's own
`gateway.*` names beside them. A leaf module: the layers, the request path and the
WebSocket path all import it, and it imports nothing of the package.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CLIENT_ADDRESS",
    "DURATION_BUCKETS",
    "ERROR_TYPE",
    "GATEWAY_HEDGE_CANCELLED",
    "GATEWAY_UPSTREAM",
    "HTTP_REQUEST_METHOD",
    "HTTP_REQUEST_METHOD_ORIGINAL",
    "HTTP_REQUEST_RESEND_COUNT",
    "HTTP_RESPONSE_STATUS_CODE",
    "HTTP_ROUTE",
    "METHODS",
    "NETWORK_PEER_ADDRESS",
    "OTHER_METHOD",
    "SERVER_ADDRESS",
    "SERVER_PORT",
    "URL_FULL",
    "URL_PATH",
    "URL_SCHEME",
    "WEBSOCKET_CLOSED_BY",
    "WEBSOCKET_CLOSE_CODE",
    "WEBSOCKET_MESSAGES_TO_CLIENT",
    "WEBSOCKET_MESSAGES_TO_UPSTREAM",
    "WEBSOCKET_SESSIONS",
    "error_type",
    "method_attributes",
]

HTTP_ROUTE: Final = "http.route"
HTTP_REQUEST_METHOD: Final = "http.request.method"
HTTP_REQUEST_METHOD_ORIGINAL: Final = "http.request.method_original"
HTTP_REQUEST_RESEND_COUNT: Final = "http.request.resend_count"
HTTP_RESPONSE_STATUS_CODE: Final = "http.response.status_code"
URL_PATH: Final = "url.path"
URL_SCHEME: Final = "url.scheme"
URL_FULL: Final = "url.full"
CLIENT_ADDRESS: Final = "client.address"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
NETWORK_PEER_ADDRESS: Final = "network.peer.address"
ERROR_TYPE: Final = "error.type"
GATEWAY_UPSTREAM: Final = "gateway.upstream"
#: On a CLIENT span: a hedged try cancelled because another try of its request answered first.
GATEWAY_HEDGE_CANCELLED: Final = "gateway.hedge.cancelled"

# No semantic conventions exist for WebSocket sessions yet: these are the gateway's own.
WEBSOCKET_MESSAGES_TO_UPSTREAM: Final = "gateway.websocket.messages.client_to_upstream"
WEBSOCKET_MESSAGES_TO_CLIENT: Final = "gateway.websocket.messages.upstream_to_client"
WEBSOCKET_CLOSE_CODE: Final = "gateway.websocket.close.code"
WEBSOCKET_CLOSED_BY: Final = "gateway.websocket.closed_by"
WEBSOCKET_SESSIONS: Final = "gateway.websocket.sessions"

#: Semconv's advisory buckets for HTTP durations, in seconds.
DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

_KNOWN_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
#: method -> (http.request.method value, span name); any other method is "_OTHER" / "HTTP".
METHODS: Final[dict[str, tuple[str, str]]] = {method: (method, method) for method in _KNOWN_METHODS}
OTHER_METHOD: Final = ("_OTHER", "HTTP")


def method_attributes(method: str) -> tuple[str, str]:
    """The semconv `http.request.method` value and span-name method for `method`."""
    return METHODS.get(method, OTHER_METHOD)


def error_type(error: BaseException) -> str:
    """The `error.type` of an exception: its class name."""
    return type(error).__qualname__
