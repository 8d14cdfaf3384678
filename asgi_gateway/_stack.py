"""Composes the layers: router → retry → hedge → failover/balancer → telemetry → transport."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ._config import GatewayConfig, RouteConfig, UpstreamConfig
from ._edge.services import EdgeServices
from ._health import HealthChecker
from ._layers.balancer import make_balancer
from ._layers.concurrency import ConcurrencyLayer, GradientController, concurrency_layer
from ._layers.failover import FailoverLayer
from ._layers.hedge import hedge_layer
from ._layers.retry import InFlight, RetryBudget, RetryLayer
from ._layers.telemetry import TelemetryLayer
from ._layers.transform import Hooks, route_hooks, transform_layer
from ._telemetry import Telemetry
from ._transports.websocket import WebSocketTransport
from ._types import Handler, Server

if TYPE_CHECKING:
    from ._discovery import Discovery

__all__ = ["UpstreamStack", "build_route_handlers", "build_stacks", "make_servers"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def make_servers(upstream: UpstreamConfig, previous: Sequence[Server] = ()) -> list[Server]:
    """The servers of `upstream`; one of `previous` with the same URL and address is reused.

    A reused server keeps its live state (health, ejection, in-flight count, pooled
    connections) and takes the entry's weight, backup flag and position.
    """
    known = {(server.url, server.ip): server for server in previous}
    servers = []
    for index, spec in enumerate(upstream.servers):
        parts = urlsplit(spec.url)
        scheme = parts.scheme
        host = parts.hostname or ""
        port = parts.port or _DEFAULT_PORTS[scheme]
        netloc = f"[{host}]" if ":" in host else host
        if port != _DEFAULT_PORTS[scheme]:
            netloc = f"{netloc}:{port}"
        url = f"{scheme}://{netloc}"
        server = known.pop((url, None), None)
        if server is not None:
            server.weight = spec.weight
            server.backup = spec.backup
            server.index = index
            servers.append(server)
            continue
        servers.append(
            Server(
                url=url,
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
    #: DNS discovery (None without `discovery`): keeps `servers` what the names resolve to.
    discovery: Discovery | None = None
    #: The retry layer of `handler`: its budget and in-flight count outlive a reload.
    retry: RetryLayer | None = None
    #: The adaptive concurrency limit (None without `adaptive_concurrency`): the gateway takes
    #: a request's place in it before reading the body.
    concurrency: GradientController | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if isinstance(self.handler, ConcurrencyLayer):
            self.concurrency = self.handler.controller

    def adopt(self) -> None:
        """Once swapped in by a reload: settle what only this stack's config decides.

        A server kept from a config with health checks may have been marked down by them;
        without `health_check` now, nothing would ever mark it up again.
        """
        if self.checker is None:
            down = [server for server in self.servers if not server.healthy]
            for server in down:
                server.healthy = True
            if down:
                self.failover.refresh()

    def status(self) -> dict[str, Any]:
        status = self.failover.status()
        if self.discovery is not None:
            status.update(self.discovery.status())
        if self.concurrency is not None:
            status["adaptive_concurrency"] = self.concurrency.status()
        return status


def build_stacks(
    config: GatewayConfig,
    transport: Handler,
    telemetry: Telemetry,
    websocket_transport: Handler | None = None,
    *,
    previous: Mapping[str, UpstreamStack] | None = None,
) -> Mapping[str, UpstreamStack]:
    """The whole request path of every upstream, composed here and nowhere else.

    HTTP: adaptive concurrency (with `adaptive_concurrency` only) → retry → hedge (with
    `hedge` only) → failover/balancer → telemetry → `transport`.
    WebSocket handshakes, never hedged: the same layers over `websocket_transport` (default:
    the `websockets` client), sharing the failover layer's servers and the retry budget;
    they do not count against `max_concurrent_requests` (nor the adaptive limit), and their
    CLIENT span ends with the handshake.

    `previous` are the stacks of the config being replaced: an upstream of the same name
    reuses their servers that stay (`make_servers`, or its discovery's), their outlier
    detection history, their health checks' runs of passes and failures, the balancer's
    latency estimates (same kind), the retry budget (same budget settings), the
    `max_concurrent_requests` count and the adaptive concurrency controller (same settings).
    """
    events = telemetry.events
    wire = TelemetryLayer(transport, telemetry)
    upgrades = TelemetryLayer(websocket_transport or WebSocketTransport(), telemetry, ends_at_head=True)
    stacks: dict[str, UpstreamStack] = {}
    for name, upstream in config.upstreams.items():
        before = previous.get(name) if previous is not None else None
        servers = make_servers(upstream, before.servers if before is not None else ())
        failover = FailoverLayer(upstream, servers, make_balancer(upstream), wire, events)
        budget, in_flight = _carried_counts(upstream, before)
        attempts = hedge_layer(upstream, failover, budget, events)
        retry = RetryLayer(upstream, attempts, events, budget=budget, in_flight=in_flight)
        websocket = RetryLayer(
            upstream, failover.over(upgrades), events, budget=budget, limit_concurrency=False
        )
        http = concurrency_layer(upstream, retry, previous=before.concurrency if before is not None else None)
        checker = None
        if upstream.health_check is not None:
            checker = HealthChecker(upstream, servers, transport, failover.refresh, events)
        discovery = None
        if upstream.discovery is not None:
            from ._discovery import Discovery

            discovery = Discovery(upstream, servers, failover, checker, getattr(transport, "retire", None))
        if discovery is not None and before is not None and before.discovery is not None:
            discovery.take_over(before.discovery)
        elif before is not None:
            # Also for an upstream that gains discovery: until its first lookup its servers
            # are the ones it had, ejections and runs of health checks included.
            failover.take_over(before.failover)
            if checker is not None and before.checker is not None:
                checker.take_over(before.checker)
        stacks[name] = UpstreamStack(upstream, servers, http, websocket, failover, checker, discovery, retry)
    return stacks


def _carried_counts(upstream: UpstreamConfig, before: UpstreamStack | None) -> tuple[RetryBudget, InFlight]:
    """The retry budget and `max_concurrent_requests` count for `upstream`'s new retry layer.

    Both belong to the upstream rather than to one config (as Envoy keeps a cluster's state
    across updates that leave it be): the requests still in flight on the layer a reload
    replaces keep counting against the limit, and the retries of the last seconds against
    the budget, unless the budget's own settings changed.
    """
    retry = upstream.retry
    if before is None or before.retry is None:
        return RetryBudget(retry.budget_ratio, retry.budget_min_per_second), InFlight()
    old = before.config.retry
    budget = before.retry.budget
    if (old.budget_ratio, old.budget_min_per_second) != (retry.budget_ratio, retry.budget_min_per_second):
        budget = RetryBudget(retry.budget_ratio, retry.budget_min_per_second)
    return budget, before.retry.slots


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
