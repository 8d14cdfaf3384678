"""Reload latency: from `gateway.reload(config)` to the first answer on the new config.

    python bench/reload.py                 # 100 reloads, 100 routes, 1,000 servers
    python bench/reload.py --quick         # CI smoke check: 10 reloads
    python bench/reload.py --json

One real upstream process on 127.0.0.1 (`bench/upstream.py`) and the gateway under uvicorn in
this process, on one event loop with the client. The config has `--routes` routes over ten
upstreams of `--servers` servers in all; the route the client asks for after each reload, and
its one server (the real one), exist only in the new config, so the answer proves that the new
config serves. Each reload also drops one server of every upstream and adds another, so it
retires servers and builds new ones as an operator's rollout does. Timed: the `reload()` call
alone (validation and building), and the call plus that first request (the target: p99 under
50 ms). Bounded: `--reloads` reloads and `--timeout` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from asgi_gateway import Gateway

HOST = "127.0.0.1"
BENCH = Path(__file__).resolve().parent
UPSTREAMS = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def make_config(k: int, routes: int, servers: int, real: str) -> dict[str, Any]:
    """Config number `k`: `routes` routes, `servers` servers over ten upstreams, one route of its own."""
    per = servers // UPSTREAMS
    upstreams: dict[str, Any] = {}
    for u in range(UPSTREAMS):
        # Port 9 (discard) on addresses nothing listens on: never connected to, only built.
        first = k + u * per
        upstreams[f"u{u}"] = {
            "servers": [
                {"url": f"http://127.1.{(first + i) // 250}.{(first + i) % 250 + 1}:9"} for i in range(per)
            ],
            "health_check": None,
        }
    upstreams["live"] = {"servers": [{"url": real}]}
    table = [{"path": f"/r{r}", "upstream": f"u{r % UPSTREAMS}"} for r in range(routes - 1)]
    table.append({"path": f"/v{k}", "upstream": "live", "strip_prefix": True})
    return {"routes": table, "upstreams": upstreams}


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(BENCH / "upstream.py"), "--port", str(upstream_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    real = f"http://{HOST}:{upstream_port}"
    try:
        gateway = Gateway(make_config(0, args.routes, args.servers, real))
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                gateway, host=HOST, port=port, log_level="warning", lifespan="on", access_log=False
            )
        )
        serving = asyncio.create_task(server.serve())
        deadline = time.monotonic() + args.timeout
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=5) as client:
            while True:
                try:
                    if (await client.get("/v0/1k")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the gateway or the upstream did not start")
                await asyncio.sleep(0.05)
            build: list[float] = []
            total: list[float] = []
            for k in range(1, args.reloads + 1):
                if time.monotonic() > deadline:
                    break
                config = make_config(k, args.routes, args.servers, real)
                started = time.perf_counter()
                gateway.reload(config)
                built = time.perf_counter()
                response = await client.get(f"/v{k}/1k")
                done = time.perf_counter()
                if response.status_code != 200:
                    raise RuntimeError(f"reload {k}: the new route answered {response.status_code}")
                build.append(built - started)
                total.append(done - started)
        server.should_exit = True
        await serving
    finally:
        upstream.terminate()
        upstream.wait(10)
    ms = 1000.0
    return {
        "routes": args.routes,
        "servers": args.servers,
        "reloads": len(total),
        "reload_p50_ms": round(statistics.median(build) * ms, 2),
        "reload_p99_ms": round(percentile(build, 99) * ms, 2),
        "first_request_p50_ms": round(statistics.median(total) * ms, 2),
        "first_request_p99_ms": round(percentile(total, 99) * ms, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reloads", type=int, default=100)
    parser.add_argument("--routes", type=int, default=100)
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--quick", action="store_true", help="10 reloads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.reloads = 10
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['reloads']} reloads, {result['routes']} routes, {result['servers']} servers")
        print("| | p50 | p99 |")
        print("|---|---:|---:|")
        print(f"| reload() | {result['reload_p50_ms']} ms | {result['reload_p99_ms']} ms |")
        print(
            f"| reload() to the first answer on the new config | {result['first_request_p50_ms']} ms "
            f"| {result['first_request_p99_ms']} ms |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
