"""CPU cost per request of the gateway's telemetry path, in-process, without network.

    python bench/tracing.py                 # ~1 s per cell, 3 interleaved rounds, ~30 s in all
    python bench/tracing.py --quick         # smoke check, ~3 s
    python bench/tracing.py --json          # one JSON object per row instead of the table

Each request runs what the middleware and the telemetry layer do around a transport that
answers at once: `Telemetry.start`, the CLIENT-span layer around the transport, closing the
response, `Telemetry.finish`. The "bare" row runs the same without any telemetry; the
overhead column is the difference. Spans go through a BatchSpanProcessor whose exporter
drops them (its worker thread's CPU is counted).

The "SDK alone" rows are the floors the gateway is held to: the same two spans made
directly with the SDK's cheapest calls (attributes at start, one `set_attribute` per value
after), and, for an unsampled request, the sampler's decision alone (a non-recording span).
The summary compares the gateway's overhead with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased

from asgi_gateway._config import load_config
from asgi_gateway._layers.telemetry import TelemetryLayer
from asgi_gateway._routing import Route, Router
from asgi_gateway._stack import make_servers
from asgi_gateway._telemetry import Telemetry
from asgi_gateway._types import Exchange, Handler, Request, RequestBody, Response, Transport

BATCH = 200


class _Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class _Empty:
    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        chunks: tuple[bytes, ...] = ()
        for chunk in chunks:
            yield chunk

    async def aclose(self) -> None:
        pass


class _Instant(Transport):
    async def handle_request(self, request: Request) -> Response:
        return Response(200, [(b"content-length", b"0")], _Empty(), request.server, "127.0.0.1")


def _tracer_provider(sampler: Any) -> TracerProvider:
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(_Discard(), max_queue_size=65536))
    return provider


def _cases() -> dict[str, Callable[[], tuple[_Traced | None, list[Any]]]]:
    """Row name -> a factory of (telemetry or None for bare, providers to shut down)."""

    def bare() -> tuple[_Traced | None, list[Any]]:
        return None, []

    def off() -> tuple[_Traced | None, list[Any]]:
        # No provider given and none set globally: the API's proxies, the default.
        return Telemetry(), []

    def sampled(sampler: Any, metrics: bool) -> Callable[[], tuple[_Traced | None, list[Any]]]:
        def factory() -> tuple[_Traced | None, list[Any]]:
            tracer_provider = _tracer_provider(sampler)
            meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()]) if metrics else None
            providers: list[Any] = [tracer_provider] + ([meter_provider] if meter_provider else [])
            return Telemetry(tracer_provider, meter_provider), providers

        return factory

    def at_points() -> tuple[_Traced | None, list[Any]]:
        provider = _tracer_provider(ALWAYS_ON)
        return _SdkAtGatewayPoints(provider), [provider]

    return {
        BARE: bare,
        "no provider (default)": off,
        UNSAMPLED: sampled(ParentBased(ALWAYS_OFF), False),
        "SDK, 10% parent-based": sampled(ParentBased(TraceIdRatioBased(0.1)), False),
        TRACED: sampled(ALWAYS_ON, False),
        "SDK, every request + metrics": sampled(ALWAYS_ON, True),
        AT_POINTS: at_points,
    }


SERVER_ATTRIBUTES: dict[str, Any] = {
    "http.route": "/api",
    "http.request.method": "GET",
    "url.path": "/api/x",
    "url.scheme": "http",
    "gateway.upstream": "api",
    "client.address": "127.0.0.1",
}
CLIENT_ATTRIBUTES: dict[str, Any] = {
    "http.request.method": "GET",
    "url.full": "http://127.0.0.1:9001/api/x",
    "server.address": "127.0.0.1",
    "server.port": 9001,
}


def _sdk_sampler(seconds: float) -> float:
    """CPU µs for the sampler's decision alone: an unsampled root span, never ended."""
    tracer = TracerProvider(sampler=ParentBased(ALWAYS_OFF)).get_tracer("bench")

    def one() -> None:
        tracer.start_span("GET /api", kind=trace.SpanKind.SERVER, attributes=SERVER_ATTRIBUTES)

    return _loop(one, seconds, None)


def _loop(one: Callable[[], None], seconds: float, provider: TracerProvider | None) -> float:
    for _ in range(BATCH):
        one()
    if provider is not None:
        provider.force_flush()
    count = 0
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(BATCH):
            one()
        count += BATCH
    if provider is not None:
        provider.force_flush()
    return (time.process_time() - cpu) / count * 1e6


def _sdk_floor(seconds: float) -> float:
    """CPU µs for two bare spans (SERVER + CLIENT child) with the same attributes."""
    provider = _tracer_provider(ALWAYS_ON)
    tracer = provider.get_tracer("bench")

    def one() -> None:
        server = tracer.start_span("GET /api", kind=trace.SpanKind.SERVER, attributes=SERVER_ATTRIBUTES)
        client = tracer.start_span(
            "GET",
            context=trace.set_span_in_context(server),
            kind=trace.SpanKind.CLIENT,
            attributes=CLIENT_ATTRIBUTES,
        )
        client.set_attribute("http.response.status_code", 200)
        client.set_attribute("network.peer.address", "127.0.0.1")
        client.end()
        server.set_attribute("http.response.status_code", 200)
        server.end()

    try:
        return _loop(one, seconds, provider)
    finally:
        provider.shutdown()


class _Traced(Protocol):
    def start(self, scope: dict[str, Any], route: Route, exchange: Exchange) -> Any: ...

    def finish(self, token: Any, exchange: Exchange, status: int, error: BaseException | None) -> None: ...


class _SdkAtGatewayPoints:
    """The SDK alone, called where the gateway calls it: the server span made current at
    the start, a CLIENT span around the transport ended when the response closes, the
    server span ended at the finish. Nothing else: the floor for a request's lifetime."""

    def __init__(self, provider: TracerProvider) -> None:
        self.tracer = provider.get_tracer("bench")

    def start(self, scope: dict[str, Any], route: Route, exchange: Exchange) -> Any:
        span = exchange.span = self.tracer.start_span(
            "GET /api", kind=trace.SpanKind.SERVER, attributes=SERVER_ATTRIBUTES
        )
        return span, otel_context.attach(trace.set_span_in_context(span))

    def finish(self, token: Any, exchange: Exchange, status: int, error: BaseException | None) -> None:
        span, context_token = token
        span.set_attribute("http.response.status_code", status)
        span.end()
        otel_context.detach(context_token)

    def client_layer(self, inner: Handler) -> Handler:
        return _SdkClientSpan(inner, self.tracer)


class _SdkClientSpan(Handler):
    def __init__(self, inner: Handler, tracer: trace.Tracer) -> None:
        self.inner = inner
        self.tracer = tracer

    async def handle_request(self, request: Request) -> Response:
        span = self.tracer.start_span("GET", kind=trace.SpanKind.CLIENT, attributes=CLIENT_ATTRIBUTES)
        span_context = span.get_span_context()
        request.headers.append(
            (
                b"traceparent",
                b"00-%032x-%016x-%02x"
                % (span_context.trace_id, span_context.span_id, span_context.trace_flags),
            )
        )
        response = await self.inner.handle_request(request)
        span.set_attribute("http.response.status_code", response.status)
        span.set_attribute("network.peer.address", "127.0.0.1")
        response.on_close(lambda response, error: span.end())
        return response


#: The headers the middleware sends upstream for a plain GET (no propagation fields).
UPSTREAM_HEADERS = (
    (b"user-agent", b"bench"),
    (b"accept", b"*/*"),
    (b"x-forwarded-for", b"127.0.0.1"),
    (b"x-forwarded-proto", b"http"),
    (b"x-request-id", b"0" * 32),
)


async def _run(telemetry: _Traced | None, seconds: float) -> float:
    config = load_config(
        {
            "routes": [{"path": "/api", "upstream": "api"}],
            "upstreams": {"api": {"servers": [{"url": "http://127.0.0.1:9001"}]}},
        }
    )
    router = Router(config)
    upstream = config.upstreams["api"]
    (server,) = make_servers(upstream)
    transport = _Instant()
    handler: Handler = transport
    if isinstance(telemetry, Telemetry):
        handler = TelemetryLayer(transport, telemetry)
    elif isinstance(telemetry, _SdkAtGatewayPoints):
        handler = telemetry.client_layer(transport)
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/api/x",
        "raw_path": b"/api/x",
        "scheme": "http",
        "client": ("127.0.0.1", 50000),
        "headers": [(b"host", b"gateway"), (b"user-agent", b"bench"), (b"accept", b"*/*")],
    }
    match = router.match("GET", None, b"/api/x")
    assert match is not None
    route = match[0]

    async def one() -> None:
        exchange = Exchange(
            request_id="0" * 32,
            route=route.path,
            upstream=upstream,
            client_ip="127.0.0.1",
            path="/api/x",
            scheme="http",
        )
        token = telemetry.start(scope, route, exchange) if telemetry is not None else None
        request = Request(
            "GET", b"/api/x", list(UPSTREAM_HEADERS), RequestBody([], 0), exchange, server=server
        )
        exchange.attempts = 1
        exchange.server = server
        response = await handler.handle_request(request)
        await response.aclose()
        if telemetry is not None:
            telemetry.finish(token, exchange, 200, None)

    for _ in range(BATCH):
        await one()
    count = 0
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(BATCH):
            await one()
        count += BATCH
    return (time.process_time() - cpu) / count * 1e6


BARE = "bare (no telemetry at all)"
UNSAMPLED = "SDK, every request unsampled"
TRACED = "SDK, every request"
SAMPLER_FLOOR = "SDK alone: sampler decision"
SPANS_FLOOR = "SDK alone: the 2 spans"
AT_POINTS = "SDK alone, at the gateway's points"


def measure(seconds: float, rounds: int) -> list[dict[str, Any]]:
    cases = _cases()
    samples: dict[str, list[float]] = {name: [] for name in (*cases, SAMPLER_FLOOR, SPANS_FLOOR)}
    for _ in range(rounds):
        # Interleaved, so a noisy moment hurts every row alike.
        for name, factory in cases.items():
            telemetry, providers = factory()
            samples[name].append(asyncio.run(_run(telemetry, seconds)))
            for provider in providers:
                provider.shutdown()
        samples[SAMPLER_FLOOR].append(_sdk_sampler(seconds))
        samples[SPANS_FLOOR].append(_sdk_floor(seconds))
    bare = statistics.median(samples[BARE])
    rows = []
    for name, values in samples.items():
        median = statistics.median(values)
        overhead = round(median - bare, 2) if name in cases and name != BARE else None
        rows.append({"case": name, "cpu_us_per_request": round(median, 2), "overhead_us": overhead})
    return rows


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """The gateway's tracing overhead against the SDK's own cost for the same work."""
    by_case = {row["case"]: row for row in rows}
    lines = []
    traced, floor = by_case[TRACED]["overhead_us"], by_case[SPANS_FLOOR]["cpu_us_per_request"]
    at_points = by_case[AT_POINTS]["overhead_us"]
    if traced is not None and floor and at_points is not None:
        lines.append(
            f"every request traced: {traced:.1f} µs over bare = {traced / floor:.2f} x the SDK's "
            f"{floor:.1f} µs for the same 2 spans back to back (target <= 1.1 x); the SDK alone at "
            f"the gateway's points: {at_points:.1f} µs ({at_points / floor:.2f} x)"
        )
    unsampled, sampler = by_case[UNSAMPLED]["overhead_us"], by_case[SAMPLER_FLOOR]["cpu_us_per_request"]
    if unsampled is not None and sampler:
        lines.append(
            f"unsampled request: {unsampled:.1f} µs over bare, of which the sampler's decision "
            f"{sampler:.1f} µs and the gateway's own work {unsampled - sampler:.1f} µs"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CPU cost per request of the gateway's telemetry path.")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per cell and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 0.1 s cells, one round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    seconds, rounds = (0.1, 1) if args.quick else (args.seconds, args.rounds)
    rows = measure(seconds, rounds)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"telemetry path, CPU µs per request (median of {rounds} round(s) of {seconds:g} s)")
    print(f"{'case':<32} {'µs/request':>11} {'overhead µs':>12}")
    for row in rows:
        overhead = f"{row['overhead_us']:+.1f}" if row["overhead_us"] is not None else ""
        print(f"{row['case']:<32} {row['cpu_us_per_request']:>11.1f} {overhead:>12}")
    for line in summary(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
