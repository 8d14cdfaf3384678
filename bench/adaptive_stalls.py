"""Adaptive routing, the "Stalls" scenario: hedged requests against rare long stalls.

    python bench/adaptive.py --scenario stalls           # 3 runs of 3,000 requests each
    python bench/adaptive.py --scenario stalls --quick   # CI smoke check: 400 requests per run

Five upstream processes answer after 2 ms (±25%), except that each request stalls for 1 s with
probability 1% (seeded per server). The gateway runs alone under uvicorn in its own process,
with one round-robin upstream over the five; the runs are without hedging, with hedging after a
fixed delay (20 ms), and with hedging after the p95 measured in the run without it
(as "The Tail at Scale" suggests: about 5% of requests are then sent twice at most). The client
and the counts are `bench/adaptive.py`'s: a closed loop over `--connections` keep-alive
connections, latency from first byte sent to last byte read, the first `--warmup` requests not
counted; "extra" is the upstream requests beyond one per client request (the hedges and any
retries). Every run stops after `--requests` or `--timeout` seconds; the processes always stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from adaptive import (
    HOST,
    SERVERS,
    _Upstream,
    child,
    free_port,
    load,
    percentile,
    upstream_count,
    wait_listening,
)

BASE_DELAY = 0.002
STALL = 1.0
STALL_PROBABILITY = 0.01
FIXED_DELAY = 0.02
TARGET_FACTOR = 5.0
TARGET_EXTRA = 5.0


class _Stalling(_Upstream):
    """`adaptive.py`'s upstream, of which each request stalls for `STALL` seconds now and then."""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        loop = asyncio.get_running_loop()
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            if b" /__stats" in head.split(b"\r\n", 1)[0]:
                self._answer(json.dumps(self.state).encode())
                continue
            self.state["requests"] += 1
            stalled = self.rng.random() < STALL_PROBABILITY
            delay = STALL if stalled else self.delay * (0.75 + 0.5 * self.rng.random())
            loop.call_later(delay, self._answer, b"ok")


def serve_upstream(port: int, seed: int) -> None:
    async def main() -> None:
        state = {"requests": 0}
        rng = random.Random(seed)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Stalling(state, BASE_DELAY, rng), HOST, port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def serve_gateway(port: int, delay: float, upstreams: Sequence[str]) -> None:
    """The gateway over `upstreams`, hedging after `delay` seconds (0: no hedging)."""
    import uvicorn

    from asgi_gateway import Gateway

    upstream: dict[str, object] = {"servers": [{"url": url} for url in upstreams], "balancer": "round_robin"}
    if delay > 0:
        upstream["hedge"] = {"delay": delay, "max_extra": 1}
    config = {"routes": [{"path": "/", "upstream": "svc"}], "upstreams": {"svc": upstream}}
    uvicorn.run(Gateway(config), host=HOST, port=port, log_level="warning", access_log=False)


@dataclass(frozen=True, slots=True)
class StallResult:
    run: str
    delay_ms: float | None
    requests: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    p999_ms: float
    extra_percent: float
    errors: int
    seconds: float


def run_one(run: str, delay: float, args: argparse.Namespace) -> StallResult:
    ports = [free_port() for _ in range(SERVERS)]
    gateway_port = free_port()
    urls = [f"http://{HOST}:{port}" for port in ports]
    with contextlib.ExitStack() as stack:
        for i, port in enumerate(ports):
            stack.enter_context(child("--upstream", str(port), str(args.seed * 100 + i), script=__file__))
        stack.enter_context(child("--gateway", str(gateway_port), repr(delay), *urls, script=__file__))
        deadline = time.monotonic() + 30
        for port in [*ports, gateway_port]:
            wait_listening(port, deadline)
        started = time.monotonic()
        latencies, errors = asyncio.run(
            load(gateway_port, args.requests, args.warmup, args.connections, args.timeout)
        )
        seconds = time.monotonic() - started
        served = [upstream_count(port) for port in ports]
    latencies.sort()
    client_requests = len(latencies) + args.warmup
    return StallResult(
        run=run,
        delay_ms=round(delay * 1e3, 2) if delay > 0 else None,
        requests=len(latencies),
        p50_ms=round(percentile(latencies, 0.50) * 1e3, 2),
        p95_ms=round(percentile(latencies, 0.95) * 1e3, 2),
        p99_ms=round(percentile(latencies, 0.99) * 1e3, 2),
        p999_ms=round(percentile(latencies, 0.999) * 1e3, 2),
        extra_percent=round(100 * max(0, sum(served) - client_requests) / client_requests, 2),
        errors=errors,
        seconds=round(seconds, 1),
    )


def run_stalls(args: argparse.Namespace) -> list[StallResult]:
    """The three runs; the third hedges after the p95 the first measured."""
    baseline = run_one("no hedging", 0.0, args)
    results = [baseline, run_one("hedge, fixed delay", FIXED_DELAY, args)]
    results.append(run_one("hedge at measured p95", baseline.p95_ms / 1e3, args))
    return results


def table(results: Sequence[StallResult]) -> str:
    header = ["run", "hedge delay", "p50", "p99", "p99.9", "extra", "errors"]
    rows = [
        [
            r.run,
            f"{r.delay_ms:g} ms" if r.delay_ms is not None else "-",
            f"{r.p50_ms:.1f} ms",
            f"{r.p99_ms:.1f} ms",
            f"{r.p999_ms:.1f} ms",
            f"{r.extra_percent:.1f}%",
            str(r.errors),
        ]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(results: Sequence[StallResult]) -> list[str]:
    """One line per hedged run: the target (p99.9 at least 5x lower, at most 5% extra) met or not."""
    baseline = results[0]
    lines = []
    for r in results[1:]:
        factor = baseline.p999_ms / r.p999_ms if r.p999_ms > 0 else float("inf")
        met = factor >= TARGET_FACTOR and r.extra_percent <= TARGET_EXTRA and r.errors == 0
        lines.append(
            f"{r.run}: p99.9 {factor:.1f}x lower, {r.extra_percent:.1f}% extra: "
            f"{'target met' if met else 'TARGET MISSED'}"
        )
    return lines


def main(args: argparse.Namespace) -> int:
    """`bench/adaptive.py --scenario stalls`: run, then print the table (or JSON lines)."""
    results = run_stalls(args)
    if args.json:
        for result in results:
            print(json.dumps(asdict(result)))
        return 0
    print(
        f"Stalls: {SERVERS} upstreams answering in {BASE_DELAY * 1e3:g} ms, each request stalling "
        f"{STALL:g} s with probability {STALL_PROBABILITY:.0%}, round_robin, {args.connections} "
        f"connections, {args.requests} requests per run after {args.warmup}, seed {args.seed}"
    )
    print(table(results))
    for line in verdict(results):
        print(line)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--upstream"]:
        serve_upstream(int(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1:2] == ["--gateway"]:
        serve_gateway(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:])
    else:
        sys.exit("run it through bench/adaptive.py --scenario stalls")
