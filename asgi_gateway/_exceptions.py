"""
The gateway's exceptions, one tree:

* GatewayError
  + ConfigError
  + ClientRequestError ............ the client's request is refused (4xx)
  | + BadRequest ................. 400 bad_request
  | + PayloadTooLarge ............ 413 payload_too_large
  + UpstreamError ................ the upstream failed (5xx)
    + UpstreamUnavailable ........ 503 upstream_unavailable
    | + NoServerAvailable
    | + ConcurrencyLimitExceeded
    | + PoolTimeout ............ no free connection in the gateway's own pool
    + BadGateway ................. 502 bad_gateway
    | + ConnectError ............. retry condition "connect-failure"
    | + ConnectionReset .......... retry condition "reset"
    | + InvalidResponse
    + GatewayTimeout ............. 504 gateway_timeout
      + ConnectTimeout ........... retry condition "connect-failure" (never reached the upstream)
      + ReadTimeout .............. retry condition "timeout"
      + TotalTimeout

Transports translate their backend's errors into this tree at their boundary;
`error_response` turns any of them into the JSON body the client sees, in one place.
"""

from __future__ import annotations

import json

__all__ = [
    "BadGateway",
    "BadRequest",
    "ClientRequestError",
    "ConcurrencyLimitExceeded",
    "ConfigError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionReset",
    "GatewayError",
    "GatewayTimeout",
    "InvalidResponse",
    "NoServerAvailable",
    "PayloadTooLarge",
    "PoolTimeout",
    "ReadTimeout",
    "TotalTimeout",
    "UpstreamError",
    "UpstreamUnavailable",
]


class GatewayError(Exception):
    """Base class of every error the gateway raises.

    `status` and `code` are the HTTP status and the `error` field of the JSON body the
    client gets; `detail` is its `detail` text.
    """

    status: int = 500
    code: str = "internal_error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail


class ConfigError(GatewayError, ValueError):
    """An invalid configuration: every bad key found in it, one line each.

    `errors` holds the `(key path, message)` pairs in the order they were found, each
    message naming the offending value; `path` is the first one's key path. `str()` is
    one `key.path: message` line per error, so a user can fix a file in one go.
    """

    def __init__(self, path: str, message: str, *more: tuple[str, str]) -> None:
        self.errors: tuple[tuple[str, str], ...] = ((path, message), *more)
        super().__init__("\n".join(f"{where}: {text}" if where else text for where, text in self.errors))
        self.path = path

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str | tuple[str, str], ...]]:
        # `args` holds the joined text, which the constructor cannot take back.
        (path, message), *more = self.errors
        return type(self), (path, message, *more)


class ClientRequestError(GatewayError):
    """The client's request cannot be forwarded (a 4xx answer, never retried)."""

    status = 400
    code = "bad_request"


class BadRequest(ClientRequestError):
    """400 `bad_request`: an ambiguous path, invalid framing (`Content-Length`), oversized headers."""

    status = 400
    code = "bad_request"


class PayloadTooLarge(ClientRequestError):
    """413 `payload_too_large`: the request body is over `max_body_size`."""

    status = 413
    code = "payload_too_large"


class UpstreamError(GatewayError):
    """The upstream could not give a usable response.

    `retry_condition` is the `retry_on` condition the error counts as, if any;
    `reached_upstream` is False when the request certainly never reached the server, so
    that even a request that is not idempotent may be retried.
    """

    status = 502
    code = "bad_gateway"
    #: The `retry_on` condition this error is, if any.
    retry_condition: str | None = None
    #: False when the request certainly never reached the upstream server.
    reached_upstream: bool = True


class UpstreamUnavailable(UpstreamError):
    """503 `upstream_unavailable`, sent with `Retry-After: retry_after` (seconds, at least 1).

    The request was not sent: no server to send it to, or no capacity for it.
    """

    status = 503
    code = "upstream_unavailable"
    reached_upstream = False

    def __init__(self, detail: str = "", retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class NoServerAvailable(UpstreamUnavailable):
    """No server of the upstream is available (all unhealthy or ejected, and no `panic`)."""


class ConcurrencyLimitExceeded(UpstreamUnavailable):
    """The upstream already has `max_concurrent_requests` requests in flight."""


class PoolTimeout(UpstreamUnavailable):
    """The gateway's own connection pool had no free connection in time.

    The gateway's capacity, not the server's health: never counted against the server.
    """


class BadGateway(UpstreamError):
    """502 `bad_gateway`: the upstream could not be reached or gave no valid response."""

    status = 502
    code = "bad_gateway"


class ConnectError(BadGateway):
    """The connection could not be opened (refused, unreachable): retry condition `connect-failure`."""

    retry_condition = "connect-failure"
    reached_upstream = False


class ConnectionReset(BadGateway):
    """The connection closed before a full response head: retry condition `reset`."""

    retry_condition = "reset"


class InvalidResponse(BadGateway):
    """The upstream sent something that is not a valid HTTP/1.1 response: retry condition `reset`."""

    retry_condition = "reset"


class GatewayTimeout(UpstreamError):
    """504 `gateway_timeout`: a timeout ran out."""

    status = 504
    code = "gateway_timeout"
    retry_condition: str | None = "timeout"


class ConnectTimeout(GatewayTimeout):
    """`timeouts.connect` ran out: retry condition `connect-failure` (the request never left)."""

    retry_condition = "connect-failure"
    reached_upstream = False


class ReadTimeout(GatewayTimeout):
    """`timeouts.read` ran out waiting for the response head or a body chunk: retry condition `timeout`."""


class TotalTimeout(GatewayTimeout):
    """`timeouts.total` ran out: never retried, there is no time left."""

    retry_condition = None


def error_response(exc: GatewayError, request_id: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The status, headers and JSON body the client gets for `exc`."""
    status = exc.status if 400 <= exc.status < 600 else 500
    code = exc.code if status != 500 else "internal_error"
    body = json.dumps(
        {"error": code, "detail": exc.detail or code.replace("_", " "), "request_id": request_id},
        separators=(",", ":"),
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        (b"cache-control", b"no-store"),
    ]
    if isinstance(exc, UpstreamUnavailable):
        headers.append((b"retry-after", str(max(1, exc.retry_after)).encode()))
    return status, headers, body
