"""Active health checks: one background loop per upstream, started by the lifespan.

Every `interval` (with a little jitter, so that many gateways do not probe in step)
each server of the upstream gets a `GET health_check.path`, all of them at once,
each bounded by `timeout`. A 2xx or 3xx answer passes. A server changes state only
after `healthy_threshold` passes in a row (down to up) or `unhealthy_threshold`
failures in a row (up to down), so one slow answer does not flap it. Servers start
healthy. Passive outlier detection lives in the failover layer.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Final

import anyio

from ._config import HealthCheckConfig, UpstreamConfig
from ._exceptions import UpstreamError
from ._types import NULL_EVENTS, Exchange, GatewayEvents, Handler, Request, RequestBody, Server

__all__ = ["HealthChecker"]

logger = logging.getLogger("asgi_gateway.health")

USER_AGENT: Final = b"asgi-gateway-health/1"
#: Each round starts interval * (1 +- JITTER) after the previous one began.
JITTER: Final = 0.1
#: Health check bodies are read up to this size, then the connection is dropped.
BODY_LIMIT: Final = 64 * 1024
#: How long closing a response may take once the check itself has timed out.
_CLOSE_TIMEOUT: Final = 1.0


class _Probe:
    """One server's check results so far."""

    __slots__ = ("failures", "last", "server", "successes")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.successes = 0
        self.failures = 0
        self.last: str | None = None


class HealthChecker:
    """Checks every server of one upstream, forever, until cancelled.

    It sets `Server.healthy` and calls `on_change()` after each change, so that the
    failover layer can rebuild its available set. Run it in the lifespan's task
    group: `tg.start_soon(checker.run)`; cancelling the group stops it.
    """

    def __init__(
        self,
        upstream: UpstreamConfig,
        servers: Sequence[Server],
        transport: Handler,
        on_change: Callable[[], None],
        events: GatewayEvents = NULL_EVENTS,
    ) -> None:
        self._upstream = upstream
        self._probes = [_Probe(server) for server in servers]
        self._transport = transport
        self._on_change = on_change
        self._events = events
        self._random = random.Random()

    def set_servers(self, servers: Sequence[Server]) -> None:
        """Check `servers` from the next round on (the failover layer's `set_servers`).

        A server that stays (the same object) keeps its run of passes or failures; a check
        already under way on a removed one finishes, and its verdict no longer matters.
        """
        probes = {probe.server: probe for probe in self._probes}
        self._probes = [probes.get(server) or _Probe(server) for server in servers]

    def take_over(self, previous: HealthChecker) -> None:
        """Carry on `previous`'s runs of passes and failures for the servers both check (a reload)."""
        probes = {probe.server: probe for probe in previous._probes}
        self._probes = [probes.get(probe.server) or probe for probe in self._probes]

    async def run(self) -> None:
        """Check all servers every `interval` until cancelled. Returns at once without `health_check`."""
        config = self._upstream.health_check
        if config is None:
            return
        while True:
            started = anyio.current_time()
            await self.check_once()
            delay = config.interval * self._random.uniform(1 - JITTER, 1 + JITTER)
            await anyio.sleep_until(started + delay)

    async def check_once(self) -> None:
        """Run one round of checks (what `run` does each interval)."""
        config = self._upstream.health_check
        if config is None:
            return
        async with anyio.create_task_group() as tg:
            for probe in self._probes:
                tg.start_soon(self._check, config, probe)

    async def _check(self, config: HealthCheckConfig, probe: _Probe) -> None:
        started = time.perf_counter()
        try:
            reason = await self._probe(config, probe.server)
        except Exception as exc:
            # A bug in a transport must not stop the checks: count it as a failed check.
            reason = f"check error: {type(exc).__name__}: {exc}"
            logger.warning(
                "health check of server %s of upstream %r raised",
                probe.server.url,
                self._upstream.name,
                exc_info=True,
                extra={"upstream": self._upstream.name, "server": probe.server.url, "reason": reason},
            )
        # For the status view: what the server answered this check, how fast and when.
        probe.server.last_check = (reason or "passed", time.perf_counter() - started, time.time())
        try:
            self._record(config, probe, reason)
        except Exception:
            logger.exception(
                "recording the health of server %s of upstream %r failed",
                probe.server.url,
                self._upstream.name,
                extra={"upstream": self._upstream.name, "server": probe.server.url, "reason": reason},
            )

    async def _probe(self, config: HealthCheckConfig, server: Server) -> str | None:
        """None when the server passed, else why it failed."""
        exchange = Exchange(
            request_id="health-check",
            route="",
            upstream=self._upstream,
            client_ip="",
            path=config.path,
            scheme=server.scheme,
        )
        request = Request(
            method="GET",
            target=config.path.encode("ascii"),
            headers=[(b"user-agent", USER_AGENT)],
            body=RequestBody([], 0),
            exchange=exchange,
            server=server,
            connect_timeout=config.timeout,
            read_timeout=config.timeout,
        )
        exchange.server = server
        exchange.attempts = 1
        exchange.tried.append(server)
        reason: str | None = "timeout"
        with anyio.move_on_after(config.timeout):
            try:
                response = await self._transport.handle_request(request)
            except UpstreamError as exc:
                return exc.retry_condition or exc.code
            chunks = response.stream.__aiter__()
            try:
                received = 0
                async for chunk in chunks:
                    received += len(chunk)
                    if received >= BODY_LIMIT:
                        break
            finally:
                with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                    # Left at a `break`, a generator would be finalized by the garbage collector.
                    if isinstance(chunks, AsyncGenerator):
                        await chunks.aclose()
                    await response.aclose()
            reason = None if 200 <= response.status < 400 else f"status {response.status}"
        return reason

    def _record(self, config: HealthCheckConfig, probe: _Probe, reason: str | None) -> None:
        server = probe.server
        probe.last = reason
        extra = {"upstream": self._upstream.name, "server": server.url, "reason": reason or "passed"}
        if reason is None:
            probe.failures = 0
            probe.successes += 1
            if server.healthy or probe.successes < config.healthy_threshold:
                return
            server.healthy = True
            logger.info(
                "server %s of upstream %r is healthy again after %d passed checks",
                server.url,
                self._upstream.name,
                probe.successes,
                extra=extra,
            )
        else:
            probe.successes = 0
            probe.failures += 1
            if not server.healthy or probe.failures < config.unhealthy_threshold:
                return
            server.healthy = False
            logger.warning(
                "server %s of upstream %r is down after %d failed checks (last: %s)",
                server.url,
                self._upstream.name,
                probe.failures,
                reason,
                extra=extra,
            )
        self._events.health_changed(server, server.healthy)
        self._on_change()
