"""Composes the layers: router → retry → failover/balancer → telemetry → transport."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ._config import GatewayConfig, RouteConfig, UpstreamConfig
from ._edge.services import EdgeServices
from ._health import HealthChecker
from ._layers.balancer import make_balancer
from ._layers.failover import FailoverLayer
from ._layers.retry import RetryLayer
from ._layers.telemetry import TelemetryLayer
from ._telemetry import Telemetry
from ._types import Handler, Server

__all__ = ["UpstreamStack", "build_route_handlers", "build_stacks", "make_servers"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def make_servers(upstream: UpstreamConfig) -> list[Server]:
    servers = []
    for index, spec in enumerate(upstream.servers):
        parts = urlsplit(spec.url)
        scheme = parts.scheme
        host = parts.hostname or ""
        port = parts.port or _DEFAULT_PORTS[scheme]
        netloc = f"[{host}]" if ":" in host else host
        if port != _DEFAULT_PORTS[scheme]:
            netloc = f"{netloc}:{port}"
        servers.append(
            Server(
                url=f"{scheme}://{netloc}",
                scheme=scheme,
                host=host,
                port=port,
                weight=spec.weight,
                backup=spec.backup,
                index=index,
                upstream=upstream.name,
                host_header=netloc.encode("idna" if not netloc.isascii() else "ascii"),
            )
        )
    return servers


@dataclass(slots=True)
class UpstreamStack:
    """One upstream's layers, and the background work that goes with them."""

    config: UpstreamConfig
    servers: list[Server]
    handler: Handler
    failover: FailoverLayer
    checker: HealthChecker | None

    def status(self) -> dict[str, Any]:
        return self.failover.status()


def build_stacks(
    config: GatewayConfig, transport: Handler, telemetry: Telemetry
) -> Mapping[str, UpstreamStack]:
    """The whole request path of every upstream, composed here and nowhere else."""
    events = telemetry.events
    wire = TelemetryLayer(transport, telemetry)
    stacks: dict[str, UpstreamStack] = {}
    for name, upstream in config.upstreams.items():
        servers = make_servers(upstream)
        failover = FailoverLayer(upstream, servers, make_balancer(upstream), wire, events)
        handler = RetryLayer(upstream, failover, events)
        checker = None
        if upstream.health_check is not None:
            checker = HealthChecker(upstream, servers, transport, failover.refresh, events)
        stacks[name] = UpstreamStack(upstream, servers, handler, failover, checker)
    return stacks


def build_route_handlers(
    config: GatewayConfig, stacks: Mapping[str, UpstreamStack], telemetry: Telemetry, edge: EdgeServices
) -> tuple[Handler, ...]:
    """Each route's handler, by route index: IP rules → auth → rate limit → its upstream's stack.

    A route without edge keys gets its upstream's handler itself: nothing in between.
    """
    handlers: list[Handler] = []
    for index, route in enumerate(config.routes):
        where = f"routes[{index}]"
        handler = stacks[route.upstream].handler
        if route.rate_limit is not None:
            from ._layers.ratelimit import RateLimitLayer

            limiter = edge.limiter(route.rate_limit, _scope(route))
            on_error = config.redis.on_error if config.redis is not None else "allow"
            handler = RateLimitLayer(handler, limiter, route.rate_limit, route.path, telemetry, on_error)
        if route.auth is not None and route.auth.jwt is not None:
            from ._layers.auth import AuthLayer

            jwt = route.auth.jwt
            handler = AuthLayer(handler, edge.verifier(jwt, f"{where}.auth.jwt"), jwt)
        if route.allow_ips is not None or route.deny_ips:
            from ._edge.ip_rules import IpRules
            from ._layers.ip_rules import IpRulesLayer

            handler = IpRulesLayer(handler, IpRules(route.allow_ips, route.deny_ips))
        handlers.append(handler)
    return tuple(handlers)


def _scope(route: RouteConfig) -> str:
    """The route's name in shared rate-limit keys: the same in every process with this route."""
    scope = route.path if route.host is None else f"{route.host}{route.path}"
    return scope if route.methods is None else f"{scope}|{','.join(sorted(route.methods))}"
