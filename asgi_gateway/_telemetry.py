"""The SERVER span of each proxied request and WebSocket session, and what ends with it.

One `Telemetry` per gateway. The middleware calls `start` when a request matched a
route and `finish` once it is over; the WebSocket path does the same for a session,
with `kind=WEBSOCKET`, and `session_opened` once the client has been accepted.
`finish` records `http.server.request.duration` (for a session, the open-sessions
count), ends the span and writes the access log (`_logging.access_log`).

A `Telemetry` is an `_telemetry_instruments.Instruments`: the tracer and the metric
instruments, found lazily from the providers. `events` turns what the layers report
(retries, ejections, failovers) into span events and metrics (`_telemetry_events`);
the CLIENT span per attempt is `_layers.telemetry.TelemetryLayer`'s.

Tracing costs nothing when no SDK is configured: the providers are resolved lazily
and, while they are the API's no-op or proxy defaults, no span, context or attribute
is made. Telemetry never fails a request: whatever the SDK, an exporter or a span
processor raises is logged (rate-limited) and swallowed.
"""

from __future__ import annotations

import logging
import os
import time
from contextvars import Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import anyio
from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from ._exceptions import ClientDisconnected, ClientRequestError
from ._logging import access_log
from ._propagation import _Propagation
from ._routing import Route
from ._semconv import (
    CLIENT_ADDRESS,
    ERROR_TYPE,
    GATEWAY_UPSTREAM,
    HTTP_REQUEST_METHOD,
    HTTP_REQUEST_METHOD_ORIGINAL,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
    METHODS,
    NETWORK_PEER_ADDRESS,
    OTHER_METHOD,
    URL_PATH,
    URL_SCHEME,
    WEBSOCKET_CLOSE_CODE,
    WEBSOCKET_CLOSED_BY,
    WEBSOCKET_MESSAGES_TO_CLIENT,
    WEBSOCKET_MESSAGES_TO_UPSTREAM,
    WEBSOCKET_SESSIONS,
    error_type,
)
from ._telemetry_events import TelemetryEvents
from ._telemetry_instruments import Instruments
from ._types import Exchange, Headers, Request

if TYPE_CHECKING:
    from opentelemetry.metrics import UpDownCounter
    from opentelemetry.trace import Span, Tracer


__all__ = ["HTTP", "WEBSOCKET", "Pending", "SessionKind", "SessionPending", "Telemetry"]

#: `_logging.access_logger` (the same logger), bound here rather than imported: a method of an
#: imported name compiles to an attribute load that makes a bound method, on every request.
access_logger = logging.getLogger("asgi_gateway.access")

ClosedBy = Literal["client", "upstream", "gateway"]


@dataclass(frozen=True, slots=True, eq=False)
class SessionKind:
    """What a server span stands for: an HTTP request or a WebSocket session.

    The two share the span's set-up, the providers, the failsafe and the access log's
    common fields; this says where they differ at the start. What differs at the end
    (metrics, the span's last attributes, the access log's text) follows from the token:
    a session's is a `SessionPending`.
    """

    #: Names the span in failure reports: "server span start", "websocket span end".
    name: str
    #: The span name's first word; None for the request's method, as semconv names HTTP spans.
    label: str | None
    #: Whether an instrumented host app's own SERVER span takes the gateway's attributes,
    #: rather than the gateway nesting a span of its own under it. A session nests: its
    #: span carries the message counts and the close that the host's span knows nothing of.
    adopts_host_span: bool


HTTP: Final = SessionKind("server", None, adopts_host_span=True)
WEBSOCKET: Final = SessionKind("websocket", "WebSocket", adopts_host_span=False)


def _span_key() -> str:
    """The context key under which the API keeps the current span, found through the API."""
    keys = list(trace.set_span_in_context(trace.INVALID_SPAN, context.Context()))
    # Should the API ever keep it otherwise, a key never present: the slow paths are taken.
    return keys[0] if len(keys) == 1 else "asgi_gateway.no-such-key"


#: With it, the hot path reads a context's span with a dict lookup: `get_current_span`
#: costs three calls and an ABC instance check.
SPAN_KEY: Final = _span_key()


def span_of(current: context.Context) -> Span:
    """`trace.get_current_span(current)`, cheaper for the unsampled spans the gateway makes."""
    span = current.get(SPAN_KEY)
    if type(span) is trace.NonRecordingSpan:
        return span
    return trace.get_current_span(current)


class Pending:
    """What `start` hands to `finish` for one request."""

    __slots__ = ("context_token", "host", "method", "own", "path", "scheme", "span", "start", "traced")

    def __init__(self, start: float, method: str, path: str, scheme: str) -> None:
        self.start = start
        self.method = method
        self.path = path
        self.scheme = scheme
        #: The recording span carrying the gateway's attributes (ours or the host app's).
        self.span: Span | None = None
        #: True when we started `span` and so must end it.
        self.own = False
        #: True when the host app traces the request itself (and so records its metrics).
        self.host = False
        self.context_token: Token[context.Context] | None = None
        #: Our span, recording or not (its ids go to the access log).
        self.traced: Span | None = None


class SessionPending(Pending):
    """What `start` hands to `finish` for one WebSocket session.

    The session fills in its message counts and how it closed before `finish`.
    """

    __slots__ = ("close_code", "closed_by", "sessions", "to_client", "to_upstream")

    def __init__(self, start: float, path: str, scheme: str) -> None:
        # The handshake is a GET; the scheme is the scope's own, ws or wss.
        super().__init__(start, "GET", path, scheme)
        self.to_upstream = 0
        self.to_client = 0
        self.close_code: int | None = None
        self.closed_by: ClosedBy | None = None
        #: The open-sessions counter this session was counted in, once accepted.
        self.sessions: UpDownCounter | None = None


class Telemetry(Instruments):
    """Everything the gateway reports about a request, in one place.

    `tracer_provider` / `meter_provider` default to the global OpenTelemetry
    providers, looked up on use, so a global provider set after the gateway was
    built still counts. The library never sets a global provider itself.
    """

    def __init__(
        self, tracer_provider: Any = None, meter_provider: Any = None, *, prometheus: bool = False
    ) -> None:
        super().__init__(tracer_provider, meter_provider, prometheus)
        self._names: dict[tuple[str, str], str] = {}
        self._propagation = _Propagation(propagate.get_global_textmap())
        #: While the global providers are the API's proxies, when to look at them again.
        self._resolve_after = 0.0
        # OpenTelemetry's own ASGI instrumentations record http.server.request.duration only
        # when opted in to the stable HTTP conventions; then an instrumented host app's
        # record is the one, and the gateway's would count each request twice.
        opt_in = {mode.strip() for mode in os.environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "").split(",")}
        self._host_records_server_duration = bool(opt_in & {"http", "http/dup"})
        self.events = TelemetryEvents(self)
        self._resolve()

    # -- the request path ------------------------------------------------------------

    def start(
        self, scope: dict[str, Any], route: Route, exchange: Exchange, kind: SessionKind = HTTP
    ) -> Pending:
        """Called when a request (or, with `kind=WEBSOCKET`, a session's handshake) matched
        `route`; returns a token for `finish`."""
        now = time.perf_counter()
        if kind is HTTP:
            pending = Pending(now, scope["method"], scope["path"], exchange.scheme)
        else:
            pending = SessionPending(now, scope.get("path", ""), scope.get("scheme", "ws"))
        if not self._resolved and (now >= self._resolve_after or kind is WEBSOCKET):
            # Requests look at most once a second: an unset global provider must cost
            # nothing. Sessions are few, and one may be the first thing served after a
            # global provider was set: they look each time.
            self._resolve_after = now + 1.0
            self._resolve()
        tracer = self.tracer
        if tracer is not None:
            try:
                self._start_span(tracer, scope, route, exchange, pending, kind)
            except Exception as exc:
                exchange.span = None
                self.report(f"{kind.name} span start", exc)
        return pending

    def _start_span(
        self,
        tracer: Tracer,
        scope: dict[str, Any],
        route: Route,
        exchange: Exchange,
        pending: Pending,
        session: SessionKind,
    ) -> None:
        # Passed on to the SDK explicitly, which saves it looking the context up again.
        current = context.get_current()
        parent = current
        kind = SpanKind.SERVER
        method, label = METHODS.get(pending.method, OTHER_METHOD)
        if session.label is not None:
            label = session.label
        # Usually the context is empty (no host instrumentation, no baggage): then there
        # is no span of the host's to look for.
        host_context = trace.get_current_span(current).get_span_context() if current else None
        if host_context is None or not host_context.is_valid:
            try:
                extracted = self._extract(scope["headers"])
                if extracted is not None:
                    parent = extracted
            except Exception as exc:
                # A broken propagator costs the trace its parent, not the request its span.
                self.report("trace context extraction", exc)
        elif not host_context.is_remote:
            if session.adopts_host_span:
                # The host app traces this request already: never a second SERVER span.
                host = trace.get_current_span(current)
                if not host.is_recording():
                    pending.host = True
                    return
                if getattr(host, "kind", None) is SpanKind.SERVER:
                    host.set_attributes({HTTP_ROUTE: route.path, GATEWAY_UPSTREAM: route.upstream})
                    host.update_name(self._span_name(label, route.path))
                    pending.host = True
                    pending.span = exchange.span = host
                    return
            # Under some other span of the host's (a middleware's INTERNAL span, or the
            # handshake's span for a session): nest, as OpenTelemetry's own instrumentations do.
            kind = SpanKind.INTERNAL
        attributes: dict[str, AttributeValue] = {
            HTTP_ROUTE: route.path,
            HTTP_REQUEST_METHOD: method,
            URL_PATH: pending.path,
            URL_SCHEME: pending.scheme,
            GATEWAY_UPSTREAM: route.upstream,
        }
        if method == "_OTHER":
            attributes[HTTP_REQUEST_METHOD_ORIGINAL] = pending.method
        client_ip = exchange.client_ip
        if client_ip:
            attributes[CLIENT_ADDRESS] = client_ip
            client = scope.get("client")
            # A session's span names the client only, not the proxy it came through.
            if client and client[0] != client_ip and session is HTTP:
                attributes[NETWORK_PEER_ADDRESS] = client[0]
        name = self._names.get((label, route.path)) or self._span_name(label, route.path)
        span = tracer.start_span(name, parent, kind, attributes)
        # Current for the rest of the request: the client layer's CLIENT spans (or, when
        # unsampled, the traceparent sent upstream), an instrumented transport and the
        # user's log correlation use it.
        pending.context_token = context.attach(trace.set_span_in_context(span, parent))
        pending.traced = span
        if span.is_recording():
            pending.span = exchange.span = span
            pending.own = True

    def _extract(self, headers: Headers) -> context.Context | None:
        """The parent context the request's headers carry (None: no parent)."""
        propagation = self._propagation
        if propagation.propagator is not propagate.get_global_textmap():
            propagation = self.propagation()
        return propagation.extract(headers)

    def _span_name(self, label: str, route_path: str) -> str:
        key = (label, route_path)
        name = self._names.get(key)
        if name is None:
            name = self._names[key] = f"{label} {route_path}"
        return name

    def session_opened(self, token: SessionPending, exchange: Exchange) -> None:
        """Called once a session's client was accepted: it counts as open until `finish`."""
        try:
            sessions = self._websocket_sessions
            if sessions is None and self._meter is not None:
                sessions = self._websocket_sessions = self._meter.create_up_down_counter(
                    WEBSOCKET_SESSIONS,
                    unit="{session}",
                    description="WebSocket sessions open through the gateway.",
                )
            if sessions is not None:
                sessions.add(1, _session_attributes(exchange))
                token.sessions = sessions
        except Exception as exc:
            self.report("websocket sessions metric", exc)

    def finish(self, token: Pending, exchange: Exchange, status: int, error: BaseException | None) -> None:
        """Called once the exchange (or the session) is over."""
        duration = time.perf_counter() - token.start
        if token.span is None and token.traced is None and self.server_duration is None:
            # Nothing traced, nothing measured (no session is counted without the request
            # instruments either): only the access log may want this request.
            if access_logger.isEnabledFor(logging.INFO):
                session = token if isinstance(token, SessionPending) else None
                access_log(token, session, exchange, status, error, duration, self.report)
            return
        if isinstance(token, SessionPending):
            self._end_session(token, exchange, status, error)
        else:
            self._end_request(token, exchange, status, error, duration)
        if token.context_token is not None:
            context.detach(token.context_token)
        if access_logger.isEnabledFor(logging.INFO):
            session = token if isinstance(token, SessionPending) else None
            access_log(token, session, exchange, status, error, duration, self.report)

    def _end_request(
        self, token: Pending, exchange: Exchange, status: int, error: BaseException | None, duration: float
    ) -> None:
        """`http.server.request.duration`, and the request's status on its span."""
        if error is None:
            failure = str(status) if status >= 500 else None
            answered = True
        else:
            failure = _error_type(status, error)
            answered = not _unanswered(status, error)
        # Recorded while the request's span is current, so a sampled request leaves an exemplar.
        histogram = self.server_duration
        if histogram is not None and not (token.host and self._host_records_server_duration):
            attributes: dict[str, AttributeValue] = {
                HTTP_REQUEST_METHOD: METHODS.get(token.method, OTHER_METHOD)[0],
                URL_SCHEME: token.scheme,
                HTTP_ROUTE: exchange.route,
            }
            if answered:
                attributes[HTTP_RESPONSE_STATUS_CODE] = status
            if failure is not None:
                attributes[ERROR_TYPE] = failure
            try:
                histogram.record(duration, attributes)
            except Exception as exc:
                self.report("server duration metric", exc)
        span = token.span
        if span is not None:
            try:
                # A host app's instrumentation may have ended its span with the last body
                # chunk; it records the status itself.
                if token.own or span.is_recording():
                    if failure is None:
                        span.set_attribute(HTTP_RESPONSE_STATUS_CODE, status)
                    else:
                        _set_failure(span, status, error, failure, answered)
                if token.own:
                    span.end()
            except Exception as exc:
                self.report("server span end", exc)

    def _end_session(
        self, token: SessionPending, exchange: Exchange, status: int, error: BaseException | None
    ) -> None:
        """The open-sessions count, and the session's messages, close and status on its span."""
        sessions = token.sessions
        if sessions is not None:
            try:
                sessions.add(-1, _session_attributes(exchange))
            except Exception as exc:
                self.report("websocket sessions metric", exc)
        span = token.span
        if span is None:
            return
        try:
            attributes: dict[str, AttributeValue] = {
                HTTP_RESPONSE_STATUS_CODE: status,
                WEBSOCKET_MESSAGES_TO_UPSTREAM: token.to_upstream,
                WEBSOCKET_MESSAGES_TO_CLIENT: token.to_client,
            }
            if token.close_code is not None:
                attributes[WEBSOCKET_CLOSE_CODE] = token.close_code
            if token.closed_by is not None:
                attributes[WEBSOCKET_CLOSED_BY] = token.closed_by
            if error is not None:
                attributes[ERROR_TYPE] = error_type(error)
            elif status >= 500:
                attributes[ERROR_TYPE] = str(status)
            span.set_attributes(attributes)
            # A session cancelled from outside (server shutdown) did not fail.
            failed = error is not None and not isinstance(error, anyio.get_cancelled_exc_class())
            if failed or status >= 500:
                span.set_status(Status(StatusCode.ERROR, str(error) if error is not None else None))
            span.end()
        except Exception as exc:
            self.report("websocket span end", exc)

    # -- propagation -----------------------------------------------------------------

    def propagation(self) -> _Propagation:
        propagator = propagate.get_global_textmap()
        if propagator is not self._propagation.propagator:
            self._propagation = _Propagation(propagator)
        return self._propagation

    def inject(self, request: Request, span: Span, baggage: bool = True) -> None:
        """Replace the propagation headers of `request` with those naming `span` as the parent.

        `baggage=False` tells that the current context holds no baggage (the caller looked).
        """
        self.propagation().inject(request, span, baggage)


def _set_failure(span: Span, status: int, error: BaseException | None, failure: str, answered: bool) -> None:
    """Marks the request's span as failed: error.type, and an ERROR status unless the client left."""
    span.set_attributes(
        {HTTP_RESPONSE_STATUS_CODE: status, ERROR_TYPE: failure} if answered else {ERROR_TYPE: failure}
    )
    if status >= 500 or not isinstance(error, ClientDisconnected):
        description = None
        if error is not None:
            description = f"{error_type(error)}: {error}" if str(error) else error_type(error)
        span.set_status(Status(StatusCode.ERROR, description))


def _unanswered(status: int, error: BaseException | None) -> bool:
    """True when the client went away before any response was sent (logged as 499)."""
    return status == 499 and isinstance(error, ClientDisconnected)


def _session_attributes(exchange: Exchange) -> dict[str, AttributeValue]:
    return {GATEWAY_UPSTREAM: exchange.upstream.name, HTTP_ROUTE: exchange.route}


def _error_type(status: int, error: BaseException | None) -> str | None:
    if error is not None and not isinstance(error, ClientRequestError):
        return error_type(error)
    if status >= 500:
        return str(status)
    return None
