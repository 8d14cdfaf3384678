"""A change to the OpenTelemetry SDK (opentelemetry-sdk 1.45) that makes each recorded span
cheaper, applied by monkey-patching for measurement: `bench/instructions.py --sdk-patch PARTS`
counts it, `bench/run.py --only fastapi-all,fastapi-all-patched,asgiproxy [--sdk-patch PARTS]`
measures it under load (`BENCH_SDK_PATCH` in bench/apps/gateway_app.py).

Each part keeps what the SDK does for every caller; it only skips work whose result is
thrown away or never differs:

- ``attributes``: `BoundedAttributes` stores values of the types `_clean_attribute_value` returns
  unchanged (str within the length limit, bool, int, float, bytes, None) as they are, in one dict
  update for a mapping that fits, instead of one checking call and one locked call per value.
  Anything else (sequences, mappings, other types, a full mapping) goes the SDK's way.
- ``lists``: a span makes the `BoundedList`s for its events and links (a deque and a lock each)
  when the first one is added, not up front for every span; `Span.__init__` sets its fields
  itself instead of through `ReadableSpan.__init__`'s keyword arguments.
- ``end``: `Span.end` hands the span itself to the processors instead of a `ReadableSpan` copy
  of its fields (the copy shares the attributes, events and links anyway, and nothing can change
  an ended span), and does not call the no-op end-metrics function when the SDK's own metrics
  are off.
- ``start``: `Tracer.start_span` takes the trace flags from four made once instead of building
  them (twice) per span, compares the sampling decision instead of calling its methods, and
  skips the SDK's own span metrics when they are off (a no-op call per span).

`apply("all")` applies every part. The parts are independent. What each saves, counted and
under load, is in docs/performance.md ("Tracing every request: the SDK is the wall");
tests/test_bench_sdk_patch.py checks that the patched SDK records what the SDK records.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterable
from typing import Any

__all__ = ["PARTS", "apply"]

PARTS = ("attributes", "lists", "end", "start")

_applied: set[str] = set()


def apply(parts: str | Iterable[str]) -> list[str]:
    """Patch the SDK with `parts` ("all", or names from PARTS, comma-separated): the parts applied."""
    if isinstance(parts, str):
        names = list(PARTS) if parts == "all" else [p for p in parts.split(",") if p]
    else:
        names = list(parts)
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        raise SystemExit(f"bench: unknown SDK patch parts {unknown}; known: {', '.join(PARTS)}, all")
    for name in names:
        if name not in _applied:
            _PATCHES[name]()
            _applied.add(name)
    return names


def _attributes() -> None:
    from opentelemetry import attributes

    bounded = attributes.BoundedAttributes
    original_setitem = bounded.__setitem__
    original_set_items = bounded._set_items
    # The types _clean_attribute_value returns as they are (str also, within the length limit).
    unchanged = frozenset((bool, int, float, bytes, type(None)))

    def __setitem__(self: Any, key: str, value: Any) -> None:
        kind = type(value)
        limit = self.max_value_len
        maxlen = self.maxlen
        if (
            self._immutable
            or type(key) is not str
            or not key
            or not (kind in unchanged or (kind is str and (limit is None or len(value) <= limit)))
            # Full (or a limit of 0): the SDK's own eviction and counting.
            or (maxlen is not None and len(self._dict) >= maxlen and key not in self._dict)
        ):
            original_setitem(self, key, value)
            return
        with self._lock:
            values = self._dict
            if key in values:
                del values[key]
            values[key] = value

    def _set_items(self: Any, items: Any) -> None:
        maxlen = self.maxlen
        if self._immutable or (maxlen is not None and len(self._dict) + len(items) > maxlen):
            original_set_items(self, items)
            return
        limit = self.max_value_len
        for key, value in items.items():
            kind = type(value)
            if (
                type(key) is not str
                or not key
                or not (kind in unchanged or (kind is str and (limit is None or len(value) <= limit)))
            ):
                original_set_items(self, items)
                return
        with self._lock:
            values = self._dict
            if values:
                # As _setitem_locked: a key set again moves to the end.
                for key in items:
                    values.pop(key, None)
            values.update(items)

    bounded.__setitem__ = __setitem__  # type: ignore[method-assign]
    bounded._set_items = _set_items  # type: ignore[method-assign]


def _lists() -> None:
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk import trace as sdk_trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util import BoundedList
    from opentelemetry.trace import SpanKind

    span = sdk_trace.Span
    unset_status = inspect.signature(sdk_trace.ReadableSpan.__init__).parameters["status"].default
    default_processor = inspect.signature(span.__init__).parameters["span_processor"].default
    unset_limits = sdk_trace._UnsetLimits  # type: ignore[attr-defined]
    # Shared by every span with no events (or no links) until one is added.
    none: tuple[Any, ...] = ()

    def __init__(
        self: Any,
        name: str,
        context: Any,
        parent: Any = None,
        sampler: Any = None,
        trace_config: None = None,
        resource: Any = None,
        attributes: Any = None,
        events: Any = None,
        links: Any = (),
        kind: Any = SpanKind.INTERNAL,
        span_processor: Any = default_processor,
        instrumentation_info: Any = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        limits: Any = unset_limits,
        instrumentation_scope: Any = None,
        *,
        record_end_metrics: Any = None,
    ) -> None:
        self._name = name
        self._context = context
        self._kind = kind
        self._instrumentation_info = instrumentation_info
        self._instrumentation_scope = instrumentation_scope
        self._parent = parent
        self._start_time = None
        self._end_time = None
        self._resource = Resource.create({}) if resource is None else resource
        self._status = unset_status
        self._sampler = sampler
        self._trace_config = trace_config
        self._record_exception = record_exception
        self._set_status_on_exception = set_status_on_exception
        self._span_processor = span_processor
        self._limits = limits
        self._lock = threading.Lock()
        self._attributes = BoundedAttributes(
            limits.max_span_attributes,
            attributes,
            immutable=False,
            max_value_len=limits.max_span_attribute_length,
        )
        self._events = none
        if events:
            self._events = self._new_events()
            for event in events:
                event._attributes = BoundedAttributes(
                    limits.max_event_attributes,
                    event.attributes,
                    max_value_len=limits.max_attribute_length,
                    immutable=True,
                )
                self._events.append(event)
        self._links = self._new_links(links) if links else none
        self._record_end_metrics = record_end_metrics

    @sdk_trace._check_span_ended  # type: ignore[attr-defined]
    def _add_event(self: Any, event: Any) -> None:
        if self._events is none:
            self._events = BoundedList(self._limits.max_events)
        self._events.append(event)

    @sdk_trace._check_span_ended  # type: ignore[attr-defined]
    def _add_link(self: Any, link: Any) -> None:
        if self._links is none:
            self._links = BoundedList(self._limits.max_links)
        self._links.append(link)

    span.__init__ = __init__  # type: ignore[method-assign]
    span._add_event = _add_event  # type: ignore[method-assign]
    span._add_link = _add_link  # type: ignore[method-assign]


def _end() -> None:
    from opentelemetry.sdk import trace as sdk_trace
    from opentelemetry.sdk.trace import _tracer_metrics

    span = sdk_trace.Span
    noop = _tracer_metrics.noop

    def end(self: Any, end_time: int | None = None) -> None:
        with self._lock:
            if self._start_time is None:
                raise RuntimeError("Calling end() on a not started span.")
            if self._end_time is not None:
                sdk_trace.logger.warning("Calling end() on an ended span.")
                return
            self._end_time = end_time if end_time is not None else sdk_trace.time_ns()
            self._attributes._immutable = True
        record = self._record_end_metrics
        if record is not None and record is not noop:
            record()
        processor = self._span_processor
        processor._on_ending(self)
        # The span itself: ended, nothing can change it (set_attribute, set_status, add_event
        # and update_name all refuse), and a copy would share its attributes, events and links.
        processor.on_end(self)

    span.end = end  # type: ignore[method-assign]


def _start() -> None:
    from opentelemetry import trace as trace_api
    from opentelemetry.sdk import trace as sdk_trace
    from opentelemetry.sdk.trace._tracer_metrics import NoOpTracerMetrics
    from opentelemetry.sdk.trace.sampling import Decision

    flags = trace_api.TraceFlags
    # (sampled, random trace id) -> the span's trace flags.
    made = {
        (sampled, random): flags(
            (flags.SAMPLED if sampled else flags.DEFAULT) | (flags.RANDOM_TRACE_ID if random else 0)
        )
        for sampled in (False, True)
        for random in (False, True)
    }
    span_context = trace_api.SpanContext
    non_recording = trace_api.NonRecordingSpan
    get_current_span = trace_api.get_current_span
    sample, drop = Decision.RECORD_AND_SAMPLE, Decision.DROP
    internal = trace_api.SpanKind.INTERNAL

    def start_span(
        self: Any,
        name: str,
        context: Any = None,
        kind: Any = internal,
        attributes: Any = None,
        links: Any = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Any:
        links = links or ()
        parent = get_current_span(context).get_span_context()
        if parent is not None and not isinstance(parent, span_context):
            raise TypeError("parent_span_context must be a SpanContext or None.")
        if not self._tracer_config.is_enabled:
            return non_recording(context=parent)
        ids = self.id_generator
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = ids.generate_trace_id()
            random = ids.is_trace_id_random()
        else:
            trace_id = parent.trace_id
            random = parent.trace_flags.random_trace_id
        result = self.sampler.should_sample(context, trace_id, name, kind, attributes, links)
        decision = result.decision
        new_context = span_context(
            trace_id,
            ids.generate_span_id(),
            is_remote=False,
            trace_flags=made[decision is sample, bool(random)],
            trace_state=result.trace_state,
        )
        metrics = self._tracer_metrics
        end_metrics = None if type(metrics) is NoOpTracerMetrics else metrics.start_span(parent, decision)
        if decision is drop:
            return non_recording(context=new_context)
        span = sdk_trace._Span(
            name=name,
            context=new_context,
            parent=parent,
            sampler=self.sampler,
            resource=self.resource,
            attributes=result.attributes,
            span_processor=self.span_processor,
            kind=kind,
            links=links,
            instrumentation_info=self.instrumentation_info,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
            limits=self._span_limits,
            instrumentation_scope=self._instrumentation_scope,
            record_end_metrics=end_metrics,
        )
        span.start(start_time=start_time, parent_context=context)
        return span

    sdk_trace.Tracer.start_span = start_span  # type: ignore[method-assign]


_PATCHES = {
    "attributes": _attributes,
    "lists": _lists,
    "end": _end,
    "start": _start,
}
