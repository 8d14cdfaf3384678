"""Traces, metrics and the access log, checked with the SDK's in-memory exporter and reader.

The gateway runs in-process (httpx.ASGITransport) over a scripted transport, so every
attempt's outcome, peer address and received headers are under the test's control.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import baggage, context, metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import SpanKind, StatusCode, TraceFlags

from asgi_gateway import ConnectError, Gateway, GatewayMiddleware, JsonFormatter
from asgi_gateway._config import load_config
from asgi_gateway._layers.telemetry import TelemetryLayer
from asgi_gateway._stack import make_servers
from asgi_gateway._telemetry import SPAN_KEY, Telemetry, span_of
from asgi_gateway._types import Exchange, Request, RequestBody, Response, Transport

pytestmark = pytest.mark.anyio

CLIENT_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN_ID = "b7ad6b7169203331"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- a scripted upstream -----------------------------------------------------------------


class Body:
    def __init__(self, chunks: Sequence[bytes] = (b"ok",)) -> None:
        self.chunks = list(chunks)
        self.closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk

    async def aclose(self) -> None:
        self.closed = True


Outcome = int | BaseException


class ScriptedTransport(Transport):
    """Answers each attempt with the next outcome (a status or an exception to raise)."""

    def __init__(self, *outcomes: Outcome, peer: str = "10.1.2.3") -> None:
        self.outcomes = list(outcomes)
        self.peer = peer
        #: (server url, method, target, headers) of every attempt.
        self.seen: list[tuple[str, str, bytes, list[tuple[bytes, bytes]]]] = []

    async def handle_request(self, request: Request) -> Response:
        assert request.server is not None
        self.seen.append((request.server.url, request.method, request.target, list(request.headers)))
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return Response(outcome, [(b"content-type", b"text/plain")], Body(), request.server, self.peer)

    def header(self, attempt: int, name: bytes) -> list[bytes]:
        return [value for key, value in self.seen[attempt][3] if key == name]


def make_config(servers: Sequence[dict[str, Any]] | None = None, **upstream: Any) -> dict[str, Any]:
    return {
        "routes": [{"path": "/api/users", "upstream": "users"}],
        "upstreams": {
            "users": {
                "servers": list(servers or [{"url": "http://10.0.0.1:9001"}]),
                "retry": {"backoff_base": 0.001, "backoff_max": 0.002},
                **upstream,
            }
        },
    }


# -- OpenTelemetry SDK in memory ---------------------------------------------------------


class Otel:
    def __init__(self, sampler: Any = None) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(sampler=sampler) if sampler else TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    @property
    def providers(self) -> dict[str, Any]:
        return {"tracer_provider": self.tracer_provider, "meter_provider": self.meter_provider}

    def spans(self, kind: SpanKind | None = None) -> list[ReadableSpan]:
        spans = self.exporter.get_finished_spans()
        return [span for span in spans if kind is None or span.kind == kind]

    def server_span(self) -> ReadableSpan:
        (span,) = self.spans(SpanKind.SERVER)
        return span

    def collect(self, scope: str | None = "asgi_gateway") -> dict[str, list[Any]]:
        """Data points by metric name, from one collection (exemplars are reset by each)."""
        data = self.reader.get_metrics_data()
        found: dict[str, list[Any]] = {}
        for resource_metrics in data.resource_metrics if data else []:
            for scope_metrics in resource_metrics.scope_metrics:
                if scope is not None and scope_metrics.scope.name != scope:
                    continue
                for metric in scope_metrics.metrics:
                    found.setdefault(metric.name, []).extend(metric.data.data_points)
        return found

    def points(self, name: str, scope: str | None = "asgi_gateway") -> list[Any]:
        return self.collect(scope).get(name, [])

    def close(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def otel() -> Iterator[Otel]:
    sdk = Otel()
    yield sdk
    sdk.close()


async def call(
    app: Any, path: str = "/api/users/7?q=1", method: str = "GET", headers: dict[str, str] | None = None
) -> httpx.Response:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://gateway.test"
    ) as client:
        return await client.request(method, path, headers=headers)


def parse_traceparent(value: bytes) -> tuple[str, str, bool]:
    """(trace id, parent id, sampled) of a W3C traceparent header."""
    _version, trace_id, parent_id, flags = value.decode().split("-")
    return trace_id, parent_id, bool(int(flags, 16) & 1)


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return trace.format_trace_id(span.context.trace_id), trace.format_span_id(span.context.span_id)


# -- spans -------------------------------------------------------------------------------


async def test_server_span_continues_the_incoming_trace(otel: Otel) -> None:
    upstream = ScriptedTransport(200)
    app = Gateway(make_config(), transport=upstream, **otel.providers)

    response = await call(app, headers={"traceparent": CLIENT_TRACEPARENT})

    assert response.status_code == 200
    span = otel.server_span()
    assert span.name == "GET /api/users"
    assert dict(span.attributes or {}) == {
        "http.route": "/api/users",
        "http.request.method": "GET",
        "url.path": "/api/users/7",
        "url.scheme": "http",
        "client.address": "127.0.0.1",
        "gateway.upstream": "users",
        "http.response.status_code": 200,
    }
    assert span.status.status_code is StatusCode.UNSET
    assert hex_ids(span)[0] == CLIENT_TRACE_ID
    assert span.parent is not None and span.parent.is_remote
    assert trace.format_span_id(span.parent.span_id) == CLIENT_SPAN_ID


async def test_client_span_per_attempt_with_semconv_attributes(otel: Otel) -> None:
    upstream = ScriptedTransport(200, peer="10.9.8.7")
    app = Gateway(make_config(), transport=upstream, **otel.providers)

    await call(app, headers={"traceparent": CLIENT_TRACEPARENT, "tracestate": "client=1", "baggage": "k=v"})

    server = otel.server_span()
    (client,) = otel.spans(SpanKind.CLIENT)
    assert client.name == "GET"
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert dict(client.attributes or {}) == {
        "http.request.method": "GET",
        "url.full": "http://10.0.0.1:9001/api/users/7?q=1",
        "server.address": "10.0.0.1",
        "server.port": 9001,
        "network.peer.address": "10.9.8.7",
        "http.response.status_code": 200,
    }
    assert client.status.status_code is StatusCode.UNSET
    # The span covers the body: it ends after the response was closed, inside the server span.
    assert client.end_time is not None and server.end_time is not None
    assert client.end_time <= server.end_time
    # The upstream sees the attempt's CLIENT span as parent, not the client's span; the
    # client's tracestate and baggage still travel, through the extracted context.
    trace_id, span_id = hex_ids(client)
    (sent,) = upstream.header(0, b"traceparent")
    assert parse_traceparent(sent) == (trace_id, span_id, True)
    assert upstream.header(0, b"tracestate") == [b"client=1"]
    assert upstream.header(0, b"baggage") == [b"k=v"]


class HeaderPropagator(TextMapPropagator):
    """A non-W3C propagator: `x-trace: TRACEID:SPANID`."""

    def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
        values = getter.get(carrier, "x-trace") if getter else None
        if not values:
            return context or Context()
        trace_id, span_id = values[0].split(":")
        parent = trace.SpanContext(
            int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(1)
        )
        return trace.set_span_in_context(trace.NonRecordingSpan(parent), context)

    def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
        span_context = trace.get_current_span(context).get_span_context()
        assert setter is not None
        setter.set(carrier, "x-trace", "{}:{}".format(*hex_ids_of(span_context)))

    @property
    def fields(self) -> set[str]:
        return {"x-trace"}


def hex_ids_of(span_context: trace.SpanContext) -> tuple[str, str]:
    return trace.format_trace_id(span_context.trace_id), trace.format_span_id(span_context.span_id)


async def test_the_configured_propagator_is_used(otel: Otel) -> None:
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(HeaderPropagator())
    try:
        upstream = ScriptedTransport(200)
        app = Gateway(make_config(), transport=upstream, **otel.providers)
        await call(app, headers={"x-trace": f"{CLIENT_TRACE_ID}:{CLIENT_SPAN_ID}", "traceparent": "kept"})
    finally:
        propagate.set_global_textmap(previous)

    server = otel.server_span()
    assert hex_ids(server)[0] == CLIENT_TRACE_ID
    (client,) = otel.spans(SpanKind.CLIENT)
    assert upstream.header(0, b"x-trace") == ["{}:{}".format(*hex_ids(client)).encode()]
    # Not a field of this propagator: passed through as any other header.
    assert upstream.header(0, b"traceparent") == [b"kept"]


async def test_retried_request_has_a_client_span_per_attempt_and_a_retry_event(otel: Otel) -> None:
    upstream = ScriptedTransport(503, 200)
    config = make_config([{"url": "http://10.0.0.1:9001"}, {"url": "http://10.0.0.2:9002"}])
    app = Gateway(config, transport=upstream, **otel.providers)

    response = await call(app)

    assert response.status_code == 200
    server = otel.server_span()
    first, second = sorted(otel.spans(SpanKind.CLIENT), key=lambda span: span.start_time or 0)
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["http.response.status_code"] == 503
    assert first.attributes["error.type"] == "503"
    assert first.status.status_code is StatusCode.ERROR
    assert "http.request.resend_count" not in first.attributes
    assert second.attributes["http.request.resend_count"] == 1
    assert second.attributes["http.response.status_code"] == 200
    assert second.status.status_code is StatusCode.UNSET
    assert {first.attributes["server.port"], second.attributes["server.port"]} == {9001, 9002}
    for span in (first, second):
        assert span.parent is not None and span.parent.span_id == server.context.span_id
    # Each attempt carried its own traceparent.
    for attempt, span in enumerate((first, second)):
        (sent,) = upstream.header(attempt, b"traceparent")
        assert parse_traceparent(sent) == (*hex_ids(span), True)

    (event,) = [event for event in server.events if event.name == "retry"]
    assert event.attributes is not None
    assert event.attributes["gateway.attempt"] == 2
    assert event.attributes["gateway.retry.reason"] == "status:503"
    assert 0 <= float(event.attributes["gateway.retry.backoff"]) <= 0.002  # type: ignore[arg-type]
    assert server.status.status_code is StatusCode.UNSET

    (retries,) = otel.points("gateway.retries")
    assert retries.value == 1
    assert dict(retries.attributes) == {"gateway.upstream": "users", "gateway.retry.reason": "status:503"}


async def test_failed_attempts_and_a_502(otel: Otel) -> None:
    upstream = ScriptedTransport(ConnectError("connection refused"))
    app = Gateway(
        make_config(retry={"attempts": 2, "backoff_base": 0.001}), transport=upstream, **otel.providers
    )

    response = await call(app)

    assert response.status_code == 502
    server = otel.server_span()
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 502
    assert server.attributes["error.type"] == "ConnectError"
    clients = otel.spans(SpanKind.CLIENT)
    assert len(clients) == 2
    for span in clients:
        assert span.attributes is not None
        assert span.attributes["error.type"] == "ConnectError"
        assert "http.response.status_code" not in span.attributes
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "connection refused"


async def test_a_4xx_is_an_error_on_the_client_span_only(otel: Otel) -> None:
    app = Gateway(make_config(), transport=ScriptedTransport(404), **otel.providers)

    assert (await call(app)).status_code == 404

    server = otel.server_span()
    assert server.status.status_code is StatusCode.UNSET
    assert server.attributes is not None and "error.type" not in server.attributes
    (client,) = otel.spans(SpanKind.CLIENT)
    assert client.status.status_code is StatusCode.ERROR
    assert client.attributes is not None and client.attributes["error.type"] == "404"


async def test_ejection_and_failover_are_span_events(otel: Otel) -> None:
    upstream = ScriptedTransport(ConnectError("refused"), 200)
    config = make_config(
        [{"url": "http://10.0.0.1:9001"}, {"url": "http://10.0.0.9:9009", "backup": True}],
        outlier_detection={"consecutive_failures": 1},
    )
    app = Gateway(config, transport=upstream, **otel.providers)

    assert (await call(app)).status_code == 200

    server = otel.server_span()
    events = {event.name: dict(event.attributes or {}) for event in server.events}
    assert events["ejection"]["server.address"] == "10.0.0.1"
    assert events["ejection"]["server.port"] == 9001
    assert float(events["ejection"]["gateway.ejection.duration"]) > 0
    assert events["failover"] == {"gateway.failover.group": "backup"}
    assert [event.name for event in server.events] == ["ejection", "retry", "failover"]
    backup_span = sorted(otel.spans(SpanKind.CLIENT), key=lambda span: span.start_time or 0)[1]
    assert backup_span.attributes is not None and backup_span.attributes["server.port"] == 9009

    (ejections,) = otel.points("gateway.ejections")
    assert ejections.value == 1
    assert dict(ejections.attributes) == {
        "gateway.upstream": "users",
        "server.address": "10.0.0.1",
        "server.port": 9001,
    }
    (failovers,) = otel.points("gateway.failovers")
    assert dict(failovers.attributes) == {"gateway.upstream": "users", "gateway.failover.group": "backup"}
    (available,) = otel.points("gateway.upstream.available_servers")
    assert available.value == 1 and dict(available.attributes) == {"gateway.upstream": "users"}


async def test_instrumented_fastapi_host_app_has_one_server_span(otel: Otel) -> None:
    app = FastAPI()

    @app.get("/local")
    async def local() -> dict[str, str]:
        return {"local": "yes"}

    upstream = ScriptedTransport(200)
    app.add_middleware(GatewayMiddleware, config=make_config(), transport=upstream, **otel.providers)
    FastAPIInstrumentor.instrument_app(app, **otel.providers)
    try:
        response = await call(app)
    finally:
        FastAPIInstrumentor.uninstrument_app(app)

    assert response.status_code == 200
    server = otel.server_span()
    assert server.instrumentation_scope is not None
    assert server.instrumentation_scope.name == "opentelemetry.instrumentation.fastapi"
    assert server.name == "GET /api/users"
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/api/users"
    assert server.attributes["gateway.upstream"] == "users"
    (client,) = otel.spans(SpanKind.CLIENT)
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert len(otel.points("http.server.request.duration")) == 1
    assert len(otel.points("http.client.request.duration")) == 1


async def test_instrumented_host_opted_in_to_stable_http_metrics_records_the_server_duration(
    otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Then the host's instrumentation records http.server.request.duration; a second record
    # from the gateway would count the request twice.
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    app = FastAPI()
    app.add_middleware(
        GatewayMiddleware, config=make_config(), transport=ScriptedTransport(200), **otel.providers
    )
    tracer = otel.tracer_provider.get_tracer("host")
    with tracer.start_as_current_span("GET", kind=SpanKind.SERVER):
        await call(app)
    assert otel.points("http.server.request.duration") == []
    assert len(otel.points("http.client.request.duration")) == 1


async def test_inside_another_span_the_gateway_nests_an_internal_span(otel: Otel) -> None:
    tracer = otel.tracer_provider.get_tracer("test")
    app = Gateway(make_config(), transport=ScriptedTransport(200), **otel.providers)

    with tracer.start_as_current_span("outer") as outer:
        await call(app)

    gateway = next(span for span in otel.spans() if span.name == "GET /api/users")
    assert gateway.kind is SpanKind.INTERNAL
    assert gateway.parent is not None and gateway.parent.span_id == outer.get_span_context().span_id
    (client,) = otel.spans(SpanKind.CLIENT)
    assert client.parent is not None and client.parent.span_id == gateway.context.span_id


async def test_unsampled_request_records_nothing_but_sends_the_decision_upstream() -> None:
    sdk = Otel(sampler=ParentBased(ALWAYS_OFF))
    upstream = ScriptedTransport(200)
    app = Gateway(make_config(), transport=upstream, **sdk.providers)
    try:
        await call(app, headers={"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-00"})
        await call(app)
        assert sdk.spans() == []
        # Metrics do not depend on sampling.
        assert sum(point.count for point in sdk.points("http.server.request.duration")) == 2
    finally:
        sdk.close()
    (sent,) = upstream.header(0, b"traceparent")
    trace_id, parent_id, sampled = parse_traceparent(sent)
    assert (trace_id, sampled) == (CLIENT_TRACE_ID, False)
    assert parent_id != CLIENT_SPAN_ID
    (sent,) = upstream.header(1, b"traceparent")
    assert parse_traceparent(sent)[2] is False


async def test_without_an_sdk_nothing_is_traced_and_headers_pass_untouched() -> None:
    # The global providers are the API's proxies in this test process: tracing is off.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    upstream = ScriptedTransport(200)
    app = Gateway(make_config(), transport=upstream)
    assert app.telemetry.tracer is None

    await call(app, headers={"traceparent": CLIENT_TRACEPARENT})

    assert upstream.header(0, b"traceparent") == [CLIENT_TRACEPARENT.encode()]


async def test_unknown_method_and_signed_url(otel: Otel) -> None:
    app = Gateway(make_config(), transport=ScriptedTransport(200), **otel.providers)

    await call(app, path="/api/users/x?a=1&Signature=secret&b=2", method="PURGE")

    server = otel.server_span()
    assert server.name == "HTTP /api/users"
    assert server.attributes is not None
    assert server.attributes["http.request.method"] == "_OTHER"
    assert server.attributes["http.request.method_original"] == "PURGE"
    (client,) = otel.spans(SpanKind.CLIENT)
    assert client.name == "HTTP"
    assert client.attributes is not None
    assert client.attributes["url.full"] == "http://10.0.0.1:9001/api/users/x?a=1&Signature=REDACTED&b=2"


async def test_baggage_goes_upstream_only_when_there_is_some(otel: Otel) -> None:
    sdk = Otel(sampler=ParentBased(ALWAYS_OFF))
    upstream = ScriptedTransport(200)
    sampled = Gateway(make_config(), transport=upstream, **otel.providers)
    unsampled = Gateway(make_config(), transport=upstream, **sdk.providers)
    try:
        await call(sampled)
        await call(
            unsampled, headers={"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-00", "baggage": "k=v"}
        )
        await call(unsampled)
        # Baggage the host app put in the context (no incoming header) travels too.
        token = context.attach(baggage.set_baggage("tenant", "t1"))
        try:
            await call(sampled)
            await call(unsampled)
        finally:
            context.detach(token)
    finally:
        sdk.close()
    assert [upstream.header(attempt, b"baggage") for attempt in range(5)] == [
        [],
        [b"k=v"],
        [],
        [b"tenant=t1"],
        [b"tenant=t1"],
    ]
    for attempt in range(5):
        assert len(upstream.header(attempt, b"traceparent")) == 1


async def test_client_span_under_a_server_span_that_is_not_current(otel: Otel) -> None:
    # A caller on another context (the server span not attached): the CLIENT span still
    # hangs under the exchange's span, and the current baggage still travels.
    telemetry = Telemetry(otel.tracer_provider, otel.meter_provider)
    upstream = ScriptedTransport(200)
    layer = TelemetryLayer(upstream, telemetry)
    config = load_config(make_config())
    (server,) = make_servers(config.upstreams["users"])
    parent = otel.tracer_provider.get_tracer("test").start_span("request", kind=SpanKind.SERVER)
    exchange = Exchange(
        request_id="r",
        route="/api/users",
        upstream=config.upstreams["users"],
        client_ip="",
        path="/",
        scheme="http",
    )
    exchange.span = parent
    exchange.attempts = 1
    request = Request(
        "GET", b"/api/users/7", [(b"traceparent", b"from-the-client")], RequestBody([], 0), exchange
    )
    request.server = server
    token = context.attach(baggage.set_baggage("k", "v"))
    try:
        response = await layer.handle_request(request)
        await response.aclose()
    finally:
        context.detach(token)
    parent.end()

    (client,) = otel.spans(SpanKind.CLIENT)
    assert client.parent is not None and client.parent.span_id == parent.get_span_context().span_id
    (sent,) = upstream.header(0, b"traceparent")
    assert parse_traceparent(sent) == (*hex_ids(client), True)
    assert upstream.header(0, b"baggage") == [b"k=v"]


class ServerOnlySampler(Sampler):
    """Records SERVER spans only: the gateway's CLIENT spans come back non-recording."""

    def should_sample(
        self,
        parent_context: Any,
        trace_id: int,
        name: str,
        kind: Any = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        decision = Decision.RECORD_AND_SAMPLE if kind is SpanKind.SERVER else Decision.DROP
        return SamplingResult(decision, attributes)

    def get_description(self) -> str:
        return "ServerOnly"


async def test_a_client_span_the_sampler_drops_is_not_recorded_but_its_context_goes_upstream() -> None:
    sdk = Otel(sampler=ServerOnlySampler())
    upstream = ScriptedTransport(200)
    app = Gateway(make_config(), transport=upstream, **sdk.providers)
    try:
        assert (await call(app)).status_code == 200
        server = sdk.server_span()
        assert sdk.spans(SpanKind.CLIENT) == []
        assert server.attributes is not None and server.attributes["http.response.status_code"] == 200
        assert sum(point.count for point in sdk.points("http.client.request.duration")) == 1
    finally:
        sdk.close()
    (sent,) = upstream.header(0, b"traceparent")
    trace_id, parent_id, sampled = parse_traceparent(sent)
    assert trace_id == hex_ids(server)[0] and parent_id != hex_ids(server)[1] and not sampled


def test_span_of_reads_the_span_the_api_would() -> None:
    # The hot path reads a context's span by the API's own key, found through the API.
    assert SPAN_KEY in trace.set_span_in_context(trace.INVALID_SPAN, Context())
    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    unsampled = provider.get_tracer("test").start_span("x")
    recording = TracerProvider().get_tracer("test").start_span("y")
    for ctx in (
        Context(),
        trace.set_span_in_context(unsampled),
        trace.set_span_in_context(recording),
        baggage.set_baggage("k", "v", Context()),
        context.set_value(SPAN_KEY, "not a span", Context()),
    ):
        assert span_of(ctx) is trace.get_current_span(ctx)
    recording.end()


# -- metrics -----------------------------------------------------------------------------


async def test_duration_metrics_have_semconv_attributes(otel: Otel) -> None:
    app = Gateway(make_config(), transport=ScriptedTransport(201), **otel.providers)

    await call(app, method="POST")
    await call(app, method="POST")

    collected = otel.collect()
    (server,) = collected["http.server.request.duration"]
    assert server.count == 2
    assert dict(server.attributes) == {
        "http.request.method": "POST",
        "url.scheme": "http",
        "http.route": "/api/users",
        "http.response.status_code": 201,
    }
    (client,) = collected["http.client.request.duration"]
    assert client.count == 2
    assert dict(client.attributes) == {
        "http.request.method": "POST",
        "server.address": "10.0.0.1",
        "server.port": 9001,
        "http.response.status_code": 201,
    }
    assert 0 < client.sum <= server.sum
    # Recorded inside the request's span: exemplars link the latency to the traces.
    server_spans = {span.context.span_id for span in otel.spans(SpanKind.SERVER)}
    client_spans = {span.context.span_id for span in otel.spans(SpanKind.CLIENT)}
    assert server.exemplars and {exemplar.span_id for exemplar in server.exemplars} <= server_spans
    assert client.exemplars and {exemplar.span_id for exemplar in client.exemplars} <= server_spans
    assert client_spans.isdisjoint(exemplar.span_id for exemplar in client.exemplars)
    assert 0.005 in client.explicit_bounds and 10.0 in client.explicit_bounds


# -- failsafe ----------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


class RaisingProcessor(SpanProcessor):
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if span.kind is SpanKind.CLIENT:
            raise Boom("on_start")

    def on_end(self, span: ReadableSpan) -> None:
        raise Boom("on_end")


class RaisingExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise Boom("export")


class RaisingPropagator(TextMapPropagator):
    def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
        raise Boom("extract")

    def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
        raise Boom("inject")

    @property
    def fields(self) -> set[str]:
        return {"traceparent"}


class RaisingMeterProvider(metrics.MeterProvider):
    def get_meter(
        self, name: str, version: Any = None, schema_url: Any = None, attributes: Any = None
    ) -> Any:
        return RaisingMeter(name)


class RaisingInstrument:
    def record(self, *args: Any, **kwargs: Any) -> None:
        raise Boom("record")

    def add(self, *args: Any, **kwargs: Any) -> None:
        raise Boom("add")


class RaisingMeter:
    def __init__(self, name: str) -> None:
        self.name = name

    def create_observable_gauge(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def create_histogram(self, *args: Any, **kwargs: Any) -> Any:
        return RaisingInstrument()

    def create_counter(self, *args: Any, **kwargs: Any) -> Any:
        return RaisingInstrument()


@pytest.fixture
def raising_propagator() -> Iterator[None]:
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(RaisingPropagator())
    yield
    propagate.set_global_textmap(previous)


async def test_raising_telemetry_never_breaks_a_request(
    raising_propagator: None, caplog: pytest.LogCaptureFixture
) -> None:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(RaisingProcessor())
    tracer_provider.add_span_processor(SimpleSpanProcessor(RaisingExporter()))
    upstream = ScriptedTransport(503, 200)
    config = make_config([{"url": "http://10.0.0.1:9001"}, {"url": "http://10.0.0.2:9002"}])
    app = Gateway(
        config, transport=upstream, tracer_provider=tracer_provider, meter_provider=RaisingMeterProvider()
    )

    with caplog.at_level(logging.WARNING, logger="asgi_gateway.telemetry"):
        for _ in range(3):
            response = await call(app)
            assert response.status_code == 200
            assert response.content == b"ok"
    tracer_provider.shutdown()

    failures = [record for record in caplog.records if record.name == "asgi_gateway.telemetry"]
    places = [record.args[0] for record in failures if isinstance(record.args, tuple)]
    # Each failing place is logged once, with its traceback, however many requests hit it.
    assert sorted(places) == sorted(set(places))
    assert set(places) == {
        "trace context extraction",
        "client span start",
        "server span end",
        "retry event",
        "server duration metric",
        "client duration metric",
    }
    assert all(record.exc_info for record in failures)
    # The context was restored even though the span failed.
    assert trace.get_current_span() is trace.INVALID_SPAN


async def test_hooks_without_a_request_path_record_events_and_counters(otel: Otel) -> None:
    telemetry = Telemetry(otel.tracer_provider, otel.meter_provider)
    (server,) = make_servers(load_config(make_config()).upstreams["users"])
    span = otel.tracer_provider.get_tracer("test").start_span("request")
    exchange: Any = type("FakeExchange", (), {"span": span, "upstream": type("U", (), {"name": "users"})()})()

    telemetry.events.retry_budget_exhausted(exchange, "status:503")
    telemetry.events.ejected(server, 30.0, None)
    telemetry.events.health_changed(server, False)
    telemetry.events.readmitted(server)
    telemetry.events.available_changed("users", 2)
    telemetry.events.available_changed("orders", 0)
    span.end()

    (recorded,) = otel.spans()
    assert [(event.name, dict(event.attributes or {})) for event in recorded.events] == [
        ("retry_budget_exhausted", {"gateway.retry.reason": "status:503"})
    ]
    (exhausted,) = otel.points("gateway.retry_budget.exhausted")
    assert dict(exhausted.attributes) == {"gateway.upstream": "users", "gateway.retry.reason": "status:503"}
    (ejections,) = otel.points("gateway.ejections")
    assert ejections.value == 1
    (transitions,) = otel.points("gateway.health_check.transitions")
    assert dict(transitions.attributes) == {
        "gateway.upstream": "users",
        "server.address": "10.0.0.1",
        "server.port": 9001,
        "gateway.health_check.healthy": False,
    }
    gauge = {
        point.attributes["gateway.upstream"]: point.value
        for point in otel.points("gateway.upstream.available_servers")
    }
    assert gauge == {"users": 2, "orders": 0}


async def test_a_raising_hook_is_contained(otel: Otel, caplog: pytest.LogCaptureFixture) -> None:
    telemetry = Telemetry(otel.tracer_provider, otel.meter_provider)

    class Broken:
        name = property(lambda self: (_ for _ in ()).throw(Boom("name")))

    exchange: Any = type("FakeExchange", (), {"span": None, "upstream": Broken()})()
    with caplog.at_level(logging.WARNING, logger="asgi_gateway.telemetry"):
        telemetry.events.retry(exchange, 2, "reset", 0.01)
        telemetry.events.failover(exchange, "backup")
    assert len(caplog.records) == 2


# -- access log --------------------------------------------------------------------------


async def test_access_log_record(otel: Otel, caplog: pytest.LogCaptureFixture) -> None:
    upstream = ScriptedTransport(503, 200)
    config = make_config([{"url": "http://10.0.0.1:9001"}, {"url": "http://10.0.0.2:9002"}])
    app = Gateway(config, transport=upstream, **otel.providers)

    with caplog.at_level(logging.INFO, logger="asgi_gateway.access"):
        response = await call(app, headers={"x-request-id": "req-123"})

    (record,) = [record for record in caplog.records if record.name == "asgi_gateway.access"]
    fields = record.__dict__
    trace_id, span_id = hex_ids(otel.server_span())
    second = upstream.seen[1][0]
    assert {key: fields[key] for key in ("route", "upstream", "server", "method", "path", "status")} == {
        "route": "/api/users",
        "upstream": "users",
        "server": second,
        "method": "GET",
        "path": "/api/users/7",
        "status": 200,
    }
    assert fields["attempts"] == 2
    assert fields["request_id"] == "req-123" == response.headers["x-request-id"]
    assert (fields["trace_id"], fields["span_id"]) == (trace_id, span_id)
    assert 0 < fields["duration"] < 10
    assert fields["error"] is None
    assert record.getMessage().startswith("GET /api/users/7 200 ")


async def test_access_log_is_not_formatted_when_off(caplog: pytest.LogCaptureFixture) -> None:
    app = Gateway(make_config(), transport=ScriptedTransport(200))
    seen: list[logging.LogRecord] = []

    class Spy(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    access = logging.getLogger("asgi_gateway.access")
    spy = Spy()
    access.addHandler(spy)
    try:
        with caplog.at_level(logging.WARNING, logger="asgi_gateway.access"):
            await call(app)
    finally:
        access.removeHandler(spy)
    assert seen == []


async def test_json_formatter(caplog: pytest.LogCaptureFixture) -> None:
    app = Gateway(make_config(), transport=ScriptedTransport(200))
    with caplog.at_level(logging.INFO, logger="asgi_gateway.access"):
        await call(app)
    (record,) = [record for record in caplog.records if record.name == "asgi_gateway.access"]

    line = JsonFormatter().format(record)

    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "INFO" and data["logger"] == "asgi_gateway.access"
    assert data["message"] == record.getMessage()
    assert data["time"].endswith("+00:00")
    assert data["route"] == "/api/users" and data["status"] == 200 and data["upstream"] == "users"
    assert data["trace_id"] is None  # no SDK: no trace
    assert "args" not in data and "msg" not in data

    only = json.loads(JsonFormatter(fields=["status", "route"]).format(record))
    assert set(only) == {"time", "level", "logger", "message", "status", "route"}

    try:
        raise Boom("with a traceback")
    except Boom:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    data = json.loads(JsonFormatter().format(failed))
    assert data["message"] == "failed here"
    assert "Boom: with a traceback" in data["exc_info"]
