"""The layers' events (retries, ejections, failovers) as span events and counters."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry.util.types import AttributeValue

from ._semconv import GATEWAY_UPSTREAM, SERVER_ADDRESS, SERVER_PORT
from ._types import Exchange, GatewayEvents, Server

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter


class _Instruments(Protocol):
    """What the events need of a `Telemetry`: its counters, the counts its available-servers
    gauge reports, and its failure log."""

    retries: Counter | None
    budget_exhausted: Counter | None
    ejections: Counter | None
    failovers: Counter | None
    hedges: Counter | None
    health_transitions: Counter | None
    available: dict[str, int]

    def report(self, where: str, exc: BaseException) -> None: ...


#: What an event hook records: (span or None, event name, event attributes, counter or None,
#: counter attributes).
_Emission = tuple[Any, str, dict[str, AttributeValue], Any, dict[str, AttributeValue]]


class TelemetryEvents(GatewayEvents):
    """The layers' events as span events on the request's server span, and counters."""

    def __init__(self, telemetry: _Instruments) -> None:
        self._telemetry = telemetry

    def _emit(self, what: str, build: Callable[[], _Emission]) -> None:
        """A span event (when a request's span is given) and a counter increment, failsafe:
        even building their attributes may not raise into a layer."""
        try:
            span, event, event_attributes, counter, counter_attributes = build()
            if span is not None:
                span.add_event(event, event_attributes)
            if counter is not None:
                counter.add(1, counter_attributes)
        except Exception as exc:
            self._telemetry.report(what, exc)

    def retry(self, exchange: Exchange, attempt: int, reason: str, backoff: float) -> None:
        self._emit(
            "retry event",
            lambda: (
                exchange.span,
                "retry",
                {
                    "gateway.attempt": attempt,
                    "gateway.retry.reason": reason,
                    "gateway.retry.backoff": backoff,
                },
                self._telemetry.retries,
                {GATEWAY_UPSTREAM: exchange.upstream.name, "gateway.retry.reason": reason},
            ),
        )

    def retry_budget_exhausted(self, exchange: Exchange, reason: str) -> None:
        self._emit(
            "retry budget event",
            lambda: (
                exchange.span,
                "retry_budget_exhausted",
                {"gateway.retry.reason": reason},
                self._telemetry.budget_exhausted,
                {GATEWAY_UPSTREAM: exchange.upstream.name, "gateway.retry.reason": reason},
            ),
        )

    def hedge(self, exchange: Exchange, attempt: int, delay: float) -> None:
        self._emit(
            "hedge event",
            lambda: (
                exchange.span,
                "hedge",
                {"gateway.attempt": attempt, "gateway.hedge.delay": delay},
                None,
                {},
            ),
        )

    def hedge_result(self, exchange: Exchange, result: str) -> None:
        self._emit(
            "hedge result event",
            lambda: (
                exchange.span,
                "hedge_result",
                {"gateway.hedge.result": result},
                self._telemetry.hedges,
                {GATEWAY_UPSTREAM: exchange.upstream.name, "gateway.hedge.result": result},
            ),
        )

    def ejected(self, server: Server, duration: float, exchange: Exchange | None) -> None:
        def build() -> _Emission:
            attributes: dict[str, AttributeValue] = {
                GATEWAY_UPSTREAM: server.upstream,
                SERVER_ADDRESS: server.host,
                SERVER_PORT: server.port,
            }
            return (
                exchange.span if exchange is not None else None,
                "ejection",
                {**attributes, "gateway.ejection.duration": duration},
                self._telemetry.ejections,
                attributes,
            )

        self._emit("ejection event", build)

    def readmitted(self, server: Server) -> None:
        # The failover layer logs it and the available-servers gauge shows it.
        pass

    def health_changed(self, server: Server, healthy: bool) -> None:
        self._emit(
            "health event",
            lambda: (
                None,
                "",
                {},
                self._telemetry.health_transitions,
                {
                    GATEWAY_UPSTREAM: server.upstream,
                    SERVER_ADDRESS: server.host,
                    SERVER_PORT: server.port,
                    "gateway.health_check.healthy": healthy,
                },
            ),
        )

    def failover(self, exchange: Exchange, group: str) -> None:
        self._emit(
            "failover event",
            lambda: (
                exchange.span,
                "failover",
                {"gateway.failover.group": group},
                self._telemetry.failovers,
                {GATEWAY_UPSTREAM: exchange.upstream.name, "gateway.failover.group": group},
            ),
        )

    def available_changed(self, upstream: str, available: int) -> None:
        self._telemetry.available[upstream] = available
