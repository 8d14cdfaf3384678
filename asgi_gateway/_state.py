"""Everything the gateway builds from one config, as one object: swapped whole on reload.

A request reads the gateway's state once, when it arrives, and keeps that object to its
end: its route, its upstream's layers and its retries all come from the config it
arrived under, however many reloads happen meanwhile. A reload builds the next state
off to the side (validating everything, opening nothing) and swaps it in with one
assignment; what the two share is carried over here:

- a server of the same upstream with the same URL and address is the same `Server`
  object, with its health verdict, ejection state, in-flight count and pooled
  connections; outlier detection's failure history goes along with it;
- a route's rate limiter with the same settings and scope keeps its counts, and the
  Redis connection and JWKS caches are taken over when their settings stay;
- servers no longer in any upstream are retired: they take no new requests, and their
  connections close as each one's last request ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc

from ._admin import Admin
from ._admin_stats import ServerStats
from ._config import GatewayConfig
from ._edge.services import EdgeServices
from ._layers.transform import Hooks
from ._proxy import TrustedProxies
from ._routing import Router
from ._stack import UpstreamStack, build_route_handlers, build_stacks
from ._telemetry import Telemetry
from ._types import Handler, Server

__all__ = ["GatewayState", "build_state"]


@dataclass(slots=True, eq=False)
class GatewayState:
    """One config's router, layers and background work; never changed once built."""

    config: GatewayConfig
    #: 1 for the config the gateway started with, one more per successful reload.
    version: int
    sha256: str
    loaded_at: str
    router: Router
    trusted: TrustedProxies
    needs_host: bool
    status_path: bytes | None
    admin: Admin | None
    stacks: Mapping[str, UpstreamStack]
    edge: EdgeServices
    #: Each route's handler of HTTP requests and of WebSocket handshakes, by route index.
    route_handlers: tuple[Handler, ...]
    websocket_handlers: tuple[Handler, ...]
    #: The scope of this state's background work (health checks, JWKS refresh), once it runs.
    _background: anyio.CancelScope | None = None
    _stopped: bool = False

    def stop(self) -> None:
        """End this state's background work: it has been replaced."""
        self._stopped = True
        if self._background is not None:
            self._background.cancel()

    def adopt(self) -> None:
        """Once this state is the gateway's (a reload swapped it in): what it shares with the
        state it replaced is its own now."""
        self.edge.take_over()
        for stack in self.stacks.values():
            stack.adopt()

    def watch_servers(self) -> None:
        """Keep the admin page's per-server figures for this state's servers while admin is
        on; drop them (and their cost on the request path) when it is off."""
        on = self.admin is not None
        for stack in self.stacks.values():
            for server in stack.failover.servers:
                if on and server.stats is None:
                    server.stats = ServerStats()
                elif not on:
                    server.stats = None

    def servers(self) -> set[Server]:
        return {server for stack in self.stacks.values() for server in stack.servers}

    def config_status(self) -> dict[str, Any]:
        return {"version": self.version, "sha256": self.sha256, "loaded_at": self.loaded_at}

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """This state's background work, until `background` is cancelled.

        Tells `task_status` once what must come before serving has (the first JWKS fetches).
        """
        if self._stopped:
            task_status.started()
            return
        with anyio.CancelScope() as self._background:
            async with anyio.create_task_group() as tg:
                for stack in self.stacks.values():
                    if stack.checker is not None:
                        tg.start_soon(stack.checker.run, name=f"health check {stack.config.name}")
                discoveries = [
                    stack.discovery for stack in self.stacks.values() if stack.discovery is not None
                ]
                if discoveries:
                    from ._discovery import run_discovery

                    # The first DNS lookups (side by side, each within its timeout) before serving.
                    await tg.start(run_discovery, discoveries, name="discovery")
                if self.edge.active:
                    await tg.start(self.edge.run, name="edge protection")
                task_status.started()
        # Cancelled before it started (a reload right away): the caller must not wait forever.
        with contextlib.suppress(RuntimeError):
            task_status.started()


def build_state(
    config: GatewayConfig,
    sha256: str,
    transport: Handler,
    telemetry: Telemetry,
    hooks: Mapping[str, Hooks] | None,
    previous: GatewayState | None = None,
) -> GatewayState:
    """Build every part of `config`'s state, taking over what `previous` shares with it.

    Raises `ConfigError` for what only building finds (a PEM key that does not parse);
    `previous` is then left as it was.
    """
    trusted = TrustedProxies(config.trusted_proxies)
    router = Router(config)
    stacks = build_stacks(config, transport, telemetry, previous=previous.stacks if previous else None)
    edge = EdgeServices(config.redis, previous=previous.edge if previous else None)
    route_handlers, websocket_handlers = build_route_handlers(config, stacks, telemetry, edge, hooks)
    # Only now that nothing can fail: a reload that raises must leave the gauge on the
    # limits that keep serving.
    for name, stack in stacks.items():
        if stack.concurrency is not None:
            telemetry.concurrency_limits[name] = stack.concurrency
    return GatewayState(
        config=config,
        version=previous.version + 1 if previous is not None else 1,
        sha256=sha256,
        loaded_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        router=router,
        trusted=trusted,
        needs_host=any(route.host is not None for route in router.routes),
        status_path=config.status_path.encode() if config.status_path else None,
        admin=Admin(config.admin, trusted) if config.admin.path is not None else None,
        stacks=stacks,
        edge=edge,
        route_handlers=route_handlers,
        websocket_handlers=websocket_handlers,
    )


def removed_servers(old: GatewayState, new: GatewayState) -> Iterable[Server]:
    """The servers of `old` that `new` no longer has."""
    kept = new.servers()
    return [server for server in old.servers() if server not in kept]
