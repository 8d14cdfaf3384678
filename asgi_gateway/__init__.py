"""asgi_gateway: a highly available API gateway for Starlette and FastAPI apps.

Forward the routes you configure to upstream servers through a balancer,
failover (health checks, outlier ejection, backups) and retries, with
OpenTelemetry traces and metrics. Everything else reaches your app untouched.
"""

from ._config import (
    AuthConfig,
    GatewayConfig,
    HealthCheckConfig,
    JwtConfig,
    OutlierDetectionConfig,
    RateLimitConfig,
    RedisConfig,
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
    Forbidden,
    GatewayError,
    GatewayTimeout,
    InvalidResponse,
    NoServerAvailable,
    PayloadTooLarge,
    PoolTimeout,
    RateLimited,
    ReadTimeout,
    TotalTimeout,
    Unauthorized,
    UpstreamError,
    UpstreamUnavailable,
)
from ._middleware import Gateway, GatewayMiddleware
from ._telemetry import JsonFormatter
from ._transports.httpx import HttpxTransport
from ._types import Handler, Request, RequestBody, Response, Server, Transport

__version__ = "0.1.0"

__all__ = [
    "AuthConfig",
    "BadGateway",
    "BadRequest",
    "ClientRequestError",
    "ConcurrencyLimitExceeded",
    "ConfigError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionReset",
    "Forbidden",
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
    "JwtConfig",
    "NoServerAvailable",
    "OutlierDetectionConfig",
    "PayloadTooLarge",
    "PoolTimeout",
    "RateLimitConfig",
    "RateLimited",
    "ReadTimeout",
    "RedisConfig",
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
    "Unauthorized",
    "UpstreamConfig",
    "UpstreamError",
    "UpstreamUnavailable",
    "__version__",
    "load_config",
]
