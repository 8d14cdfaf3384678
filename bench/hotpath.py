"""The gateway's own CPU per request, in-process, with a transport that answers at once.

    python bench/hotpath.py [--requests 20000] [--rounds 15] [--tracing off|unsampled|sampled|all]
                            [--quick] [--seconds S]

No sockets and no server: a fake ASGI receive/send drive `Gateway` directly, and the transport
returns a 1 KiB response as the built-in client does when a whole response arrived with its head.
What is left is routing, the header rules, the retry, failover and telemetry layers and the
relay: the part of `bench/run.py`'s CPU per request that is the gateway's own. Best of the
rounds (the least disturbed).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased

from asgi_gateway import Gateway
from asgi_gateway._types import BufferedStream, Request, Response, Transport

_BODY = b"x" * 1024
_UPSTREAM_HEAD = [
    (b"server", b"nginx"),
    (b"date", b"Tue, 24 Nov 2026 06:00:00 GMT"),
    (b"content-type", b"text/plain"),
    (b"content-length", b"1024"),
    (b"connection", b"keep-alive"),
]
_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "server": ("127.0.0.1", 8000),
    "client": ("127.0.0.1", 50000),
    "scheme": "http",
    "method": "GET",
    "root_path": "",
    "path": "/1k",
    "raw_path": b"/1k",
    "query_string": b"",
    "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), (b"accept", b"*/*")],
}
_REQUEST_MESSAGE = {"type": "http.request", "body": b"", "more_body": False}


class _Instant(Transport):
    async def handle_request(self, request: Request) -> Response:
        return Response(200, list(_UPSTREAM_HEAD), BufferedStream(_BODY), request.server, "127.0.0.1")


class _Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _provider(tracing: str) -> Any:
    if tracing == "off":
        return trace.NoOpTracerProvider()
    sampler = {"unsampled": ALWAYS_OFF, "sampled": ParentBased(TraceIdRatioBased(0.1)), "all": ALWAYS_ON}[
        tracing
    ]
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(_Discard()))
    return provider


async def _receive() -> dict[str, Any]:
    return _REQUEST_MESSAGE


async def _send(message: dict[str, Any]) -> None:
    pass


async def measure(requests: int, rounds: int, tracing: str) -> float:
    """Microseconds of CPU per request, best of `rounds`."""
    config = {
        "routes": [{"path": "/", "upstream": "backend"}],
        "upstreams": {
            "backend": {
                "servers": [{"url": f"http://127.0.0.1:{port}"} for port in (9001, 9002, 9003)],
                "health_check": {"path": "/healthz", "interval": 3600.0},
                "retry": {"attempts": 3},
            }
        },
    }
    gateway = Gateway(
        config, transport=_Instant(), tracer_provider=_provider(tracing), meter_provider=NoOpMeterProvider()
    )
    best = float("inf")
    async with gateway.running():
        for round_index in range(rounds + 1):
            start = time.process_time()
            for _ in range(requests):
                await gateway(dict(_SCOPE), _receive, _send)
            if round_index:  # the first round warms up
                best = min(best, (time.process_time() - start) / requests)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tracing", choices=["off", "unsampled", "sampled", "all"], default=None)
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    parser.add_argument("--seconds", type=float, help="about this long per round (instead of --requests)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds = 2000, 3
    if args.seconds is not None:
        args.requests = max(100, int(args.seconds * 50_000))
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is in the bench extra
        run = asyncio.run
    levels = [args.tracing] if args.tracing else ["off", "unsampled", "sampled", "all"]
    print(f"the gateway's own CPU per request, in-process (best of {args.rounds} x {args.requests:,})")
    for level in levels:
        print(f"  tracing {level:<10} {run(measure(args.requests, args.rounds, level)):6.1f} µs")


if __name__ == "__main__":
    main()
