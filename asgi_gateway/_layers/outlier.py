"""Passive outlier detection: which of an upstream's servers are ejected, and for how long.

A server's consecutive gateway failures count against it: connect failures, resets, read
timeouts, 502/503/504 answers and bodies that break off. Any other answer read to its end
resets the count. At `consecutive_failures` the server is ejected for
`base_ejection_time * 2**ejections`, at most `max_ejection_time`, and never while
`max_ejection_percent` of the servers are already out (one always may be). An ejection ends
lazily, on the first pick after its time. The multiplier decays as Envoy's does: each
`base_ejection_time` a server has been back since its last ejection ended takes one doubling
off its next one.

`Outliers` keeps the bookkeeping and decides each ejection. The failover layer judges each
attempt, writes its failures into `Outliers.failures` and counts them on the server itself,
so that a failure short of an ejection costs no call here; it also owns the clock, the
available set built from `Outliers.ejected`, and when an ejection's end is due.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Final

from .._config import OutlierDetectionConfig
from .._types import Exchange, GatewayEvents, Server

__all__ = ["FAILURE_CONDITIONS", "FAILURE_STATUSES", "RECENT_WINDOW", "Failures", "Outliers"]

logger = logging.getLogger("asgi_gateway.health")

#: Statuses with which an upstream says that it, or what stands behind it, is failing.
FAILURE_STATUSES: Final = frozenset({502, 503, 504})
#: Errors that count against a server. A total timeout is the client's deadline, not the server's fault.
FAILURE_CONDITIONS: Final = frozenset({"connect-failure", "reset", "timeout"})
#: How far back the status view counts a server's failures.
RECENT_WINDOW: Final = 60.0
_MAX_RECENT: Final = 256
#: Caps the ejection multiplier's exponent; `max_ejection_time` caps the duration anyway.
_MAX_DOUBLINGS: Final = 32


class Failures:
    """A server's recent passive failures, for the status view."""

    __slots__ = ("last_reason", "times")

    def __init__(self) -> None:
        self.times: deque[float] = deque(maxlen=_MAX_RECENT)
        self.last_reason: str | None = None


class Outliers:
    """One upstream's failure history and ejections.

    What lives on the `Server` (ejection end and count, consecutive failures) stays there;
    this keeps which servers are ejected now (`ejected`) and each one's recent failures
    (`failures`, a server's entry gone once it left the set). `config` is None when the
    upstream has no `outlier_detection`: failures are still recorded for the status view,
    and nothing is ejected. `ejected` and `failures` are never rebound, so a holder of them
    sees every change.
    """

    __slots__ = ("_events", "_max_ejected", "_name", "config", "ejected", "failures")

    def __init__(
        self,
        name: str,
        config: OutlierDetectionConfig | None,
        servers: Sequence[Server],
        events: GatewayEvents,
    ) -> None:
        self._name = name
        self.config = config
        self._events = events
        self.failures = {server: Failures() for server in servers}
        self.ejected: set[Server] = set()
        self._max_ejected = self._ejection_limit(len(servers))

    def _ejection_limit(self, count: int) -> int:
        if self.config is None:
            return 0
        share = math.floor(count * self.config.max_ejection_percent / 100)
        # As Envoy does: one server may always go, whatever the percentage rounds to.
        return max(1, share)

    def set_servers(self, servers: Sequence[Server], removed: Iterable[Server]) -> None:
        """Forget `removed`, start a history for each new one of `servers`."""
        for server in removed:
            self.failures.pop(server, None)
            self.ejected.discard(server)
        for server in servers:
            if server not in self.failures:
                self.failures[server] = Failures()
        self._max_ejected = self._ejection_limit(len(servers))

    def take_over(self, previous: Outliers, servers: Sequence[Server]) -> None:
        """Carry `previous`'s ejections and failure history over for `servers`; only reads `previous`."""
        for server in servers:
            failures = previous.failures.get(server)
            if failures is not None:
                self.failures[server] = failures
            if server in previous.ejected:
                self.ejected.add(server)

    def recent(self, server: Server, now: float) -> tuple[int, str | None]:
        """`server`'s failures within `RECENT_WINDOW` of `now`, and the last one's reason."""
        failures = self.failures.get(server) or Failures()
        return sum(1 for at in failures.times if now - at <= RECENT_WINDOW), failures.last_reason

    def view(self) -> dict[str, Any] | None:
        """The settings, for the status view."""
        config = self.config
        if config is None:
            return None
        return {
            "consecutive_failures": config.consecutive_failures,
            "base_ejection_time": config.base_ejection_time,
            "max_ejection_time": config.max_ejection_time,
            "max_ejection_percent": config.max_ejection_percent,
        }

    def readmit(self, now: float) -> None:
        """End every ejection due by `now`; the caller rebuilds its available set next."""
        for server in [server for server in self.ejected if server.ejected_until <= now]:
            self.ejected.discard(server)
            server.consecutive_failures = 0
            extra = {"upstream": self._name, "server": server.url, "reason": "ejection-ended"}
            if server.healthy:
                logger.info("readmitted server %s of upstream %r", server.url, self._name, extra=extra)
                self._events.readmitted(server)
            else:
                logger.info(
                    "ejection of server %s of upstream %r ended; it stays out until its health check passes",
                    server.url,
                    self._name,
                    extra=extra,
                )

    def eject(self, server: Server, reason: str, exchange: Exchange | None, now: float) -> bool:
        """Eject `server`, which has just failed `consecutive_failures` times in a row, unless
        `max_ejection_percent` of the servers are out already; whether it did.
        """
        config = self.config
        assert config is not None
        if len(self.ejected) >= self._max_ejected:
            logger.debug(
                "server %s of upstream %r is failing but %d server(s) are already ejected",
                server.url,
                self._name,
                len(self.ejected),
                extra={"upstream": self._name, "server": server.url, "reason": reason},
            )
            return False
        # Envoy-style decay: each base_ejection_time the server has been back (since its
        # last ejection ended) takes one doubling off the next ejection.
        if server.ejections and server.ejected_until:
            healthy_for = max(0.0, now - server.ejected_until)
            server.ejections = max(0, server.ejections - int(healthy_for // config.base_ejection_time))
        duration = min(
            config.max_ejection_time,
            config.base_ejection_time * 2 ** min(server.ejections, _MAX_DOUBLINGS),
        )
        server.ejections += 1
        server.ejected_until = now + duration
        server.consecutive_failures = 0
        self.ejected.add(server)
        logger.warning(
            "ejected server %s of upstream %r for %gs after %d consecutive failures (last: %s)",
            server.url,
            self._name,
            duration,
            config.consecutive_failures,
            reason,
            extra={"upstream": self._name, "server": server.url, "reason": reason},
        )
        self._events.ejected(server, duration, exchange)
        return True
