"""Balancer picks per second, for 3, 100 and 1,000 servers per balancer, printed as a table.

    python bench/balancer.py            # about 0.4 s of picks per cell, ~10 s in all
    python bench/balancer.py --quick    # CI smoke check: ~2 s in all
    python bench/balancer.py --json     # one JSON object per cell instead of the table
    python bench/balancer.py --sizes 3,8,32,33,1000   # other numbers of servers

Servers have weights 1, 2, 3 in turn and 0 to 6 requests in flight; peak_ewma has measured
every server (1 to 17 ms); consistent_hash requests carry 1,024 distinct `x-user-id` keys.
Only `Balancer.pick` is timed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from asgi_gateway._config import ServerConfig, UpstreamConfig
from asgi_gateway._layers.balancer import Balancer, make_balancer
from asgi_gateway._types import Exchange, Request, RequestBody, Server

KINDS = ("round_robin", "random", "weighted_random", "least_connections", "peak_ewma", "consistent_hash")
SIZES = (3, 100, 1000)
BATCH = 1000


def make_servers(n: int) -> list[Server]:
    return [
        Server(
            url=f"http://10.0.{i // 250}.{i % 250 + 1}:8080",
            scheme="http",
            host=f"10.0.{i // 250}.{i % 250 + 1}",
            port=8080,
            weight=1 + i % 3,
            index=i,
            upstream="bench",
            in_flight=i % 7,
        )
        for i in range(n)
    ]


def make_requests(upstream: UpstreamConfig, count: int = 1024) -> list[Request]:
    requests = []
    for i in range(count):
        exchange = Exchange(
            request_id=str(i), route="/", upstream=upstream, client_ip="10.1.0.1", path="/", scheme="http"
        )
        requests.append(
            Request(
                method="GET",
                target=b"/",
                headers=[(b"x-user-id", f"user-{i}".encode())],
                body=RequestBody([], 0),
                exchange=exchange,
            )
        )
    return requests


@dataclass(frozen=True, slots=True)
class Result:
    balancer: str
    servers: int
    picks_per_second: int


def picks_per_second(balancer: Balancer, requests: Sequence[Request], budget: float) -> float:
    pick = balancer.pick
    batches = [requests[i : i + BATCH] for i in range(0, len(requests), BATCH)] or [requests]
    # Warm up (consistent_hash builds its live ring on the first pick after set_servers).
    for request in requests[:100]:
        pick(request)
    done = 0
    start = time.perf_counter()
    deadline = start + budget
    while True:
        for batch in batches:
            for request in batch:
                pick(request)
            done += len(batch)
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


def run(budget: float, sizes: Sequence[int] = SIZES) -> list[Result]:
    results: list[Result] = []
    for kind in KINDS:
        for size in sizes:
            servers = make_servers(size)
            upstream = UpstreamConfig(
                name="bench",
                servers=tuple(ServerConfig(url=s.url, weight=s.weight) for s in servers),
                balancer=kind,  # type: ignore[arg-type]
                hash_on="header:x-user-id",
            )
            balancer = make_balancer(upstream, rng=random.Random(0))
            balancer.set_servers(servers)
            for server in servers:
                balancer.observe(server, 0.001 * (1 + server.index % 17))
            rate = picks_per_second(balancer, make_requests(upstream), budget)
            results.append(Result(kind, size, round(rate)))
    return results


def format_rate(rate: float) -> str:
    if rate >= 1e6:
        return f"{rate / 1e6:.2f} M/s"
    return f"{rate / 1e3:.0f} k/s"


def table(results: Sequence[Result]) -> str:
    rates = {(r.balancer, r.servers): r.picks_per_second for r in results}
    sizes = list(dict.fromkeys(r.servers for r in results))
    header = ["balancer", *(f"{n:,} servers" for n in sizes)]
    rows = [[kind, *(format_rate(rates[kind, n]) for n in sizes)] for kind in KINDS]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run for a CI smoke check")
    parser.add_argument("--seconds", type=float, default=None, help="time spent picking per cell")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(n) for n in text.split(",")],
        default=list(SIZES),
        help="numbers of servers, comma-separated (default: 3,100,1000)",
    )
    args = parser.parse_args(argv)
    budget = args.seconds if args.seconds is not None else (0.05 if args.quick else 0.4)
    results = run(budget, args.sizes)
    if args.json:
        for result in results:
            print(json.dumps(asdict(result)))
    else:
        print(f"Balancer picks per second (Python {sys.version.split()[0]}, {budget:g} s per cell)")
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
