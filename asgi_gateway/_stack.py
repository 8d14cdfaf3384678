"""Composes the layers: router → retry → failover/balancer → telemetry → transport."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from ._config import GatewayConfig, RouteConfig, UpstreamConfig
from ._edge.services import EdgeServices
from ._health import HealthChecker
from ._layers.balancer import make_balancer
from ._layers.failover import FailoverLayer
from ._layers.retry import RetryLayer
from ._layers.telemetry import TelemetryLayer
from ._layers.transform import Hooks, route_hooks, transform_layer
from ._telemetry import Telemetry
from ._transports.websocket import WebSocketTransport
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
    """One upstream's layers, and the background work that goes with them.

    `handler` takes the upstream's HTTP requests, `websocket` its WebSocket handshakes: the
    same failover (servers, health, balancer) and retry budget over another transport.
    """

    config: UpstreamConfig
    servers: list[Server]
    handler: Handler
    websocket: Handler
    failover: FailoverLayer
    checker: HealthChecker | None

    def status(self) -> dict[str, Any]:
        return self.failover.status()


def build_stacks(
    config: GatewayConfig,
    transport: Handler,
    telemetry: Telemetry,
    websocket_transport: Handler | None = None,
) -> Mapping[str, UpstreamStack]:
    """The whole request path of every upstream, composed here and nowhere else.

    HTTP: retry → failover/balancer → telemetry → `transport`. WebSocket handshakes: the
    same layers over `websocket_transport` (default: the `websockets` client), sharing
    the failover layer's servers and the retry budget; they do not count against
    `max_concurrent_requests`, and their CLIENT span ends with the handshake.
    """
    events = telemetry.events
    wire = TelemetryLayer(transport, telemetry)
    upgrades = TelemetryLayer(websocket_transport or WebSocketTransport(), telemetry, ends_at_head=True)
    stacks: dict[str, UpstreamStack] = {}
    for name, upstream in config.upstreams.items():
        servers = make_servers(upstream)
        failover = FailoverLayer(upstream, servers, make_balancer(upstream), wire, events)
        handler = RetryLayer(upstream, failover, events)
        websocket = RetryLayer(
            upstream, failover.over(upgrades), events, budget=handler.budget, limit_concurrency=False
        )
        checker = None
        if upstream.health_check is not None:
            checker = HealthChecker(upstream, servers, transport, failover.refresh, events)
        stacks[name] = UpstreamStack(upstream, servers, handler, websocket, failover, checker)
    return stacks


def build_route_handlers(
    config: GatewayConfig,
    stacks: Mapping[str, UpstreamStack],
    telemetry: Telemetry,
    edge: EdgeServices,
    hooks: Mapping[str, Hooks] | None = None,
) -> tuple[tuple[Handler, ...], tuple[Handler, ...]]:
    """Each route's HTTP and WebSocket handshake handlers, by route index: IP rules → auth →
    rate limit → transformation (header rules, `Forwarded`, hooks) → its upstream's stack.

    A route without edge keys gets its upstream's handlers themselves: nothing in between.
    Both kinds go through the same layer objects' state (one limiter, one verifier).
    """
    http: list[Handler] = []
    websocket: list[Handler] = []
    by_route = route_hooks(config, hooks)
    for index, route in enumerate(config.routes):
        where = f"routes[{index}]"
        stack = stacks[route.upstream]
        layers: list[Callable[[Handler], Handler]] = []
        layers.append(partial(transform_layer, config=config, index=index, hooks=by_route[index]))
        if route.rate_limit is not None:
            from ._layers.ratelimit import RateLimitLayer

            limit = route.rate_limit
            limiter = edge.limiter(limit, _scope(route))
            on_error = config.redis.on_error if config.redis is not None else "allow"
            layers.append(
                partial(
                    RateLimitLayer,
                    limiter=limiter,
                    config=limit,
                    route=route.path,
                    telemetry=telemetry,
                    on_error=on_error,
                )
            )
        if route.auth is not None and route.auth.jwt is not None:
            from ._layers.auth import AuthLayer

            jwt = route.auth.jwt
            verifier = edge.verifier(jwt, f"{where}.auth.jwt")
            layers.append(partial(AuthLayer, verifier=verifier, config=jwt))
        if route.allow_ips is not None or route.deny_ips:
            from ._edge.ip_rules import IpRules
            from ._layers.ip_rules import IpRulesLayer

            layers.append(partial(IpRulesLayer, rules=IpRules(route.allow_ips, route.deny_ips)))
        handlers = [stack.handler, stack.websocket]
        for layer in layers:
            handlers = [layer(handler) for handler in handlers]
        http.append(handlers[0])
        websocket.append(handlers[1])
    return tuple(http), tuple(websocket)


def _scope(route: RouteConfig) -> str:
    """The route's name in shared rate-limit keys: the same in every process with this route."""
    scope = route.path if route.host is None else f"{route.host}{route.path}"
    return scope if route.methods is None else f"{scope}|{','.join(sorted(route.methods))}"
