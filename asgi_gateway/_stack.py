"""Composes the layers: router → retry → failover/balancer → telemetry → transport."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ._config import GatewayConfig, UpstreamConfig
from ._health import HealthChecker
from ._layers.balancer import make_balancer
from ._layers.failover import FailoverLayer
from ._layers.retry import RetryLayer
from ._telemetry import Telemetry
from ._types import Handler, Server

__all__ = ["UpstreamStack", "build_stacks", "make_servers"]

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
    wire = telemetry.client_layer(transport)
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
