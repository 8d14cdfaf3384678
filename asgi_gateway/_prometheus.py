"""`{admin.path}/metrics`: the gateway's OpenTelemetry instruments, in Prometheus text.

With the admin endpoints on (and `prometheus_client` installed: the `admin` extra) every
instrument the gateway makes is a tee: what it records goes to the OpenTelemetry meter, if
one is configured, and to a `prometheus_client` metric of the Prometheus name
(`http.server.request.duration` -> `http_server_request_duration_seconds`,
`gateway.retries` -> `gateway_retries_total`, attribute `gateway.upstream` -> label
`gateway_upstream`). The metrics are the gateway's own (no registry is global and no
OpenTelemetry provider is set): a user's `meter_provider` keeps getting everything, and a
second gateway in the process has a page of its own.

With `PROMETHEUS_MULTIPROC_DIR` set (`asgi-gateway serve --workers N` sets it for its
workers), `prometheus_client`'s multiprocess mode keeps every worker's counters and
histograms in files there, and a scrape, whichever worker answers it, sums them over all
workers. The two gauges (available servers, the adaptive concurrency limit) are that
worker's own view: each worker runs its own health checks.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final

from ._semconv import DURATION_BUCKETS

__all__ = ["MULTIPROC_DIR", "PrometheusMeter", "available", "install_hint"]

MULTIPROC_DIR: Final = "PROMETHEUS_MULTIPROC_DIR"
_UNITS: Final = {"s": "seconds", "By": "bytes"}


def available() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def install_hint() -> str:
    return "GET /metrics needs prometheus_client: pip install 'asgi-gateway[admin]'"


def _name(name: str, unit: str) -> str:
    base = name.replace(".", "_").replace("-", "_")
    suffix = _UNITS.get(unit)
    return f"{base}_{suffix}" if suffix and not base.endswith(suffix) else base


def _label(key: str) -> str:
    return key.replace(".", "_").replace("-", "_")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _Instrument:
    """One OpenTelemetry instrument's Prometheus side: a native metric per set of attribute
    names (OpenTelemetry allows any per call, Prometheus wants them declared), and the
    labelled child of each set of attribute values, found again by a dict lookup."""

    __slots__ = ("_children", "_factory", "_lock", "metrics")

    def __init__(self, factory: Callable[[tuple[str, ...]], Any]) -> None:
        self._factory = factory
        self._children: dict[tuple[tuple[str, Any], ...], Any] = {}
        self._lock = threading.Lock()
        self.metrics: dict[tuple[str, ...], Any] = {}

    def child(self, attributes: Any) -> Any:
        key = tuple(attributes.items()) if attributes else ()
        child = self._children.get(key)
        if child is None:
            with self._lock:
                names = tuple(_label(name) for name, _ in key)
                metric = self.metrics.get(names)
                if metric is None:
                    metric = self.metrics[names] = self._factory(names)
                child = metric.labels(*(_value(value) for _, value in key)) if names else metric
                self._children[key] = child
        return child


class _Tee:
    """An instrument recording to Prometheus and, when there is one, to OpenTelemetry."""

    __slots__ = ("_method", "_other", "_prometheus")

    def __init__(self, prometheus: _Instrument, other: Any, method: str) -> None:
        self._prometheus = prometheus
        self._other = other
        self._method = method

    def add(self, amount: float, attributes: Any = None, *args: Any, **kwargs: Any) -> None:
        child = self._prometheus.child(attributes)
        if amount >= 0:
            child.inc(amount)
        else:
            child.dec(-amount)
        if self._other is not None:
            self._other.add(amount, attributes, *args, **kwargs)

    def record(self, amount: float, attributes: Any = None, *args: Any, **kwargs: Any) -> None:
        self._prometheus.child(attributes).observe(amount)
        if self._other is not None:
            self._other.record(amount, attributes, *args, **kwargs)


class _TeeMeter:
    """What `Telemetry` makes its instruments with while `/metrics` is on."""

    def __init__(self, owner: PrometheusMeter, other: Any) -> None:
        self._owner = owner
        self._other = other

    def create_counter(self, name: str, unit: str = "", description: str = "") -> _Tee:
        other = self._other.create_counter(name, unit=unit, description=description) if self._other else None
        return _Tee(self._owner.instrument("counter", name, unit, description), other, "add")

    def create_up_down_counter(self, name: str, unit: str = "", description: str = "") -> _Tee:
        other = (
            self._other.create_up_down_counter(name, unit=unit, description=description)
            if self._other
            else None
        )
        return _Tee(self._owner.instrument("gauge", name, unit, description), other, "add")

    def create_histogram(
        self,
        name: str,
        unit: str = "",
        description: str = "",
        *,
        explicit_bucket_boundaries_advisory: Sequence[float] | None = None,
    ) -> _Tee:
        other = None
        if self._other is not None:
            other = self._other.create_histogram(
                name,
                unit=unit,
                description=description,
                explicit_bucket_boundaries_advisory=explicit_bucket_boundaries_advisory,
            )
        buckets = tuple(explicit_bucket_boundaries_advisory or DURATION_BUCKETS)
        return _Tee(self._owner.instrument("histogram", name, unit, description, buckets), other, "record")

    def create_observable_gauge(
        self,
        name: str,
        callbacks: Sequence[Callable[[Any], Iterable[Any]]] | None = None,
        unit: str = "",
        description: str = "",
    ) -> Any:
        self._owner.gauges[_name(name, unit)] = (description, list(callbacks or ()))
        if self._other is not None:
            return self._other.create_observable_gauge(
                name, callbacks=callbacks, unit=unit, description=description
            )
        return None


class PrometheusMeter:
    """The gateway's Prometheus metrics: `meter(other)` makes instruments, `exposition()`
    renders them."""

    def __init__(self) -> None:
        self._instruments: dict[str, _Instrument] = {}
        #: Observable gauges, read at each scrape: name -> (description, callbacks).
        self.gauges: dict[str, tuple[str, list[Callable[[Any], Iterable[Any]]]]] = {}
        self.multiprocess = bool(os.environ.get(MULTIPROC_DIR))

    def meter(self, other: Any) -> Any:
        """A meter whose instruments record here and to `other` (an OpenTelemetry meter, or None)."""
        return _TeeMeter(self, other)

    def instrument(
        self, kind: str, name: str, unit: str, description: str, buckets: tuple[float, ...] = ()
    ) -> _Instrument:
        import prometheus_client

        full = _name(name, unit)
        found = self._instruments.get(full)
        if found is not None:
            return found
        documentation = description or name

        def factory(labels: tuple[str, ...]) -> Any:
            # Not in any registry: `exposition` collects them, and two sets of label names of
            # one instrument would collide in a registry.
            if kind == "counter":
                return prometheus_client.Counter(full, documentation, labels, registry=None)
            if kind == "histogram":
                return prometheus_client.Histogram(
                    full, documentation, labels, registry=None, buckets=buckets
                )
            return prometheus_client.Gauge(
                full, documentation, labels, registry=None, multiprocess_mode="livesum"
            )

        found = self._instruments[full] = _Instrument(factory)
        return found

    def exposition(self) -> tuple[bytes, str]:
        """The text a scrape gets, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        if self.multiprocess:
            from prometheus_client import multiprocess

            # Every worker's counters and histograms, summed; the gauges are this worker's.
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(_Collector(self, gauges_only=self.multiprocess))
        return generate_latest(registry), CONTENT_TYPE_LATEST


class _Collector:
    def __init__(self, owner: PrometheusMeter, *, gauges_only: bool) -> None:
        self._owner = owner
        self._gauges_only = gauges_only

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        if not self._gauges_only:
            for instrument in list(self._owner._instruments.values()):
                merged = None
                for metric in list(instrument.metrics.values()):
                    for family in metric.collect():
                        if merged is None:
                            merged = family
                        else:
                            merged.samples.extend(family.samples)
                if merged is not None:
                    yield merged
        for name, (description, callbacks) in list(self._owner.gauges.items()):
            family = None
            for callback in callbacks:
                for observation in callback(None):
                    attributes = dict(observation.attributes or {})
                    if family is None:
                        family = GaugeMetricFamily(name, description, labels=[_label(k) for k in attributes])
                    family.add_metric([_value(v) for v in attributes.values()], observation.value)
            if family is not None:
                yield family
