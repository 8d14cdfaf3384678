"""Trace context through raw ASGI headers: the global propagator, and what is known about it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from opentelemetry import context, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, Setter, TextMapPropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ._types import Headers, Request

if TYPE_CHECKING:
    from opentelemetry.trace import Span


class _HeaderGetter(Getter[Headers]):
    """Reads propagation fields from raw ASGI header pairs (lower-case names)."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [value.decode("latin-1") for header, value in carrier if header == name]
        return values or None

    def keys(self, carrier: Headers) -> list[str]:
        return [header.decode("latin-1") for header, _ in carrier]


class _HeaderSetter(Setter[Headers]):
    def set(self, carrier: Headers, key: str, value: str) -> None:
        carrier.append((key.lower().encode("latin-1"), value.encode("latin-1")))


HEADER_GETTER: Final = _HeaderGetter()
HEADER_SETTER: Final = _HeaderSetter()


class _Propagation:
    """The global propagator, with what can be known about it once.

    W3C trace context and baggage (the default, and what Jaeger reads) are written
    directly, as their propagators would write them; any other propagator is called.
    """

    __slots__ = ("baggage", "fields", "propagator", "tracecontext", "w3c")

    def __init__(self, propagator: TextMapPropagator) -> None:
        self.propagator = propagator
        self.fields = frozenset(field.lower().encode("latin-1") for field in propagator.fields)
        members = (
            getattr(propagator, "_propagators", None) if type(propagator) is CompositePropagator else None
        )
        if members is None:
            members = [propagator]
        kinds = [type(member) for member in members]
        self.w3c = all(kind in (TraceContextTextMapPropagator, W3CBaggagePropagator) for kind in kinds)
        self.tracecontext = TraceContextTextMapPropagator in kinds
        self.baggage = next((member for member in members if type(member) is W3CBaggagePropagator), None)

    def extract(self, headers: Headers) -> context.Context | None:
        """The parent context the request's headers carry (None: no parent)."""
        if self.w3c:
            fields = self.fields
            for name, _ in headers:
                if name in fields:
                    break
            else:
                return None
        return self.propagator.extract(headers, getter=HEADER_GETTER)

    def inject(self, request: Request, span: Span, baggage: bool = True) -> None:
        fields = self.fields
        headers = request.headers
        for name, _ in headers:
            if name in fields:
                # The client's (or the previous attempt's) traceparent names another parent.
                headers = request.headers = [header for header in headers if header[0] not in fields]
                break
        if not self.w3c:
            self.propagator.inject(headers, context=trace.set_span_in_context(span), setter=HEADER_SETTER)
            return
        if self.tracecontext:
            # A SpanContext is a tuple: unpacked, its fields cost no property calls.
            trace_id, span_id, _, flags, trace_state, valid = span.get_span_context()
            if valid:
                headers.append((b"traceparent", b"00-%032x-%016x-%02x" % (trace_id, span_id, flags)))
                if trace_state is not trace.DEFAULT_TRACE_STATE and trace_state:
                    headers.append((b"tracestate", trace_state.to_header().encode("latin-1")))
        if baggage and self.baggage is not None:
            # Baggage lives in the current context, where the request's span is too.
            self.baggage.inject(headers, setter=HEADER_SETTER)
