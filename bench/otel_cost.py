"""The OpenTelemetry SDK's own CPU cost per recorded span, the yardstick for the gateway's tracing cost.

    python bench/otel_cost.py [--seconds 1.0] [--json]

Records the pair of spans the gateway makes per request (a SERVER span with the HTTP server
attributes, a CLIENT child with the client attributes, a status code set at the end), through
the same set-up as the bench's gateway: sampler ALWAYS_ON and a BatchSpanProcessor whose exporter
drops everything. Reports process CPU time (the processor's worker thread included) per span.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.util.types import AttributeValue


class _Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def cost_per_span(seconds: float) -> float:
    """Microseconds of CPU per recorded span."""
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(BatchSpanProcessor(_Discard()))
    tracer = provider.get_tracer("bench")
    server_attributes: dict[str, AttributeValue] = {
        "http.request.method": "GET",
        "url.path": "/1k",
        "url.scheme": "http",
        "http.route": "/",
        "client.address": "127.0.0.1",
        "gateway.upstream": "backend",
    }
    client_attributes: dict[str, AttributeValue] = {
        "http.request.method": "GET",
        "url.full": "http://127.0.0.1:8001/1k",
        "server.address": "127.0.0.1",
        "server.port": 8001,
        "network.peer.address": "127.0.0.1",
    }

    def one() -> None:
        server = tracer.start_span("GET /", kind=trace.SpanKind.SERVER, attributes=server_attributes)
        context = trace.set_span_in_context(server)
        client = tracer.start_span(
            "GET", context=context, kind=trace.SpanKind.CLIENT, attributes=client_attributes
        )
        client.set_attribute("http.response.status_code", 200)
        client.end()
        server.set_attribute("http.response.status_code", 200)
        server.end()

    for _ in range(1000):
        one()
    provider.force_flush()
    spans = 0
    cpu_start = time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(200):
            one()
        spans += 400
    provider.force_flush()
    cpu = time.process_time() - cpu_start
    provider.shutdown()
    return cpu / spans * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The OpenTelemetry SDK's CPU cost per recorded span.")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cost = cost_per_span(args.seconds)
    if args.json:
        print(json.dumps({"us_per_span": round(cost, 2)}))
    else:
        print(f"OpenTelemetry SDK: {cost:.1f} µs CPU per recorded span")
    return 0


if __name__ == "__main__":
    sys.exit(main())
