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
    """Base class of every error the gateway raises."""

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
    """The client's request cannot be forwarded."""

    status = 400
    code = "bad_request"


class BadRequest(ClientRequestError):
    status = 400
    code = "bad_request"


class PayloadTooLarge(ClientRequestError):
    status = 413
    code = "payload_too_large"


class UpstreamError(GatewayError):
    """The upstream could not give a usable response."""

    status = 502
    code = "bad_gateway"
    #: The `retry_on` condition this error is, if any.
    retry_condition: str | None = None
    #: False when the request certainly never reached the upstream server.
    reached_upstream: bool = True


class UpstreamUnavailable(UpstreamError):
    status = 503
    code = "upstream_unavailable"
    reached_upstream = False

    def __init__(self, detail: str = "", retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class NoServerAvailable(UpstreamUnavailable):
    pass


class ConcurrencyLimitExceeded(UpstreamUnavailable):
    pass


class PoolTimeout(UpstreamUnavailable):
    """The gateway's own connection pool had no free connection in time.

    The gateway's capacity, not the server's health: never counted against the server.
    """


class BadGateway(UpstreamError):
    status = 502
    code = "bad_gateway"


class ConnectError(BadGateway):
    retry_condition = "connect-failure"
    reached_upstream = False


class ConnectionReset(BadGateway):
    retry_condition = "reset"


class InvalidResponse(BadGateway):
    retry_condition = "reset"


class GatewayTimeout(UpstreamError):
    status = 504
    code = "gateway_timeout"
    retry_condition: str | None = "timeout"


class ConnectTimeout(GatewayTimeout):
    retry_condition = "connect-failure"
    reached_upstream = False


class ReadTimeout(GatewayTimeout):
    pass


class TotalTimeout(GatewayTimeout):
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
