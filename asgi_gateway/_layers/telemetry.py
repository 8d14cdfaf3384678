"""The telemetry layer: one CLIENT span per attempt on the wire, just above the transport.

Each attempt gets a CLIENT span named after the method, a child of the request's
server span, with the HTTP semantic-convention attributes, and its own W3C
`traceparent`, so the upstream's spans hang under the attempt that reached them.
The span ends when the response is closed, so it covers the body transfer too (a
WebSocket handshake's ends with its head: the session that follows is not the attempt).

An unsampled request gets no CLIENT span, only the unsampled traceparent (so the
upstream keeps the sampling decision); with tracing off, the request goes through
untouched.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import anyio
from opentelemetry import context, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from .._exceptions import ClientDisconnected
from .._semconv import (
    ERROR_TYPE,
    GATEWAY_HEDGE_CANCELLED,
    HTTP_REQUEST_METHOD,
    HTTP_REQUEST_METHOD_ORIGINAL,
    HTTP_REQUEST_RESEND_COUNT,
    HTTP_RESPONSE_STATUS_CODE,
    NETWORK_PEER_ADDRESS,
    SERVER_ADDRESS,
    SERVER_PORT,
    URL_FULL,
    error_type,
    method_attributes,
)
from .._telemetry import SPAN_KEY, Telemetry, span_of
from .._types import Handler, Request, Response, Server

if TYPE_CHECKING:
    from opentelemetry.metrics import Histogram
    from opentelemetry.trace import Span

__all__ = ["TelemetryLayer"]

# Query parameters whose values semconv says to redact from url.full (signed URLs).
_SENSITIVE_QUERY = re.compile(rb"([?&](?:AWSAccessKeyId|Signature|sig|X-Goog-Signature)=)[^&#]*")


class TelemetryLayer(Handler):
    """Wraps the transport: a CLIENT span and `http.client.request.duration` per attempt."""

    def __init__(self, inner: Handler, telemetry: Telemetry, *, ends_at_head: bool = False) -> None:
        self.inner = inner
        self._telemetry = telemetry
        #: End the span and the measurement with the response head rather than at its close:
        #: for a WebSocket handshake, whose "body" is the session that follows.
        self._ends_at_head = ends_at_head
        #: Per server: method -> {http.request.method, server.address, server.port}, made once.
        self._attributes: dict[Server, dict[str, dict[str, AttributeValue]]] = {}

    def handle_request(self, request: Request) -> Awaitable[Response]:
        telemetry = self._telemetry
        tracer = telemetry.tracer
        if tracer is None or request.exchange.span is None:
            if tracer is not None:
                # Unsampled: no CLIENT span, but the upstream must learn the sampling decision.
                _inject_current(telemetry, request)
            if telemetry.client_duration is None:
                # Nothing to record: the transport's own coroutine, not one awaiting it.
                return self.inner.handle_request(request)
        return self._measured(request)

    async def _measured(self, request: Request) -> Response:
        telemetry = self._telemetry
        tracer = telemetry.tracer
        histogram = telemetry.client_duration
        parent = request.exchange.span
        server = request.server
        assert server is not None, "the failover layer sets request.server"
        method = request.method
        by_method = self._attributes.get(server)
        base = by_method.get(method) if by_method is not None else None
        if base is None:
            base = self._base_attributes(server, method)
        span: Span | None = None
        if tracer is not None and parent is not None:
            try:
                target = request.target
                if b"?" in target:
                    target = _SENSITIVE_QUERY.sub(rb"\1REDACTED", target)
                attributes: dict[str, AttributeValue] = {
                    **base,
                    URL_FULL: server.url + target.decode("latin-1"),
                }
                name = method
                if base[HTTP_REQUEST_METHOD] == "_OTHER":
                    attributes[HTTP_REQUEST_METHOD_ORIGINAL] = method
                    name = "HTTP"
                attempts = request.exchange.attempts
                if attempts > 1:
                    attributes[HTTP_REQUEST_RESEND_COUNT] = attempts - 1
                current = context.get_current()
                if current.get(SPAN_KEY) is parent:
                    # The server span is current in the request's task: handed to the SDK,
                    # which saves it looking the context up again.
                    span = tracer.start_span(name, current, SpanKind.CLIENT, attributes)
                    # Beside the server span, only baggage would make the context longer.
                    telemetry.propagation().inject(request, span, len(current) > 1)
                else:
                    # A caller on another context: the parent spelt out.
                    span = tracer.start_span(
                        name, trace.set_span_in_context(parent, current), SpanKind.CLIENT, attributes
                    )
                    telemetry.propagation().inject(request, span)
                if not span.is_recording():
                    span = None
            except Exception as exc:
                telemetry.report("client span start", exc)
                span = None
            if span is None and histogram is None:
                return await self.inner.handle_request(request)
        end = _AttemptEnd(telemetry, request, span, base, histogram)
        try:
            response = await self.inner.handle_request(request)
        except BaseException as exc:
            end(None, exc)
            raise
        status = end.status = response.status
        if status >= 400:
            end.failed_status(response)
        elif span is not None:
            try:
                # One set_attribute call per value costs the SDK less than a dict of them.
                span.set_attribute(HTTP_RESPONSE_STATUS_CODE, status)
                if response.peer_address is not None:
                    span.set_attribute(NETWORK_PEER_ADDRESS, response.peer_address)
            except Exception as exc:
                telemetry.report("client span", exc)
        if self._ends_at_head:
            end(response, None)
        else:
            response.on_close(end)
        return response

    def _base_attributes(self, server: Server, method: str) -> dict[str, AttributeValue]:
        """`http.request.method`, `server.address` and `server.port`: shared, never mutated."""
        value = method_attributes(method)[0]
        attributes: dict[str, AttributeValue] = {
            HTTP_REQUEST_METHOD: value,
            SERVER_ADDRESS: server.host,
            SERVER_PORT: server.port,
        }
        if value != "_OTHER":
            # Other methods are made again each time, so a client cannot grow this table.
            self._attributes.setdefault(server, {})[method] = attributes
        return attributes

    async def aclose(self) -> None:
        await self.inner.aclose()


def _inject_current(telemetry: Telemetry, request: Request) -> None:
    """The current span's traceparent (an unsampled one: no CLIENT span) goes upstream."""
    try:
        current = context.get_current()
        span = span_of(current)
        # Beside the request's span, only baggage would make the context longer.
        baggage = len(current) > (0 if span is trace.INVALID_SPAN else 1)
        telemetry.propagation().inject(request, span, baggage)
    except Exception as exc:
        telemetry.report("trace context injection", exc)


class _AttemptEnd:
    """Ends an attempt's span and records its duration, once the response is closed.

    Called as `end(response, error)` by the response's close (or with `None` and the
    error when the attempt raised before a response head).
    """

    __slots__ = (
        "base_attributes",
        "error_type",
        "histogram",
        "request",
        "span",
        "start",
        "status",
        "telemetry",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        request: Request,
        span: Span | None,
        base_attributes: dict[str, AttributeValue],
        histogram: Histogram | None,
    ) -> None:
        self.telemetry = telemetry
        self.request = request
        self.span = span
        self.base_attributes = base_attributes
        self.histogram = histogram
        self.status: int | None = None
        self.error_type: str | None = None
        self.start = time.perf_counter() if histogram is not None else 0.0

    def failed_status(self, response: Response) -> None:
        """A 4xx or 5xx response head arrived: an error on the CLIENT span."""
        status = response.status
        failure = self.error_type = str(status)
        span = self.span
        if span is None:
            return
        try:
            attributes: dict[str, AttributeValue] = {HTTP_RESPONSE_STATUS_CODE: status, ERROR_TYPE: failure}
            if response.peer_address is not None:
                attributes[NETWORK_PEER_ADDRESS] = response.peer_address
            span.set_status(Status(StatusCode.ERROR))
            span.set_attributes(attributes)
        except Exception as exc:
            self.telemetry.report("client span", exc)

    def __call__(self, response: Response | None, error: BaseException | None) -> None:
        histogram = self.histogram
        duration = time.perf_counter() - self.start if histogram is not None else 0.0
        if error is not None:
            self.error_type = error_type(error)
        span = self.span
        if span is not None:
            try:
                if self.request.superseded:
                    # Another try of the request answered first: this one was called off.
                    span.set_attribute(GATEWAY_HEDGE_CANCELLED, True)
                if error is not None:
                    span.set_attribute(ERROR_TYPE, self.error_type or "")
                    if not _called_off(error):
                        span.set_status(Status(StatusCode.ERROR, str(error) or None))
                span.end()
            except Exception as exc:
                self.telemetry.report("client span end", exc)
        if histogram is None:
            return
        attributes = self.base_attributes
        if self.status is not None or self.error_type is not None:
            attributes = attributes.copy()
            if self.status is not None:
                attributes[HTTP_RESPONSE_STATUS_CODE] = self.status
            if self.error_type is not None:
                attributes[ERROR_TYPE] = self.error_type
        try:
            histogram.record(duration, attributes)
        except Exception as exc:
            self.telemetry.report("client duration metric", exc)


def _called_off(error: BaseException) -> bool:
    """Whether the attempt was abandoned by us (client gone, deadline) rather than failed."""
    return isinstance(error, ClientDisconnected | anyio.get_cancelled_exc_class())
