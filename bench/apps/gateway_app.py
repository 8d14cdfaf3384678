"""asgi_gateway as the proxy under test, configured by environment variables.

    BENCH_UPSTREAMS   comma-separated base URLs of the servers to balance over (required)
    BENCH_SLOW        base URL of the slow upstream, routed at /slow (optional)
    BENCH_TRACING     off | sampled (10% parent-based) | all (every request, BatchSpanProcessor)
                      | unsampled (an SDK that records nothing: the sampler's cost)
                      | sdk (tracing off in the gateway; the SDK's own calls make the same two spans
                        per request around it: the yardstick for the gateway's tracing cost)
    BENCH_TRANSPORT   pool (the built-in HTTP/1.1 client) | httpx (the httpx adapter)
    BENCH_MAX_CONNECTIONS  the built-in pool's connections per server (default: its own, 100)
    BENCH_SPAN_COUNT_FILE  where SIGUSR1 writes how many spans were recorded (optional)
    BENCH_SDK_PATCH   parts of the SDK change in sdk_patch.py to apply (comma-separated, or all)
    BENCH_HOST        none (the `Gateway` itself) | fastapi (a FastAPI app with
                      `app.add_middleware(GatewayMiddleware, ...)`, as users write it)
                      | fastapi-front (`GatewayMiddleware(fastapi_app, ...)` served in front of it)

Every layer is on: round-robin over the servers, outlier detection, active health checks
with a long interval (so they cost nothing during a run) and 3 attempts per request.
Spans go to an exporter that drops them, so only the SDK's own cost is measured.

    uvicorn --app-dir bench/apps gateway_app:app --loop uvloop --http httptools
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from sdk_spans import ClientSpans, server_spans

from asgi_gateway import Gateway


def _tracer_provider(level: str) -> Any:
    if level == "off":
        return trace.NoOpTracerProvider()

    class DiscardingExporter(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    sampler: Sampler
    if level == "sampled":
        sampler = ParentBased(TraceIdRatioBased(0.1))
    elif level == "all":
        sampler = ALWAYS_ON
    elif level == "unsampled":
        sampler = ALWAYS_OFF
    elif level == "sdk":
        sampler = ALWAYS_ON
    else:
        raise SystemExit(f"BENCH_TRACING must be off, sampled, all, unsampled or sdk, not {level!r}")
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(DiscardingExporter()))
    count_file = os.environ.get("BENCH_SPAN_COUNT_FILE")
    if count_file:
        counter = _SpanCounter()
        provider.add_span_processor(counter)
        # uvicorn ends by re-raising SIGTERM, so atexit hooks never run: the runner asks instead.
        signal.signal(signal.SIGUSR1, lambda *_: counter.write(count_file))
    return provider


class _SpanCounter(SpanProcessor):
    """Counts recorded spans; SIGUSR1 writes the count to BENCH_SPAN_COUNT_FILE."""

    def __init__(self) -> None:
        self.spans = 0

    def on_end(self, span: ReadableSpan) -> None:
        self.spans += 1

    def write(self, path: str) -> None:
        with open(path + ".tmp", "w") as file:
            json.dump({"spans": self.spans}, file)
        os.replace(path + ".tmp", path)


def _transport(kind: str) -> Any:
    if kind == "pool":
        limit = os.environ.get("BENCH_MAX_CONNECTIONS")
        if not limit:
            return None
        from asgi_gateway._transports.pool import PoolTransport

        return PoolTransport(max_connections_per_host=int(limit))
    if kind == "httpx":
        import httpx

        return httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=1000)
        )
    raise SystemExit(f"BENCH_TRANSPORT must be pool or httpx, not {kind!r}")


def make_app() -> Any:
    patch = os.environ.get("BENCH_SDK_PATCH")
    if patch:
        import sdk_patch

        sdk_patch.apply(patch)
    servers = [url for url in os.environ["BENCH_UPSTREAMS"].split(",") if url]
    upstreams: dict[str, Any] = {
        "backend": {
            "servers": [{"url": url} for url in servers],
            "balancer": "round_robin",
            "health_check": {"path": "/healthz", "interval": 3600.0},
            "outlier_detection": {"consecutive_failures": 5},
            "retry": {"attempts": 3},
            "max_concurrent_requests": 4000,
        }
    }
    routes: list[dict[str, Any]] = [{"path": "/", "upstream": "backend"}]
    slow = os.environ.get("BENCH_SLOW")
    if slow:
        upstreams["slow"] = {
            "servers": [{"url": slow}],
            "retry": {"attempts": 3},
            "max_concurrent_requests": 4000,
        }
        routes.insert(0, {"path": "/slow", "upstream": "slow"})
    level = os.environ.get("BENCH_TRACING", "off")
    provider = _tracer_provider(level)
    transport = _transport(os.environ.get("BENCH_TRANSPORT", "pool"))
    if level == "sdk":
        from asgi_gateway._transports.pool import PoolTransport

        tracer = provider.get_tracer("bench")
        gateway = Gateway(
            {"routes": routes, "upstreams": upstreams},
            tracer_provider=trace.NoOpTracerProvider(),
            meter_provider=NoOpMeterProvider(),
            transport=ClientSpans(transport or PoolTransport(), tracer),
        )
        return server_spans(gateway, tracer)
    options: dict[str, Any] = {
        "tracer_provider": provider,
        "meter_provider": NoOpMeterProvider(),
        "transport": transport,
    }
    config = {"routes": routes, "upstreams": upstreams}
    host = os.environ.get("BENCH_HOST", "none")
    if host == "none":
        return Gateway(config, **options)
    if host not in ("fastapi", "fastapi-front"):
        raise SystemExit(f"BENCH_HOST must be none, fastapi or fastapi-front, not {host!r}")
    from fastapi import FastAPI

    from asgi_gateway import GatewayMiddleware

    fastapi_app = FastAPI()

    @fastapi_app.get("/own")
    async def own() -> dict[str, bool]:
        return {"own": True}

    if host == "fastapi-front":
        return GatewayMiddleware(fastapi_app, config=config, **options)
    fastapi_app.add_middleware(GatewayMiddleware, config=config, **options)
    return fastapi_app


app = make_app()
