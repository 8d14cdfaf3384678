"""The telemetry layer: one CLIENT span per attempt on the wire, just above the transport.

Each attempt gets a CLIENT span named after the method, a child of the request's
server span, with the HTTP semantic-convention attributes, and its own W3C
`traceparent`, so the upstream's spans hang under the attempt that reached them.
The span ends when the response is closed, so it covers the body transfer too.

An unsampled request gets no CLIENT span, only the unsampled traceparent (so the
upstream keeps the sampling decision); with tracing off, the request goes through
untouched.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

import anyio
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from .._proxy import ClientDisconnected
from .._telemetry import (
    ERROR_TYPE,
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
from .._types import Handler, Request, Response, Server

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from .._telemetry import Telemetry

__all__ = ["TelemetryLayer"]

# Query parameters whose values semconv says to redact from url.full (signed URLs).
_SENSITIVE_QUERY = re.compile(rb"([?&](?:AWSAccessKeyId|Signature|sig|X-Goog-Signature)=)[^&#]*")


def _url_full(server: Server, target: bytes) -> str:
    if b"?" in target:
        target = _SENSITIVE_QUERY.sub(rb"\1REDACTED", target)
    return server.url + target.decode("latin-1")


class TelemetryLayer(Handler):
    """Wraps the transport: a CLIENT span and `http.client.request.duration` per attempt."""

    def __init__(self, inner: Handler, telemetry: Telemetry) -> None:
        self.inner = inner
        self._telemetry = telemetry
        #: server.address / server.port per server, made once.
        self._server_attributes: dict[Server, dict[str, AttributeValue]] = {}

    async def handle_request(self, request: Request) -> Response:
        telemetry = self._telemetry
        parent = request.exchange.span
        if parent is not None and telemetry.tracer is not None:
            return await self._traced(request, parent, telemetry.tracer)
        if telemetry.tracer is not None:
            # Unsampled: no CLIENT span, but the upstream must learn the sampling decision.
            try:
                telemetry.inject(request, trace.get_current_span())
            except Exception as exc:
                telemetry.report("trace context injection", exc)
        if telemetry.client_duration is None:
            return await self.inner.handle_request(request)
        return await self._measured(request, None)

    def _attributes(self, server: Server) -> dict[str, AttributeValue]:
        attributes = self._server_attributes.get(server)
        if attributes is None:
            attributes = self._server_attributes[server] = {
                SERVER_ADDRESS: server.host,
                SERVER_PORT: server.port,
            }
        return attributes

    async def _traced(self, request: Request, parent: Span, tracer: Tracer) -> Response:
        telemetry = self._telemetry
        server = request.server
        assert server is not None, "the failover layer sets request.server"
        method, name = method_attributes(request.method)
        attributes: dict[str, AttributeValue] = {
            HTTP_REQUEST_METHOD: method,
            URL_FULL: _url_full(server, request.target),
            **self._attributes(server),
        }
        if method == "_OTHER":
            attributes[HTTP_REQUEST_METHOD_ORIGINAL] = request.method
        attempts = request.exchange.attempts
        if attempts > 1:
            attributes[HTTP_REQUEST_RESEND_COUNT] = attempts - 1
        span: Span | None = None
        try:
            # The server span is current in the request's task; only a caller on another
            # context needs it spelt out.
            parent_context = None if trace.get_current_span() is parent else trace.set_span_in_context(parent)
            span = tracer.start_span(
                name, context=parent_context, kind=SpanKind.CLIENT, attributes=attributes
            )
            telemetry.inject(request, span)
        except Exception as exc:
            telemetry.report("client span start", exc)
        if span is not None and not span.is_recording():
            span = None
        return await self._measured(request, span)

    async def _measured(self, request: Request, span: Span | None) -> Response:
        server = request.server
        assert server is not None, "the failover layer sets request.server"
        end = _AttemptEnd(
            self._telemetry, span, method_attributes(request.method)[0], self._attributes(server)
        )
        try:
            response = await self.inner.handle_request(request)
        except BaseException as exc:
            end.failed(exc)
            raise
        end.answered(response)
        response.on_close(end)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class _AttemptEnd:
    """Ends an attempt's span and records its duration, once the response is closed."""

    __slots__ = ("error_type", "method", "server_attributes", "span", "start", "status", "telemetry")

    def __init__(
        self,
        telemetry: Telemetry,
        span: Span | None,
        method: str,
        server_attributes: dict[str, AttributeValue],
    ) -> None:
        self.telemetry = telemetry
        self.span = span
        self.method = method
        self.server_attributes = server_attributes
        self.status: int | None = None
        self.error_type: str | None = None
        self.start = time.perf_counter()

    def answered(self, response: Response) -> None:
        """The response head arrived."""
        status = self.status = response.status
        if status >= 400:
            self.error_type = str(status)
        span = self.span
        if span is None:
            return
        try:
            attributes: dict[str, AttributeValue] = {HTTP_RESPONSE_STATUS_CODE: status}
            if response.peer_address is not None:
                attributes[NETWORK_PEER_ADDRESS] = response.peer_address
            if status >= 400:
                attributes[ERROR_TYPE] = str(status)
                span.set_status(Status(StatusCode.ERROR))
            span.set_attributes(attributes)
        except Exception as exc:
            self.telemetry.report("client span", exc)

    def failed(self, error: BaseException) -> None:
        """The attempt raised before a response head."""
        self._end(error)

    def __call__(self, response: Response, error: BaseException | None) -> None:
        self._end(error)

    def _end(self, error: BaseException | None) -> None:
        duration = time.perf_counter() - self.start
        telemetry = self.telemetry
        try:
            if error is not None:
                self.error_type = error_type(error)
            span = self.span
            if span is not None:
                if error is not None:
                    span.set_attribute(ERROR_TYPE, self.error_type or "")
                    if not _called_off(error):
                        span.set_status(Status(StatusCode.ERROR, str(error) or None))
                span.end()
        except Exception as exc:
            telemetry.report("client span end", exc)
        histogram = telemetry.client_duration
        if histogram is None:
            return
        attributes: dict[str, AttributeValue] = {HTTP_REQUEST_METHOD: self.method, **self.server_attributes}
        if self.status is not None:
            attributes[HTTP_RESPONSE_STATUS_CODE] = self.status
        if self.error_type is not None:
            attributes[ERROR_TYPE] = self.error_type
        try:
            histogram.record(duration, attributes)
        except Exception as exc:
            telemetry.report("client duration metric", exc)


def _called_off(error: BaseException) -> bool:
    """Whether the attempt was abandoned by us (client gone, deadline) rather than failed."""
    return isinstance(error, ClientDisconnected | anyio.get_cancelled_exc_class())
