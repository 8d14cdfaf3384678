"""Spans and metrics exported over OTLP/HTTP to a real receiver, decoded as Jaeger decodes them.

The receiver is a small HTTP server on 127.0.0.1 that accepts what Jaeger's OTLP port
(4318) accepts: protobuf `ExportTraceServiceRequest`s on POST /v1/traces (and metrics on
/v1/metrics, as an OpenTelemetry Collector would).
"""

from __future__ import annotations

import gzip
import http.server
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from servers import HOST, Upstreams, free_port, wait_until

from asgi_gateway._otel_setup import configure_from_environment

CLIENT_TRACE_ID = "5b8efff798038103d269b633813fc60c"
CLIENT_SPAN_ID = "eee19b7ec3c1b174"
#: Nothing listens there: exporters built by the set-up tests must not reach a real collector.
DEAD_PORT = free_port()


class Receiver:
    """An OTLP/HTTP endpoint on 127.0.0.1 that keeps every decoded export request."""

    def __init__(self) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                assert self.headers["Content-Type"] == "application/x-protobuf"
                answer: Any
                if self.path == "/v1/traces":
                    request: Any = ExportTraceServiceRequest.FromString(body)
                    answer = ExportTraceServiceResponse()
                    with receiver.lock:
                        receiver.traces.append(request)
                elif self.path == "/v1/metrics":
                    request = ExportMetricsServiceRequest.FromString(body)
                    answer = ExportMetricsServiceResponse()
                    with receiver.lock:
                        receiver.metrics.append(request)
                else:
                    self.send_error(404)
                    return
                payload = answer.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def spans(self) -> list[tuple[dict[str, Any], str, Span]]:
        """(resource attributes, scope name, span) of every span received."""
        found = []
        with self.lock:
            requests = list(self.traces)
        for request in requests:
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        found.append((resource, scope_spans.scope.name, span))
        return found

    def metric(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, metric) of every export of metric `name`."""
        found = []
        with self.lock:
            requests = list(self.metrics)
        for request in requests:
            for resource_metrics in request.resource_metrics:
                resource = attributes(resource_metrics.resource.attributes)
                for scope_metrics in resource_metrics.scope_metrics:
                    found += [(resource, metric) for metric in scope_metrics.metrics if metric.name == name]
        return found


def attributes(pairs: Any) -> dict[str, Any]:
    """OTLP KeyValues as a dict of typed Python values (as Jaeger shows them)."""
    result: dict[str, Any] = {}
    for pair in pairs:
        assert isinstance(pair, KeyValue)
        kind = pair.value.WhichOneof("value")
        result[pair.key] = getattr(pair.value, kind)
    return result


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def flush_until(flush: Callable[[], Any], found: Callable[[], Any], what: str) -> Any:
    # The client has its answer before the gateway ends its span: flush until it has gone out.
    def check() -> Any:
        flush()
        return found()

    return wait_until(check, timeout=15, interval=0.05, message=what)


def by_kind(spans: list[tuple[dict[str, Any], str, Span]], kind: int) -> list[Span]:
    return sorted(
        (span for _, _, span in spans if span.kind == kind), key=lambda span: span.start_time_unix_nano
    )


def test_exported_spans_are_what_jaeger_receives(
    receiver: Receiver, upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "gateway-under-test"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.url}/v1/traces")))
    dead = f"http://{HOST}:{free_port()}"
    config = {
        "routes": [{"path": "/api/users", "upstream": "users"}],
        "upstreams": {
            "users": {
                "servers": [{"url": dead}, {"url": upstreams.u1.url}],
                "retry": {"backoff_base": 0.001, "backoff_max": 0.002},
            }
        },
    }
    try:
        url = gateway_factory(config, tracer_provider=provider)
        response = httpx.get(
            f"{url}/api/users/echo?x=1", headers={"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"}
        )
        assert response.status_code == 200
        spans = flush_until(
            provider.force_flush,
            lambda: by_kind(receiver.spans(), Span.SPAN_KIND_SERVER) and receiver.spans(),
            "spans",
        )
    finally:
        provider.shutdown()

    assert len(spans) == 3
    for resource, scope, _ in spans:
        assert resource["service.name"] == "gateway-under-test"
        assert scope == "asgi_gateway"
    (server,) = by_kind(spans, Span.SPAN_KIND_SERVER)
    first, second = by_kind(spans, Span.SPAN_KIND_CLIENT)

    # One trace, continued from the client's traceparent: gateway span, one child per attempt.
    assert {span.trace_id.hex() for _, _, span in spans} == {CLIENT_TRACE_ID}
    assert server.parent_span_id.hex() == CLIENT_SPAN_ID
    assert first.parent_span_id == second.parent_span_id == server.span_id
    assert server.start_time_unix_nano <= first.start_time_unix_nano
    assert second.end_time_unix_nano <= server.end_time_unix_nano

    assert server.name == "GET /api/users"
    assert attributes(server.attributes) == {
        "http.route": "/api/users",
        "http.request.method": "GET",
        "url.path": "/api/users/echo",
        "url.scheme": "http",
        "client.address": "127.0.0.1",
        "gateway.upstream": "users",
        "http.response.status_code": 200,
    }
    assert server.status.code == Status.STATUS_CODE_UNSET
    (retry,) = server.events
    assert retry.name == "retry"
    assert attributes(retry.attributes)["gateway.retry.reason"] == "connect-failure"
    assert attributes(retry.attributes)["gateway.attempt"] == 2

    assert first.name == second.name == "GET"
    assert attributes(first.attributes) == {
        "http.request.method": "GET",
        "url.full": f"{dead}/api/users/echo?x=1",
        "server.address": HOST,
        "server.port": int(dead.rsplit(":", 1)[1]),
        "error.type": "ConnectError",
    }
    assert first.status.code == Status.STATUS_CODE_ERROR
    assert attributes(second.attributes) == {
        "http.request.method": "GET",
        "url.full": f"{upstreams.u1.url}/api/users/echo?x=1",
        "server.address": HOST,
        "server.port": upstreams.u1.port,
        "http.request.resend_count": 1,
        "network.peer.address": HOST,
        "http.response.status_code": 200,
    }
    assert second.status.code == Status.STATUS_CODE_UNSET

    # The upstream's own spans would hang under the second attempt.
    (traceparent,) = [value for name, value in response.json()["headers"] if name == "traceparent"]
    assert traceparent.split("-")[1:3] == [CLIENT_TRACE_ID, second.span_id.hex()]


def test_configure_from_environment_exports_traces_and_metrics(
    receiver: Receiver,
    upstreams: Upstreams,
    gateway_factory: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-from-env")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
    providers = configure_from_environment()
    assert set(providers) == {"tracer_provider", "meter_provider"}
    tracer_provider, meter_provider = providers["tracer_provider"], providers["meter_provider"]
    config = {
        "routes": [{"path": "/api/users", "upstream": "users"}],
        "upstreams": {"users": {"servers": [{"url": upstreams.u2.url}]}},
    }
    try:
        url = gateway_factory(config, **providers)
        assert httpx.get(f"{url}/api/users/echo").status_code == 200
        spans = flush_until(
            tracer_provider.force_flush, lambda: len(receiver.spans()) == 2 and receiver.spans(), "spans"
        )
        durations = flush_until(
            meter_provider.force_flush, lambda: receiver.metric("http.server.request.duration"), "metrics"
        )
    finally:
        tracer_provider.shutdown()
        meter_provider.shutdown()

    assert {resource["service.name"] for resource, _, _ in spans} == {"gateway-from-env"}
    assert sorted(span.kind for _, _, span in spans) == [Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT]
    resource, metric = durations[-1]
    assert resource["service.name"] == "gateway-from-env"
    assert metric.unit == "s"
    (point,) = metric.histogram.data_points
    assert point.count == 1
    assert attributes(point.attributes) == {
        "http.request.method": "GET",
        "url.scheme": "http",
        "http.route": "/api/users",
        "http.response.status_code": 200,
    }
    (client_duration,) = receiver.metric("http.client.request.duration")[-1:]
    assert (
        attributes(client_duration[1].histogram.data_points[0].attributes)["server.port"] == upstreams.u2.port
    )


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, set()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{HOST}:{DEAD_PORT}", "OTEL_SDK_DISABLED": "true"}, set()),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{HOST}:{DEAD_PORT}"},
            {"tracer_provider", "meter_provider"},
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{HOST}:{DEAD_PORT}", "OTEL_METRICS_EXPORTER": "none"},
            {"tracer_provider"},
        ),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://{HOST}:{DEAD_PORT}/v1/traces"}, {"tracer_provider"}),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "none"}, {"tracer_provider"}),
    ],
)
def test_configure_from_environment_choices(
    environment: dict[str, str], expected: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_TRACES_EXPORTER",
        "OTEL_METRICS_EXPORTER",
        "OTEL_SDK_DISABLED",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    providers = configure_from_environment()
    try:
        assert set(providers) == expected
        if "tracer_provider" in providers:
            assert providers["tracer_provider"].resource.attributes["service.name"] == "asgi-gateway"
    finally:
        for provider in providers.values():
            provider.shutdown()
