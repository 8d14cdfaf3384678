"""Failover: send each attempt to an available server, primaries first.

A server is *available* when its active health check passes (if configured) and
passive outlier detection has not ejected it. Requests go to the available
primaries; to the available backups only while no primary is available, or as the
last resort of a retry that has already tried every available primary; and, when
nothing at all is available, to every server if the upstream opts into `panic`,
else nowhere: `NoServerAvailable` (503) at once.

Passive outlier detection: this layer counts each server's consecutive gateway failures,
and at `consecutive_failures` `outlier.Outliers` ejects it (or not) and for how long; the
rules are told there. An ejection ends lazily, on the first pick after its time.

The available set is cached and rebuilt only when a server changes state, so a
pick costs the balancer's work and one clock read.

The server set can change while the layer serves (`set_servers`, for DNS discovery), and a
new layer can take over a previous one's state for the servers both have (`take_over`, for
a reload). A server that leaves is picked no more; requests in flight on it finish, and the
status view shows it as `draining` until the last one has.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from .._config import UpstreamConfig
from .._exceptions import NoServerAvailable, UpstreamError
from .._types import NULL_EVENTS, Exchange, GatewayEvents, Handler, Request, Response, Server
from .balancer import Balancer, make_balancer
from .outlier import FAILURE_CONDITIONS, FAILURE_STATUSES, Outliers

__all__ = ["FailoverLayer"]

logger = logging.getLogger("asgi_gateway.health")

Group = Literal["primary", "backup", "panic"]


class _Attempt:
    """Runs when an attempt's response is closed: release the server, judge the body."""

    __slots__ = ("exchange", "judged", "layer", "server", "started")

    def __init__(
        self, layer: FailoverLayer, server: Server, exchange: Exchange, judged: bool, started: float
    ) -> None:
        self.layer = layer
        self.server = server
        self.exchange = exchange
        self.judged = judged
        self.started = started

    def __call__(self, response: Response, error: BaseException | None) -> None:
        server = self.server
        server.in_flight -= 1
        stats = server.stats
        if stats is not None:
            # The admin page's figures: kept only while the admin endpoints are on.
            stats.record(self.layer._clock() - self.started, error is not None or response.status >= 500)
        if self.judged:
            return
        if error is None:
            self.server.consecutive_failures = 0
        elif isinstance(error, UpstreamError) and error.retry_condition in FAILURE_CONDITIONS:
            self.layer._failure(self.server, f"body {error.retry_condition}", self.exchange)
        # Anything else (the client went away, a cancellation) says nothing about the server.


def _observer(*balancers: Balancer | None) -> Callable[[Server, float, bool], None] | None:
    """What reports an attempt's time to its response head to the balancers that want it."""
    observers = [
        balancer.observe for balancer in balancers if balancer is not None and balancer.measures_latency
    ]
    if len(observers) <= 1:
        return observers[0] if observers else None

    def observe_all(server: Server, seconds: float, failed: bool) -> None:
        for observe in observers:
            observe(server, seconds, failed)

    return observe_all


class _Over(Handler):
    """`FailoverLayer.over(inner)`: the layer's failover, over another inner handler."""

    __slots__ = ("_inner", "_layer")

    def __init__(self, layer: FailoverLayer, inner: Handler) -> None:
        self._layer = layer
        self._inner = inner

    def handle_request(self, request: Request) -> Awaitable[Response]:
        return self._layer._attempt(request, self._inner)

    async def aclose(self) -> None:
        await self._inner.aclose()


class FailoverLayer(Handler):
    """Chooses the server for each attempt and keeps broken servers out of rotation.

    `servers` are the upstream's live `Server` objects, shared with the health
    checker (which calls `refresh()` after it changes one) and the balancer.
    `backup_balancer` picks among the backups when a retry falls back to them while
    primaries are still available; by default one is made like the main one.
    `set_servers` replaces the set in place; `take_over` carries a previous layer's state over.
    """

    def __init__(
        self,
        upstream: UpstreamConfig,
        servers: Sequence[Server],
        balancer: Balancer,
        inner: Handler,
        events: GatewayEvents = NULL_EVENTS,
        clock: Callable[[], float] = time.monotonic,
        *,
        backup_balancer: Balancer | None = None,
    ) -> None:
        self._upstream = upstream
        self._name = upstream.name
        self._servers = tuple(servers)
        #: Servers removed by `set_servers` with requests still in flight, for the status view.
        self._draining: list[Server] = []
        self._balancer = balancer
        self._inner = inner
        self._events = events
        self._clock = clock
        self._outlier = upstream.outlier_detection
        self._outliers = Outliers(self._name, self._outlier, self._servers, events)
        # The outliers' own set and failure history, never rebound: read on every rebuild and
        # written on every failure, one attribute away.
        self._ejected = self._outliers.ejected
        self._failures = self._outliers.failures
        if backup_balancer is None and any(server.backup for server in self._servers):
            backup_balancer = make_balancer(upstream)
        self._backup_balancer = backup_balancer
        # Only a balancer that learns from latency (peak_ewma) costs a second clock read per attempt.
        self._observe = _observer(balancer, backup_balancer)
        #: Soonest end of an ejection; a pick at or after it readmits.
        self._next_expiry = math.inf
        self._group: Group | None = None
        self._primaries: list[Server] = []
        self._backups: list[Server] = []
        self._available = -1
        self._recompute(self._clock())

    def handle_request(self, request: Request) -> Awaitable[Response]:
        # `_attempt`'s coroutine itself: this layer adds no coroutine of its own to resume
        # at each wake-up of the exchange.
        return self._attempt(request, self._inner)

    def over(self, inner: Handler) -> Handler:
        """This layer's failover (servers, health, balancer, outlier detection), with each
        attempt sent through `inner` instead of this layer's own inner handler.

        For attempts that do not go through the HTTP transport (a WebSocket handshake): the
        server is chosen, counted in flight until the response is closed, and judged by
        outlier detection exactly as a request's attempt is.
        """
        return _Over(self, inner)

    async def _attempt(self, request: Request, inner: Handler) -> Response:
        exchange = request.exchange
        started = self._clock()
        if started >= self._next_expiry:
            self._readmit(started)
        server = self._pick(request, exchange)
        request.server = server
        exchange.server = server
        exchange.tried.append(server)
        server.in_flight += 1
        try:
            response = await inner.handle_request(request)
        except BaseException as exc:
            server.in_flight -= 1
            if server.stats is not None:
                server.stats.record(self._clock() - started, True)
            if isinstance(exc, UpstreamError) and exc.retry_condition in FAILURE_CONDITIONS:
                self._failure(server, exc.retry_condition or "", exchange)
                if self._observe is not None:
                    self._observe(server, self._clock() - started, True)
            raise
        failed = response.status in FAILURE_STATUSES
        if failed:
            self._failure(server, str(response.status), exchange)
        if self._observe is not None:
            self._observe(server, self._clock() - started, failed)
        response.on_close(_Attempt(self, server, exchange, failed, started))
        if response.server is None:
            response.server = server
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def servers(self) -> tuple[Server, ...]:
        """The upstream's current servers (what `set_servers` last set)."""
        return self._servers

    def set_servers(self, servers: Sequence[Server]) -> list[Server]:
        """Make `servers` the upstream's server set, in place; returns the servers removed.

        Servers are matched by identity: one that stays (the same `Server` object) keeps
        everything, its health verdict, ejection, failure history and place in the
        balancer's state; a new one starts as the `Server` object says (a fresh one:
        healthy, never ejected). A removed one is picked no more, from now on; requests
        already on it finish normally, and the status view lists it as `draining` while
        any is in flight. Hand the removed servers to the transport's `retire` next, so
        that their connections close as their last requests end; and give the health
        checker the same set (`HealthChecker.set_servers`).
        """
        new = tuple(servers)
        kept = set(new)
        removed = [server for server in self._servers if server not in kept]
        self._servers = new
        self._outliers.set_servers(new, removed)
        self._draining = [
            server for server in (*self._draining, *removed) if server.in_flight > 0 and server not in kept
        ]
        self._after_set_change()
        return removed

    def take_over(self, previous: FailoverLayer) -> list[Server]:
        """Carry `previous`'s state over for the servers this layer shares with it; returns the
        servers of `previous` that this layer does not have.

        For a reload that builds a new layer over some of the same `Server` objects (same
        upstream name and URL): what lives on the `Server` (health verdict, ejection
        time and count, consecutive failures, requests in flight) goes along by itself;
        this adds what `previous` keeps of its own: which of them are ejected now and their
        recent failure history, and what a balancer of the same kind learned of them
        (`peak_ewma`'s latency estimates, shared with `previous`'s from now on). Only reads
        `previous`, which serves on until the swap; the servers returned are the ones to
        `retire` once it is done.
        """
        now = self._clock()
        self._outliers.take_over(previous._outliers, self._servers)
        self._balancer.take_over(previous._balancer, self._servers)
        if self._backup_balancer is not None and previous._backup_balancer is not None:
            self._backup_balancer.take_over(previous._backup_balancer, self._servers)
        self._recompute(now)
        mine = set(self._servers)
        return [server for server in previous._servers if server not in mine]

    def _after_set_change(self) -> None:
        if self._backup_balancer is None and any(server.backup for server in self._servers):
            self._backup_balancer = make_balancer(self._upstream)
            self._observe = _observer(self._balancer, self._backup_balancer)
        now = self._clock()
        if now >= self._next_expiry:
            self._readmit(now)
        else:
            self._recompute(now)

    def untried_available(self, exchange: Exchange) -> bool:
        """Whether a server that `exchange` has not tried yet could take its next attempt.

        O(servers): for the hedge layer, once per hedge it is about to send, not per request.
        """
        tried = exchange.tried
        group = self._group
        if group == "primary":
            candidates: Sequence[Server] = [*self._primaries, *self._backups]
        elif group == "backup":
            candidates = self._backups
        elif group == "panic":
            candidates = [server for server in self._servers if not server.drained]
        else:
            return False
        return any(server not in tried for server in candidates)

    def refresh(self) -> None:
        """Rebuild the available set after a server's health changed (the health checker's `on_change`)."""
        now = self._clock()
        if now >= self._next_expiry:
            self._readmit(now)
        else:
            self._recompute(now)

    def status(self) -> dict[str, Any]:
        """A JSON-able view of the upstream and each of its servers."""
        now = self._clock()
        if now >= self._next_expiry:
            self._readmit(now)
        wall = time.time()
        check = self._upstream.health_check
        hedge = self._upstream.hedge
        servers = []
        self._draining = [server for server in self._draining if server.in_flight > 0]
        for server in (*self._servers, *self._draining):
            ejected = server in self._ejected
            remaining = server.ejected_until - now if ejected else None
            recent, last_failure = self._outliers.recent(server, now)
            server.recent_failures = recent
            draining = server in self._draining
            if draining:
                state = "draining"
            elif server.drained:
                state = "drained"
            elif ejected:
                state = "ejected"
            elif not server.healthy:
                state = "unhealthy"
            else:
                state = "healthy"
            servers.append(
                {
                    "url": server.url,
                    "address": server.address,
                    "backup": server.backup,
                    "weight": server.weight,
                    "state": state,
                    "index": server.index,
                    "available": not ejected and server.healthy and not draining and not server.drained,
                    "drained": server.drained,
                    "healthy": server.healthy,
                    "ejected": ejected,
                    "ejected_for": round(remaining, 3) if remaining is not None else None,
                    "ejected_until": (
                        datetime.fromtimestamp(wall + remaining, UTC).isoformat(timespec="milliseconds")
                        if remaining is not None
                        else None
                    ),
                    "ejections": server.ejections,
                    "in_flight": server.in_flight,
                    "consecutive_failures": server.consecutive_failures,
                    "recent_failures": recent,
                    "last_failure": last_failure,
                    "last_check": (
                        {
                            "result": server.last_check[0],
                            "latency": round(server.last_check[1], 6),
                            "at": datetime.fromtimestamp(server.last_check[2], UTC).isoformat(
                                timespec="milliseconds"
                            ),
                        }
                        if server.last_check is not None
                        else None
                    ),
                    **(server.stats.summary() if server.stats is not None else {}),
                }
            )
        return {
            "upstream": self._name,
            "mode": self._group or "unavailable",
            "balancer": self._upstream.balancer,
            "available": len(self._primaries) + len(self._backups),
            "health_check": (
                {"path": check.path, "interval": check.interval, "timeout": check.timeout}
                if check is not None
                else None
            ),
            "outlier_detection": self._outliers.view(),
            "panic": self._upstream.panic,
            "hedge": {"delay": hedge.delay, "max_extra": hedge.max_extra} if hedge is not None else None,
            "servers": servers,
        }

    # -- choosing -------------------------------------------------------------------

    def _pick(self, request: Request, exchange: Exchange) -> Server:
        group = self._group
        if group is None:
            raise NoServerAvailable(
                f"no server of upstream {self._name!r} is available", retry_after=self._retry_after()
            )
        tried = exchange.tried
        server = self._balancer.pick(request, exclude=tried)
        if server is None:  # pragma: no cover - a balancer with servers always picks one
            raise NoServerAvailable(f"no server of upstream {self._name!r} is available")
        if group != "primary":
            self._events.failover(exchange, group)
        elif (
            tried
            and self._backups
            and self._backup_balancer is not None
            and all(primary in tried for primary in self._primaries)
        ):
            # NGINX's next-upstream: this request has had every available primary; let a backup try.
            backup = self._backup_balancer.pick(request, exclude=tried)
            if backup is not None:
                self._events.failover(exchange, "backup")
                server = backup
        return server

    def _retry_after(self) -> int:
        wait = self._next_expiry - self._clock()
        if not math.isfinite(wait):
            check = self._upstream.health_check
            # Only active checks can bring servers back: wait for one to pass its threshold.
            wait = check.interval * check.healthy_threshold if check is not None else 1.0
        return max(1, math.ceil(wait))

    # -- state changes --------------------------------------------------------------

    def _recompute(self, now: float) -> None:
        primaries: list[Server] = []
        backups: list[Server] = []
        soonest = math.inf
        for server in self._servers:
            if server in self._ejected:
                soonest = min(soonest, server.ejected_until)
            elif server.healthy and not server.drained:
                (backups if server.backup else primaries).append(server)
        self._next_expiry = soonest
        group: Group | None
        if primaries:
            group, members = "primary", primaries
        elif backups:
            group, members = "backup", backups
        elif self._upstream.panic and any(not server.drained for server in self._servers):
            # Panic sends to every server but those an operator drained.
            group, members = "panic", [server for server in self._servers if not server.drained]
        else:
            group, members = None, []
        self._primaries = primaries
        self._backups = backups
        self._balancer.set_servers(members)
        if self._backup_balancer is not None:
            self._backup_balancer.set_servers(backups)
        if group != self._group:
            self._log_group(self._group, group)
            self._group = group
        available = len(primaries) + len(backups)
        if available != self._available:
            self._available = available
            self._events.available_changed(self._name, available)

    def _log_group(self, old: Group | None, new: Group | None) -> None:
        extra = {"upstream": self._name, "server": None}
        if new == "primary":
            if old is not None:
                logger.info(
                    "upstream %r: primaries available again, traffic returns to them",
                    self._name,
                    extra={**extra, "reason": "failback"},
                )
        elif new == "backup":
            logger.warning(
                "upstream %r: no primary server available, failing over to backups",
                self._name,
                extra={**extra, "reason": "failover"},
            )
        elif new == "panic":
            logger.warning(
                "upstream %r: no server available, panic mode sends to all servers",
                self._name,
                extra={**extra, "reason": "panic"},
            )
        else:
            logger.warning(
                "upstream %r: no server available, answering 503",
                self._name,
                extra={**extra, "reason": "unavailable"},
            )

    def _readmit(self, now: float) -> None:
        self._outliers.readmit(now)
        self._recompute(now)

    def _failure(self, server: Server, reason: str, exchange: Exchange | None) -> None:
        now = self._clock()
        failures = self._failures.get(server)
        if failures is None:
            # Removed from the set while this request was on it: nothing left to judge.
            return
        failures.times.append(now)
        failures.last_reason = reason
        outlier = self._outlier
        if outlier is None:
            return
        if now >= self._next_expiry:
            self._readmit(now)
        if server in self._ejected:
            # Answers still coming back from before the ejection do not extend it.
            return
        server.consecutive_failures += 1
        if server.consecutive_failures < outlier.consecutive_failures:
            return
        if self._outliers.eject(server, reason, exchange, now):
            self._recompute(now)
