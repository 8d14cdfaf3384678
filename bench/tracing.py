"""CPU cost per request of the gateway's telemetry path, in-process, without network.

    python bench/tracing.py                 # ~1 s per cell, 3 interleaved rounds, ~20 s in all
    python bench/tracing.py --quick         # smoke check, ~2 s
    python bench/tracing.py --json          # one JSON object per row instead of the table

Each request runs what the middleware and the telemetry layer do around a transport that
answers at once: `Telemetry.start`, the CLIENT-span layer around the transport, closing the
response, `Telemetry.finish`. The "bare" row runs the same without any telemetry; the
overhead column is the difference. Spans go through a BatchSpanProcessor whose exporter
drops them (its worker thread's CPU is counted). "SDK, 2 bare spans" is the SDK's own cost
for the same two spans made directly, the floor for a traced request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

from asgi_gateway._config import load_config
from asgi_gateway._routing import Router
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
        for chunk in ():
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


def _cases() -> dict[str, Callable[[], tuple[Telemetry | None, list[Any]]]]:
    """Row name -> a factory of (telemetry or None for bare, providers to shut down)."""

    def bare() -> tuple[Telemetry | None, list[Any]]:
        return None, []

    def off() -> tuple[Telemetry | None, list[Any]]:
        # No provider given and none set globally: the API's proxies, the default.
        return Telemetry(), []

    def sampled(sampler: Any, metrics: bool) -> Callable[[], tuple[Telemetry | None, list[Any]]]:
        def factory() -> tuple[Telemetry | None, list[Any]]:
            tracer_provider = _tracer_provider(sampler)
            meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()]) if metrics else None
            providers: list[Any] = [tracer_provider] + ([meter_provider] if meter_provider else [])
            return Telemetry(tracer_provider, meter_provider), providers

        return factory

    ratio = ParentBased(TraceIdRatioBased(0.1))
    return {
        "bare (no telemetry at all)": bare,
        "no provider (default)": off,
        "SDK, 10% parent-based": sampled(ratio, False),
        "SDK, every request": sampled(ALWAYS_ON, False),
        "SDK, every request + metrics": sampled(ALWAYS_ON, True),
    }


def _sdk_floor(seconds: float) -> float:
    """CPU µs for two bare spans (SERVER + CLIENT child) with the same attributes."""
    provider = _tracer_provider(ALWAYS_ON)
    tracer = provider.get_tracer("bench")

    def one() -> None:
        server = tracer.start_span(
            "GET /api",
            kind=trace.SpanKind.SERVER,
            attributes={
                "http.route": "/api",
                "http.request.method": "GET",
                "url.path": "/api/x",
                "url.scheme": "http",
                "gateway.upstream": "api",
                "client.address": "127.0.0.1",
            },
        )
        client = tracer.start_span(
            "GET",
            context=trace.set_span_in_context(server),
            kind=trace.SpanKind.CLIENT,
            attributes={
                "http.request.method": "GET",
                "url.full": "http://127.0.0.1:9001/api/x",
                "server.address": "127.0.0.1",
                "server.port": 9001,
            },
        )
        client.set_attributes({"http.response.status_code": 200, "network.peer.address": "127.0.0.1"})
        client.end()
        server.set_attributes({"http.response.status_code": 200})
        server.end()

    for _ in range(BATCH):
        one()
    provider.force_flush()
    count = 0
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(BATCH):
            one()
        count += BATCH
    provider.force_flush()
    cpu = time.process_time() - cpu
    provider.shutdown()
    return cpu / count * 1e6


async def _run(telemetry: Telemetry | None, seconds: float) -> float:
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
    handler: Handler = telemetry.client_layer(transport) if telemetry is not None else transport
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
            "GET", b"/api/x", [(b"accept", b"*/*")], RequestBody([], 0), exchange, server=server
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


def measure(seconds: float, rounds: int) -> list[dict[str, Any]]:
    cases = _cases()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    samples["SDK, 2 bare spans (floor)"] = []
    for _ in range(rounds):
        # Interleaved, so a noisy moment hurts every row alike.
        for name, factory in cases.items():
            telemetry, providers = factory()
            samples[name].append(asyncio.run(_run(telemetry, seconds)))
            for provider in providers:
                provider.shutdown()
        samples["SDK, 2 bare spans (floor)"].append(_sdk_floor(seconds))
    bare = statistics.median(samples["bare (no telemetry at all)"])
    rows = []
    for name, values in samples.items():
        median = statistics.median(values)
        overhead = median - bare if not name.startswith(("bare", "SDK, 2 bare")) else None
        rows.append({"case": name, "cpu_us_per_request": round(median, 2), "overhead_us": overhead})
    return rows


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
