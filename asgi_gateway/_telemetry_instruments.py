"""What `Telemetry` records with: the tracer and the metric instruments, found lazily.

`Instruments` resolves the tracer and meter providers (the ones given, else the global
ones, looked at again while those are the API's proxies), makes the instruments from the
meter (teed into Prometheus form while `{admin.path}/metrics` is on), serves the
observable gauges and counts config reloads. `_telemetry.Telemetry` is one and adds the
request path; being the same object, that path reads an instrument as its own attribute
(`self.server_duration`), with no object in between.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace

from ._semconv import DURATION_BUCKETS, GATEWAY_UPSTREAM

if TYPE_CHECKING:
    from opentelemetry.metrics import (
        CallbackOptions,
        Counter,
        Histogram,
        Meter,
        MeterProvider,
        Observation,
        UpDownCounter,
    )
    from opentelemetry.trace import Tracer, TracerProvider

    from ._layers.concurrency import GradientController
    from ._prometheus import PrometheusMeter

try:
    from opentelemetry.metrics._internal import _ProxyMeterProvider
except ImportError:  # pragma: no cover - an API that moved it; then nothing counts as a proxy

    class _ProxyMeterProvider:  # type: ignore[no-redef]
        pass


__all__ = ["Instruments"]

logger = logging.getLogger("asgi_gateway.telemetry")

_SCOPE_NAME = "asgi_gateway"
_SCHEMA_URL = "https://opentelemetry.io/schemas/1.27.0"

#: Seconds between two log records about the same telemetry failure.
_REPORT_INTERVAL = 60.0


class Instruments:
    """The tracer and the metric instruments of one gateway, and its telemetry failure log.

    Each instrument is None until a meter provider that is not the API's no-op one hands
    out a meter (or, with `prometheus`, once one is looked for); the tracer is None while
    tracing is off.
    """

    def __init__(self, tracer_provider: Any, meter_provider: Any, prometheus: bool) -> None:
        self.tracer_provider: TracerProvider | None = tracer_provider
        self.meter_provider: MeterProvider | None = meter_provider
        #: The tracer, or None while tracing is off (no SDK configured).
        self.tracer: Tracer | None = None
        self._tracer_resolved = False
        self._meter_resolved = False
        self._resolved = False
        self.server_duration: Histogram | None = None
        self.client_duration: Histogram | None = None
        self.retries: Counter | None = None
        self.budget_exhausted: Counter | None = None
        self.ejections: Counter | None = None
        self.failovers: Counter | None = None
        self.hedges: Counter | None = None
        self.health_transitions: Counter | None = None
        self.rate_limit_decisions: Counter | None = None
        self.config_reloads: Counter | None = None
        #: The meter the instruments above came from (None while metrics are off).
        self._meter: Meter | None = None
        self._websocket_sessions: UpDownCounter | None = None
        #: Latest count of available servers per upstream, for the observable gauge.
        self.available: dict[str, int] = {}
        #: Each upstream's adaptive concurrency limit, for its gauge; held weakly, so a limit
        #: of an upstream a reload removed is gone with its stack.
        self.concurrency_limits: weakref.WeakValueDictionary[str, GradientController] = (
            weakref.WeakValueDictionary()
        )
        self._reported: dict[str, float] = {}
        #: `{admin.path}/metrics`: with it, every instrument also records in Prometheus form.
        self.prometheus: PrometheusMeter | None = None
        if prometheus:
            from ._prometheus import PrometheusMeter, available

            self.prometheus = PrometheusMeter() if available() else None

    # -- providers -------------------------------------------------------------------

    def _resolve(self) -> None:
        try:
            if not self._tracer_resolved:
                self._resolve_tracer()
            if not self._meter_resolved:
                self._resolve_meter()
        except Exception as exc:
            # A provider that cannot hand out a tracer or meter: tracing or metrics stay off.
            self._tracer_resolved = self._meter_resolved = True
            self.report("provider", exc)
        self._resolved = self._tracer_resolved and self._meter_resolved

    def _resolve_tracer(self) -> None:
        provider = self.tracer_provider
        if provider is None or isinstance(provider, trace.ProxyTracerProvider):
            provider = trace.get_tracer_provider()
            if isinstance(provider, trace.ProxyTracerProvider):
                return  # no global provider yet; look again on the next request
        self._tracer_resolved = True
        if isinstance(provider, trace.NoOpTracerProvider):
            return
        tracer = provider.get_tracer(_SCOPE_NAME, _version(), schema_url=_SCHEMA_URL)
        if not isinstance(tracer, trace.NoOpTracer):
            self.tracer = tracer

    def _resolve_meter(self) -> None:
        provider = self.meter_provider
        if provider is None or isinstance(provider, _ProxyMeterProvider):
            provider = metrics.get_meter_provider()
            if isinstance(provider, _ProxyMeterProvider):
                if self.prometheus is not None and self._meter is None:
                    # Prometheus alone until a global provider is set (then both).
                    alone = self.prometheus.meter(None)
                    self._create_instruments(alone)
                    self._meter = alone
                return
        self._meter_resolved = True
        meter: Any = None
        if not isinstance(provider, metrics.NoOpMeterProvider):
            meter = provider.get_meter(_SCOPE_NAME, _version(), schema_url=_SCHEMA_URL)
            if isinstance(meter, metrics.NoOpMeter):
                meter = None
        if self.prometheus is not None:
            meter = self.prometheus.meter(meter)
        if meter is None:
            return
        self._create_instruments(meter)
        # Only once every instrument exists: a session is counted only where the request
        # instruments are there too, which `finish` relies on to take its shortest way.
        self._meter = meter

    # -- instruments -----------------------------------------------------------------

    def _create_instruments(self, meter: Meter) -> None:
        self.server_duration = meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="Duration of HTTP server requests.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.client_duration = meter.create_histogram(
            "http.client.request.duration",
            unit="s",
            description="Duration of HTTP client requests (one per attempt to an upstream server).",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.retries = meter.create_counter(
            "gateway.retries", unit="{retry}", description="Attempts made again after a failed one."
        )
        self.budget_exhausted = meter.create_counter(
            "gateway.retry_budget.exhausted",
            unit="{retry}",
            description="Retries refused because the upstream's retry budget was spent.",
        )
        self.ejections = meter.create_counter(
            "gateway.ejections", unit="{ejection}", description="Servers ejected by outlier detection."
        )
        self.failovers = meter.create_counter(
            "gateway.failovers",
            unit="{request}",
            description="Requests sent to backup servers (or in panic mode) instead of primaries.",
        )
        self.hedges = meter.create_counter(
            "gateway.hedges",
            unit="{request}",
            description="Hedged requests by result: won, lost, skipped_budget.",
        )
        self.health_transitions = meter.create_counter(
            "gateway.health_check.transitions",
            unit="{transition}",
            description="Changes of a server's active health-check state.",
        )
        self.rate_limit_decisions = meter.create_counter(
            "gateway.rate_limit.decisions",
            unit="{request}",
            description="Rate-limit decisions by route and result: allowed, limited, shadow, backend_error.",
        )
        self.config_reloads = meter.create_counter(
            "gateway.config.reloads",
            unit="{reload}",
            description="Config reloads by result: success, failure.",
        )
        meter.create_observable_gauge(
            "gateway.upstream.available_servers",
            callbacks=[self._observe_available],
            unit="{server}",
            description="Servers of an upstream available to take traffic.",
        )
        meter.create_observable_gauge(
            "gateway.concurrency.limit",
            callbacks=[self._observe_concurrency_limits],
            unit="{request}",
            description="The adaptive concurrency limit of an upstream: requests allowed in flight.",
        )

    def _observe_available(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        return [Observation(count, {GATEWAY_UPSTREAM: name}) for name, count in list(self.available.items())]

    def _observe_concurrency_limits(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        limits = list(self.concurrency_limits.items())
        return [Observation(limit.limit, {GATEWAY_UPSTREAM: name}) for name, limit in limits]

    def config_reloaded(self, result: str) -> None:
        """Count a config reload by `result` (success, failure)."""
        if not self._resolved:
            self._resolve()
        try:
            if self.config_reloads is not None:
                self.config_reloads.add(1, {"result": result})
        except Exception as exc:
            self.report("reload metric", exc)

    def report(self, where: str, exc: BaseException) -> None:
        """Log a telemetry failure without failing the request, at most once a minute per `where`."""
        now = time.monotonic()
        last = self._reported.get(where)
        if last is not None and now - last < _REPORT_INTERVAL:
            return
        self._reported[where] = now
        try:
            logger.warning(
                "telemetry failed in %s (ignored; the request goes on; further failures here are not "
                "logged for %gs)",
                where,
                _REPORT_INTERVAL,
                exc_info=exc,
            )
        except Exception:  # pragma: no cover - a broken logging handler must not fail the request either
            pass


_VERSION: list[str] = []


def _version() -> str:
    if not _VERSION:
        try:
            from importlib.metadata import version

            _VERSION.append(version("asgi-gateway"))
        except Exception:
            _VERSION.append("0")
    return _VERSION[0]
