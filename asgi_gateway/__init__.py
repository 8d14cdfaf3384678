"""asgi_gateway: a highly available API gateway for Starlette and FastAPI apps.

Forward the routes you configure to upstream servers through a balancer,
failover (health checks, outlier ejection, backups) and retries, with
OpenTelemetry traces and metrics. Everything else reaches your app untouched.
"""

from ._config import (
    GatewayConfig,
    HealthCheckConfig,
    OutlierDetectionConfig,
    RetryConfig,
    RouteConfig,
    ServerConfig,
    TimeoutsConfig,
    UpstreamConfig,
    load_config,
)
from ._exceptions import (
    BadGateway,
    BadRequest,
    ClientRequestError,
    ConcurrencyLimitExceeded,
    ConfigError,
    ConnectError,
    ConnectionReset,
    ConnectTimeout,
    GatewayError,
    GatewayTimeout,
    InvalidResponse,
    NoServerAvailable,
    PayloadTooLarge,
    PoolTimeout,
    ReadTimeout,
    TotalTimeout,
    UpstreamError,
    UpstreamUnavailable,
)
from ._middleware import Gateway, GatewayMiddleware
from ._telemetry import JsonFormatter
from ._transports.httpx import HttpxTransport
from ._types import Handler, Request, RequestBody, Response, Server, Transport

__version__ = "0.1.0"

__all__ = [
    "BadGateway",
    "BadRequest",
    "ClientRequestError",
    "ConcurrencyLimitExceeded",
    "ConfigError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionReset",
    "Gateway",
    "GatewayConfig",
    "GatewayError",
    "GatewayMiddleware",
    "GatewayTimeout",
    "Handler",
    "HealthCheckConfig",
    "HttpxTransport",
    "InvalidResponse",
    "JsonFormatter",
    "NoServerAvailable",
    "OutlierDetectionConfig",
    "PayloadTooLarge",
    "PoolTimeout",
    "ReadTimeout",
    "Request",
    "RequestBody",
    "Response",
    "RetryConfig",
    "RouteConfig",
    "Server",
    "ServerConfig",
    "TimeoutsConfig",
    "TotalTimeout",
    "Transport",
    "UpstreamConfig",
    "UpstreamError",
    "UpstreamUnavailable",
    "__version__",
    "load_config",
]
