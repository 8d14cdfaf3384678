"""Traces, metrics and the access log for proxied requests."""

from __future__ import annotations

import logging
import time
from typing import Any

from ._routing import Route
from ._types import Exchange, GatewayEvents, Handler

__all__ = ["Telemetry"]

access_logger = logging.getLogger("asgi_gateway.access")


class Telemetry:
    """Everything the gateway reports about a request, in one place."""

    def __init__(self, tracer_provider: Any = None, meter_provider: Any = None) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.events = GatewayEvents()

    def client_layer(self, inner: Handler) -> Handler:
        """The layer that wraps each attempt on the wire."""
        return inner

    def start(self, scope: dict[str, Any], route: Route, exchange: Exchange) -> float:
        """Called when a request matched `route`; returns a token for `finish`."""
        return time.perf_counter()

    def finish(self, token: float, exchange: Exchange, status: int, error: BaseException | None) -> None:
        """Called once the exchange is over."""
        if not access_logger.isEnabledFor(logging.INFO):
            return
        duration = time.perf_counter() - token
        server = exchange.server.url if exchange.server is not None else None
        access_logger.info(
            "%s %s %s %d %.1fms",
            exchange.route,
            exchange.path,
            server or "-",
            status,
            duration * 1000,
            extra={
                "route": exchange.route,
                "upstream": exchange.upstream.name,
                "server": server,
                "path": exchange.path,
                "status": status,
                "attempts": exchange.attempts,
                "duration": duration,
                "request_id": exchange.request_id,
                "error": type(error).__name__ if error is not None else None,
            },
        )
