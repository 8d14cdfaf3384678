"""`{admin.path}/metrics`: the gateway's OpenTelemetry instruments, in Prometheus text.

With the admin endpoints on (and `prometheus_client` installed: the `admin` extra) every
instrument the gateway makes is a tee: what it records goes to the OpenTelemetry meter, if
one is configured, and to a Prometheus metric of the Prometheus name
(`http.server.request.duration` -> `http_server_request_duration_seconds`,
`gateway.retries` -> `gateway_retries_total`, attribute `gateway.upstream` -> label
`gateway_upstream`). The metrics are the gateway's own (no registry is global and no
OpenTelemetry provider is set): a user's `meter_provider` keeps getting everything, and a
second gateway in the process has a page of its own.

Those metrics are plain numbers of this module's (a counter's value, a histogram's bucket
counts and sum, per set of attribute values), so a record costs a dict lookup and an
addition (a histogram's, one `bisect` more); `prometheus_client`'s metric families are made
of them only when a scrape asks, and say what its own metrics would.

With `PROMETHEUS_MULTIPROC_DIR` set (`asgi-gateway serve --workers N` sets it for its
workers), `prometheus_client`'s multiprocess mode keeps every worker's counters and
histograms in files there, and a scrape, whichever worker answers it, sums them over all
workers. There every record goes to `prometheus_client`'s own metrics, which write it to
this worker's file at once: a scrape answered by another worker must see it. The two gauges
(available servers, the adaptive concurrency limit) are that worker's own view: each worker
runs its own health checks.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final, TypeAlias

from ._semconv import DURATION_BUCKETS

__all__ = ["MULTIPROC_DIR", "PrometheusMeter", "available", "install_hint"]

MULTIPROC_DIR: Final = "PROMETHEUS_MULTIPROC_DIR"
_UNITS: Final = {"s": "seconds", "By": "bytes"}

#: A set of attribute values, as recorded: the attributes' items, in their order.
_Key: TypeAlias = tuple[tuple[str, Any], ...]


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


# Records come from the thread running the gateway's event loop (requests, health checks,
# reloads), and a scrape runs on that loop too, between two awaits: nothing reads or writes a
# slot while another record or a scrape is half-way through it, so the record path takes no
# lock. A scrape copies each table of children before it reads it.


class _Series:
    """One instrument's values, per set of attribute values: a child, made on its first record.

    A counter's or up/down counter's child is `[value]`; a histogram's holds the count of
    each bucket (not cumulative; +Inf last), then the sum.
    """

    __slots__ = ("buckets", "children", "created", "documentation", "kind", "labels", "name", "upper")

    def __init__(self, kind: str, name: str, documentation: str, upper: tuple[float, ...] = ()) -> None:
        from prometheus_client.utils import floatToGoString

        self.kind = kind
        self.name = name
        self.documentation = documentation
        #: A histogram's finite upper bounds, which `bisect_left` looks a value up in: the
        #: first bound at least as large is its bucket (Prometheus's `le`).
        self.upper = upper
        #: The `le` label of each bucket, +Inf last.
        self.buckets: tuple[str, ...] = (
            *(floatToGoString(bound) for bound in upper),  # type: ignore[no-untyped-call]
            "+Inf",
        )
        self.children: dict[_Key, list[float]] = {}
        #: Per child: its label names and values, and when it was made (`_created`).
        self.labels: dict[_Key, tuple[list[str], list[str]]] = {}
        self.created: dict[_Key, float] = {}

    def child(self, key: _Key) -> list[float]:
        child = [0.0] * (len(self.upper) + 2) if self.kind == "histogram" else [0.0]
        self.labels[key] = ([_label(name) for name, _ in key], [_value(value) for _, value in key])
        self.created[key] = time.time()
        # Last: a child a scrape finds has its labels.
        self.children[key] = child
        return child

    def families(self, created: bool) -> Any:
        """The Prometheus metric family of every child, or None before the first record."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.samples import Sample

        # A family per set of label names (OpenTelemetry allows a different set on each
        # record), their samples merged into the first, in the order the children came.
        families: dict[tuple[str, ...], Any] = {}
        for key, child in list(self.children.items()):
            names, values = self.labels[key]
            family = families.get(tuple(names))
            if self.kind == "counter":
                if family is None:
                    family = families[tuple(names)] = CounterMetricFamily(
                        self.name, self.documentation, labels=names
                    )
                family.add_metric(values, child[0], self.created[key] if created else None)
            elif self.kind == "histogram":
                if family is None:
                    family = families[tuple(names)] = HistogramMetricFamily(
                        self.name, self.documentation, labels=names
                    )
                total = 0.0
                cumulative = []
                # (The child's last slot, its sum, is past the buckets.)
                for bucket, count in zip(self.buckets, child, strict=False):
                    total += count
                    cumulative.append((bucket, total))
                family.add_metric(values, cumulative, child[-1])
                if created:
                    family.samples.append(
                        Sample(
                            f"{self.name}_created", dict(zip(names, values, strict=True)), self.created[key]
                        )
                    )
            else:
                if family is None:
                    family = families[tuple(names)] = GaugeMetricFamily(
                        self.name, self.documentation, labels=names
                    )
                family.add_metric(values, child[0])
        merged = None
        for family in families.values():
            if merged is None:
                merged = family
            else:
                merged.samples.extend(family.samples)
        return merged


class _Counter:
    """`create_counter`'s instrument: adds up in its series, and records to `other` too."""

    __slots__ = ("_children", "_other", "_series")

    def __init__(self, series: _Series, other: Any) -> None:
        self._series = series
        self._children = series.children
        self._other = other

    def add(self, amount: float, attributes: Any = None, context: Any = None) -> None:
        # Positional parameters, as OpenTelemetry's own: `*args, **kwargs` would cost a
        # dict per record. A counter only goes up (OpenTelemetry's SDK drops a negative
        # amount too).
        if amount >= 0:
            key = tuple(attributes.items()) if attributes else ()
            try:
                child = self._children[key]
            except KeyError:
                child = self._series.child(key)
            child[0] += amount
        if self._other is not None:
            self._other.add(amount, attributes, context)


class _UpDownCounter(_Counter):
    """`create_up_down_counter`'s instrument: a Prometheus gauge."""

    __slots__ = ()

    def add(self, amount: float, attributes: Any = None, context: Any = None) -> None:
        key = tuple(attributes.items()) if attributes else ()
        try:
            child = self._children[key]
        except KeyError:
            child = self._series.child(key)
        child[0] += amount
        if self._other is not None:
            self._other.add(amount, attributes, context)


class _Histogram:
    """`create_histogram`'s instrument: a bucket count and the sum, per set of attributes."""

    __slots__ = ("_children", "_other", "_series", "_upper")

    def __init__(self, series: _Series, other: Any) -> None:
        self._series = series
        self._children = series.children
        self._upper = series.upper
        self._other = other

    def record(self, amount: float, attributes: Any = None, context: Any = None) -> None:
        key = tuple(attributes.items()) if attributes else ()
        try:
            child = self._children[key]
        except KeyError:
            child = self._series.child(key)
        child[bisect_left(self._upper, amount)] += 1
        child[-1] += amount
        if self._other is not None:
            self._other.record(amount, attributes, context)


class _Native:
    """Multiprocess mode: one instrument's `prometheus_client` metrics, a metric per set of
    attribute names (OpenTelemetry allows any per call, Prometheus wants them declared), and
    the labelled child of each set of attribute values, found again by a dict lookup."""

    __slots__ = ("_children", "_factory", "metrics")

    def __init__(self, factory: Callable[[tuple[str, ...]], Any]) -> None:
        self._factory = factory
        self._children: dict[_Key, Any] = {}
        self.metrics: dict[tuple[str, ...], Any] = {}

    def child(self, attributes: Any) -> Any:
        key = tuple(attributes.items()) if attributes else ()
        try:
            return self._children[key]
        except KeyError:
            pass
        names = tuple(_label(name) for name, _ in key)
        metric = self.metrics.get(names)
        if metric is None:
            metric = self.metrics[names] = self._factory(names)
        child = metric.labels(*(_value(value) for _, value in key)) if names else metric
        self._children[key] = child
        return child


class _NativeTee:
    """Multiprocess mode's instrument: records to `prometheus_client` (this worker's file)
    and, when there is one, to OpenTelemetry."""

    __slots__ = ("_native", "_other")

    def __init__(self, native: _Native, other: Any) -> None:
        self._native = native
        self._other = other

    def add(self, amount: float, attributes: Any = None, context: Any = None) -> None:
        child = self._native.child(attributes)
        if amount >= 0:
            child.inc(amount)
        else:
            child.dec(-amount)
        if self._other is not None:
            self._other.add(amount, attributes, context)

    def record(self, amount: float, attributes: Any = None, context: Any = None) -> None:
        self._native.child(attributes).observe(amount)
        if self._other is not None:
            self._other.record(amount, attributes, context)


class _TeeMeter:
    """What `Telemetry` makes its instruments with while `/metrics` is on."""

    def __init__(self, owner: PrometheusMeter, other: Any) -> None:
        self._owner = owner
        self._other = other

    def create_counter(self, name: str, unit: str = "", description: str = "") -> Any:
        other = self._other.create_counter(name, unit=unit, description=description) if self._other else None
        return self._owner.instrument("counter", name, unit, description, other)

    def create_up_down_counter(self, name: str, unit: str = "", description: str = "") -> Any:
        other = (
            self._other.create_up_down_counter(name, unit=unit, description=description)
            if self._other
            else None
        )
        return self._owner.instrument("gauge", name, unit, description, other)

    def create_histogram(
        self,
        name: str,
        unit: str = "",
        description: str = "",
        *,
        explicit_bucket_boundaries_advisory: Sequence[float] | None = None,
    ) -> Any:
        other = None
        if self._other is not None:
            other = self._other.create_histogram(
                name,
                unit=unit,
                description=description,
                explicit_bucket_boundaries_advisory=explicit_bucket_boundaries_advisory,
            )
        buckets = tuple(explicit_bucket_boundaries_advisory or DURATION_BUCKETS)
        return self._owner.instrument("histogram", name, unit, description, other, buckets)

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
        #: Per Prometheus name, the values its instruments record (every instrument made of
        #: one name, by every meter, shares them).
        self._series: dict[str, _Series] = {}
        self._natives: dict[str, _Native] = {}
        #: Observable gauges, read at each scrape: name -> (description, callbacks).
        self.gauges: dict[str, tuple[str, list[Callable[[Any], Iterable[Any]]]]] = {}
        self.multiprocess = bool(os.environ.get(MULTIPROC_DIR))

    def meter(self, other: Any) -> Any:
        """A meter whose instruments record here and to `other` (an OpenTelemetry meter, or None)."""
        return _TeeMeter(self, other)

    def instrument(
        self,
        kind: str,
        name: str,
        unit: str,
        description: str,
        other: Any,
        buckets: tuple[float, ...] = (),
    ) -> Any:
        """An instrument of `kind` (counter, gauge, histogram) recording here and to `other`."""
        full = _name(name, unit)
        documentation = description or name
        if self.multiprocess:
            return _NativeTee(self._native(kind, full, documentation, buckets), other)
        series = self._series.get(full)
        if series is None:
            # Prometheus's +Inf bucket is always there, past the finite bounds.
            upper = tuple(float(bound) for bound in buckets if bound != float("inf"))
            series = self._series[full] = _Series(kind, full, documentation, upper)
        if kind == "counter":
            return _Counter(series, other)
        if kind == "histogram":
            return _Histogram(series, other)
        return _UpDownCounter(series, other)

    def _native(self, kind: str, full: str, documentation: str, buckets: tuple[float, ...]) -> _Native:
        import prometheus_client

        found = self._natives.get(full)
        if found is not None:
            return found

        def factory(labels: tuple[str, ...]) -> Any:
            # Not in any registry: the multiprocess collector reads their files, and two sets
            # of label names of one instrument would collide in a registry.
            if kind == "counter":
                return prometheus_client.Counter(full, documentation, labels, registry=None)
            if kind == "histogram":
                return prometheus_client.Histogram(
                    full, documentation, labels, registry=None, buckets=buckets
                )
            return prometheus_client.Gauge(
                full, documentation, labels, registry=None, multiprocess_mode="livesum"
            )

        found = self._natives[full] = _Native(factory)
        return found

    def exposition(self) -> tuple[bytes, str]:
        """The text a scrape gets, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        if self.multiprocess:
            from prometheus_client import multiprocess

            # Every worker's counters and histograms, summed; the gauges are this worker's.
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(_Collector(self))
        return generate_latest(registry), CONTENT_TYPE_LATEST


class _Collector:
    def __init__(self, owner: PrometheusMeter) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Any]:
        from prometheus_client import metrics
        from prometheus_client.core import GaugeMetricFamily

        # `prometheus_client.disable_created_metrics()` (or PROMETHEUS_DISABLE_CREATED_SERIES)
        # leaves out the `_created` samples, as it does for its own metrics.
        created = getattr(metrics, "_use_created", True)
        # (Multiprocess mode has no series: the multiprocess collector reads its metrics' files.)
        for series in list(self._owner._series.values()):
            family = series.families(created)
            if family is not None:
                yield family
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
