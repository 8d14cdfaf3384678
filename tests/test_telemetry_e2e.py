"""Trace continuity through a real gateway (uvicorn in a thread) to real upstream processes.

The upstream's `echo` answers with the headers it received, so the test reads the very
`traceparent` the upstream would continue its trace from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from servers import UpstreamProcess, Upstreams, free_port, wait_until

from asgi_gateway import GatewayMiddleware

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE_ID}-00f067aa0ba902b7-01"


class Traces:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def spans(self, kind: SpanKind | None = None) -> list[ReadableSpan]:
        return [span for span in self.exporter.get_finished_spans() if kind is None or span.kind == kind]

    def wait_server_span(self) -> ReadableSpan:
        # The client has its answer before the gateway ends its span: wait for the export.
        (span,) = wait_until(lambda: self.spans(SpanKind.SERVER), timeout=10, message="the server span")
        return span


@pytest.fixture
def traces() -> Iterator[Traces]:
    traces = Traces()
    yield traces
    traces.provider.shutdown()


def received_traceparent(response: httpx.Response) -> tuple[str, str, bool]:
    """(trace id, parent id, sampled) of the traceparent the upstream received."""
    values = [value for name, value in response.json()["headers"] if name == "traceparent"]
    assert len(values) == 1, values
    _version, trace_id, parent_id, flags = values[0].split("-")
    return trace_id, parent_id, bool(int(flags, 16) & 1)


def span_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return trace.format_trace_id(span.context.trace_id), trace.format_span_id(span.context.span_id)


def config(*urls: str, **upstream: Any) -> dict[str, Any]:
    return {
        "routes": [{"path": "/api/users", "upstream": "users"}],
        "upstreams": {"users": {"servers": [{"url": url} for url in urls], **upstream}},
    }


def test_the_upstream_continues_the_trace_from_the_attempts_client_span(
    upstreams: Upstreams, traces: Traces, gateway_factory: Callable[..., str]
) -> None:
    url = gateway_factory(config(upstreams.u1.url), tracer_provider=traces.provider)

    response = httpx.get(f"{url}/api/users/echo", headers={"traceparent": CLIENT_TRACEPARENT})

    assert response.status_code == 200
    server = traces.wait_server_span()
    (client,) = traces.spans(SpanKind.CLIENT)
    assert span_ids(server)[0] == CLIENT_TRACE_ID
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert received_traceparent(response) == (CLIENT_TRACE_ID, span_ids(client)[1], True)
    assert client.attributes is not None
    assert client.attributes["url.full"] == f"{upstreams.u1.url}/api/users/echo"
    assert client.attributes["server.port"] == upstreams.u1.port
    assert client.attributes["network.peer.address"] == "127.0.0.1"
    assert client.attributes["http.response.status_code"] == 200


def test_a_retry_after_a_dead_server_sends_the_second_attempts_traceparent(
    upstreams: Upstreams, traces: Traces, gateway_factory: Callable[..., str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    gateway_config = config(dead, upstreams.u2.url, retry={"backoff_base": 0.001, "backoff_max": 0.002})
    # round_robin from the first server: the dead one is tried first.
    url = gateway_factory(gateway_config, tracer_provider=traces.provider)

    response = httpx.get(f"{url}/api/users/echo")

    assert response.status_code == 200
    assert response.json()["server"] == "u2"
    server = traces.wait_server_span()
    first, second = sorted(traces.spans(SpanKind.CLIENT), key=lambda span: span.start_time or 0)
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["url.full"].startswith(dead)  # type: ignore[union-attr]
    assert first.attributes["error.type"] == "ConnectError"
    assert first.status.status_code is StatusCode.ERROR
    assert second.attributes["http.request.resend_count"] == 1
    assert second.attributes["server.port"] == upstreams.u2.port
    assert received_traceparent(response) == (span_ids(server)[0], span_ids(second)[1], True)
    assert [event.name for event in server.events] == ["retry"]


def test_instrumented_fastapi_app_under_uvicorn(
    upstreams: Upstreams, traces: Traces, serve: Callable[..., str]
) -> None:
    app = FastAPI()
    app.add_middleware(GatewayMiddleware, config=config(upstreams.u3.url), tracer_provider=traces.provider)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=traces.provider)
    try:
        url = serve(app)
        response = httpx.get(f"{url}/api/users/echo", headers={"traceparent": CLIENT_TRACEPARENT})
        server = traces.wait_server_span()
    finally:
        FastAPIInstrumentor.uninstrument_app(app)

    assert server.name == "GET /api/users"
    assert server.attributes is not None and server.attributes["gateway.upstream"] == "users"
    (client,) = wait_until(lambda: traces.spans(SpanKind.CLIENT), message="the client span")
    assert received_traceparent(response) == (CLIENT_TRACE_ID, span_ids(client)[1], True)
    assert client.parent is not None and client.parent.span_id == server.context.span_id


def test_an_upstream_that_breaks_off_mid_body_marks_both_spans(
    traces: Traces, gateway_factory: Callable[..., str], upstream_factory: Callable[..., UpstreamProcess]
) -> None:
    upstream = upstream_factory("dropper")
    url = gateway_factory(config(upstream.url), tracer_provider=traces.provider)

    with httpx.stream("GET", f"{url}/api/users/drop?size=100000&sent=1000") as response:
        assert response.status_code == 200
        with pytest.raises(httpx.HTTPError):
            response.read()

    server = traces.wait_server_span()
    (client,) = wait_until(lambda: traces.spans(SpanKind.CLIENT), message="the client span")
    assert client.status.status_code is StatusCode.ERROR
    assert client.attributes is not None and client.attributes["http.response.status_code"] == 200
    assert client.attributes["error.type"] in {"ConnectionReset", "InvalidResponse"}
    assert server.status.status_code is StatusCode.ERROR
    assert (
        server.attributes is not None and server.attributes["error.type"] == client.attributes["error.type"]
    )


def test_a_client_that_leaves_mid_body_ends_both_spans_without_an_error_status(
    upstreams: Upstreams, traces: Traces, gateway_factory: Callable[..., str]
) -> None:
    url = gateway_factory(config(upstreams.u1.url), tracer_provider=traces.provider)

    with httpx.stream("GET", f"{url}/api/users/hang?head=1") as response:
        assert response.status_code == 200
        next(response.iter_raw())
    upstreams.u1.wait_disconnects("hang")

    server = traces.wait_server_span()
    (client,) = wait_until(lambda: traces.spans(SpanKind.CLIENT), message="the client span")
    assert client.status.status_code is StatusCode.UNSET
    assert client.attributes is not None and client.attributes["http.response.status_code"] == 200
    assert client.attributes["error.type"] in {"CancelledError", "ClientDisconnected"}
    assert server.status.status_code is StatusCode.UNSET
    assert server.attributes is not None and server.attributes["error.type"] == "ClientDisconnected"
