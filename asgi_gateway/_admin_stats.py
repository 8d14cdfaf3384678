"""What the admin page shows beyond the layers' own state: per-server figures over the last
minute, the last 5xx answers, rate-limit decisions and the operator's actions.

All of it is kept only while `admin.path` is set. The per-server figures are recorded where
the failover layer releases a server (`_Attempt`), so they cost one attribute test per
attempt when the admin endpoints are off, and a clock read and a few list writes when on.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ._types import Exchange

__all__ = ["AdminRecords", "ServerStats"]

#: The window of the per-server figures, in one-second buckets.
WINDOW: Final = 60
#: Upper bounds (s) of the latency sketch's buckets: 0.5 ms to about 2 min, 25 % apart, so a
#: percentile read from it is within 25 % of the true one.
_BOUNDS: Final = tuple(0.0005 * 1.25**k for k in range(56))
_SLOTS: Final = len(_BOUNDS) + 1
RECENT_ERRORS: Final = 50
ACTIONS: Final = 20


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")


class ServerStats:
    """One server's attempts over the last `WINDOW` seconds: a ring of one-second buckets,
    each with its count, its errors and a log-scale latency sketch."""

    __slots__ = ("_clock", "_counts", "_errors", "_latency", "_seconds")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: The second each bucket holds; a bucket of an older second is stale and reset on use.
        self._seconds = [-1] * WINDOW
        self._counts = [0] * WINDOW
        self._errors = [0] * WINDOW
        self._latency = [[0] * _SLOTS for _ in range(WINDOW)]

    def record(self, seconds: float, failed: bool) -> None:
        """One attempt that took `seconds` (to the end of its response), failed or not."""
        second = int(self._clock())
        slot = second % WINDOW
        if self._seconds[slot] != second:
            self._seconds[slot] = second
            self._counts[slot] = 0
            self._errors[slot] = 0
            self._latency[slot] = [0] * _SLOTS
        self._counts[slot] += 1
        if failed:
            self._errors[slot] += 1
        self._latency[slot][bisect.bisect_left(_BOUNDS, seconds)] += 1

    def summary(self) -> dict[str, float | int | None]:
        """Requests per second, error rate and latency p50/p99 (seconds) over the window."""
        now = int(self._clock())
        total = errors = 0
        sketch = [0] * _SLOTS
        for slot in range(WINDOW):
            # The current second counts: it is part of the last minute.
            if now - self._seconds[slot] < WINDOW:
                total += self._counts[slot]
                errors += self._errors[slot]
                for index, count in enumerate(self._latency[slot]):
                    if count:
                        sketch[index] += count
        return {
            "requests": total,
            "requests_per_second": round(total / WINDOW, 3),
            "error_rate": round(errors / total, 4) if total else None,
            "latency_p50": _percentile(sketch, total, 0.50),
            "latency_p99": _percentile(sketch, total, 0.99),
        }


def _percentile(sketch: list[int], total: int, q: float) -> float | None:
    if not total:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index, count in enumerate(sketch):
        seen += count
        if seen >= rank:
            # The bucket's geometric middle: within its 25 % width of the true value.
            upper = _BOUNDS[index] if index < len(_BOUNDS) else _BOUNDS[-1]
            lower = _BOUNDS[index - 1] if index else 0.0
            return round(math.sqrt(upper * lower) if lower else upper, 6)
    return None  # pragma: no cover - the counts add up to `total`


@dataclass(frozen=True, slots=True)
class Action:
    """An operator's action through the admin endpoints."""

    at: str
    client: str | None
    action: str
    target: str | None
    result: str


class AdminRecords:
    """The gateway's own records for the admin page; lives as long as the gateway (across
    reloads), filled only while the admin endpoints are on."""

    __slots__ = ("actions", "errors", "rate_limits")

    def __init__(self) -> None:
        self.errors: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)
        self.actions: deque[Action] = deque(maxlen=ACTIONS)
        #: route path -> result (allowed, limited, shadow, backend_error) -> count.
        self.rate_limits: dict[str, dict[str, int]] = {}

    def finished(self, exchange: Exchange, status: int, span: Any) -> None:
        """A proxied request has been answered with `status`."""
        result = exchange.rate_limit_result
        if result is not None:
            counts = self.rate_limits.setdefault(exchange.route, {})
            counts[result] = counts.get(result, 0) + 1
        if status < 500:
            return
        server = exchange.server
        self.errors.appendleft(
            {
                "at": _iso(time.time()),
                "status": status,
                "request_id": exchange.request_id,
                "trace_id": _trace_id(span),
                "route": exchange.route,
                "upstream": exchange.upstream.name,
                "server": server.url if server is not None else None,
                "address": server.address if server is not None and server.ip is not None else None,
            }
        )

    def action(self, client: str | None, action: str, target: str | None, result: str) -> Action:
        record = Action(_iso(time.time()), client, action, target, result)
        self.actions.appendleft(record)
        return record

    def status(self) -> dict[str, Any]:
        return {
            "recent_errors": list(self.errors),
            "actions": [
                {"at": a.at, "client": a.client, "action": a.action, "target": a.target, "result": a.result}
                for a in self.actions
            ],
            "rate_limits": {route: dict(counts) for route, counts in self.rate_limits.items()},
        }


def _trace_id(span: Any) -> str | None:
    if span is None:
        return None
    try:
        context = span.get_span_context()
    except Exception:
        return None
    if not getattr(context, "is_valid", False):
        return None
    return f"{context.trace_id:032x}"
