"""
The gateway's exceptions, one tree:

* GatewayError
  + ConfigError
  + ClientRequestError ............ the client's request is refused (4xx)
  | + BadRequest ................. 400 bad_request
  | + Unauthorized ............... 401 unauthorized (a route's auth)
  | + Forbidden .................. 403 forbidden (a route's IP rules)
  | + NotFound ................... 404 not_found (a standalone Gateway: no route matches)
  | + PayloadTooLarge ............ 413 payload_too_large
  | + RateLimited ................ 429 rate_limited (a route's rate limit)
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

Outside the tree, and not exported: `ClientDisconnected`, the relay's signal that the
client went away. No JSON answers it, and the layers and telemetry read it to tell an
abandoned request from a failed one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

__all__ = [
    "BadGateway",
    "BadRequest",
    "ClientRequestError",
    "ConcurrencyLimitExceeded",
    "ConfigError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionReset",
    "Forbidden",
    "GatewayError",
    "GatewayTimeout",
    "InvalidResponse",
    "NoServerAvailable",
    "PayloadTooLarge",
    "PoolTimeout",
    "RateLimited",
    "ReadTimeout",
    "TotalTimeout",
    "Unauthorized",
    "UpstreamError",
    "UpstreamUnavailable",
]


class GatewayError(Exception):
    """Base class of every error the gateway raises.

    `status` and `code` are the HTTP status and the `error` field of the JSON body the
    client gets; `detail` is its `detail` text, and `headers` the raw `(name, value)`
    pairs sent with it besides the usual ones.
    """

    status: int = 500
    code: str = "internal_error"
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __init__(self, detail: str = "", *, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(detail)
        self.detail = detail
        if headers:
            self.headers = tuple(headers)


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


class Unauthorized(ClientRequestError):
    """401 `unauthorized`: the route needs a valid token and the request has none.

    Sent with `WWW-Authenticate: Bearer`, plus `error="invalid_token"` when a token was
    sent but refused (RFC 6750, 3.1).
    """

    status = 401
    code = "unauthorized"

    def __init__(self, detail: str = "", *, token_sent: bool = True) -> None:
        challenge = b'Bearer error="invalid_token"' if token_sent else b"Bearer"
        super().__init__(detail, headers=((b"www-authenticate", challenge),))


class Forbidden(ClientRequestError):
    """403 `forbidden`: the client address is not allowed on the route (`allow_ips`, `deny_ips`)."""

    status = 403
    code = "forbidden"


class RateLimited(ClientRequestError):
    """429 `rate_limited`, sent with `Retry-After: retry_after` (whole seconds, at least 1)."""

    status = 429
    code = "rate_limited"

    def __init__(
        self, detail: str = "", retry_after: int = 1, *, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(detail, headers=headers)
        self.retry_after = retry_after


class NotFound(ClientRequestError):
    """404 `not_found`: no route matches, on a `Gateway` that wraps no app.

    Not exported: nothing a user calls raises it.
    """

    status = 404
    code = "not_found"


class MethodNotAllowed(ClientRequestError):
    """405 `method_not_allowed`: an admin endpoint asked with another method than its own.

    Not exported: nothing a user calls raises it.
    """

    status = 405
    code = "method_not_allowed"


class ServiceUnavailable(GatewayError):
    """503 `unavailable`: the gateway itself cannot serve this (an admin endpoint whose
    library is not installed), as opposed to `UpstreamUnavailable`.

    Not exported: nothing a user calls raises it.
    """

    status = 503
    code = "unavailable"


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


class ClientDisconnected(Exception):
    """The client went away; nothing more can be sent to it."""


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
    if isinstance(exc, UpstreamUnavailable | RateLimited):
        headers.append((b"retry-after", str(max(1, exc.retry_after)).encode()))
    if exc.headers:
        headers.extend(exc.headers)
    return status, headers, body
