"""Adaptive routing against real processes on 127.0.0.1: the "Overload" scenario.

    python bench/adaptive_overload.py            # 4 runs of 10 s each, about 50 s in all
    python bench/adaptive_overload.py --quick    # CI smoke check: 3 s per run
    python bench/adaptive_overload.py --json     # one JSON object per run instead of the table
    python bench/adaptive.py --scenario overload # the same, from the adaptive bench

One upstream process with a real capacity: a uvicorn app that serves at most `--capacity`
requests at once (an asyncio semaphore), each for `--service` seconds (10 ms), and queues the
rest; so it can answer `capacity / service` requests a second (400/s by default) and no more.
The gateway runs alone under uvicorn in its own process, once without and once with
`adaptive_concurrency: {}` (its defaults). The client (this process) offers an open-loop load:
Poisson arrivals (seeded) at `--load` times the capacity, each request on a free keep-alive
connection of at most `--connections`, timed from its scheduled send time (so waiting for a
connection counts) to its last byte; a request not answered within `--request-timeout`
counts as an error. The unloaded runs offer 0.25 times the capacity.

Requests scheduled in the first `--warmup` seconds are not counted (the controller measures
its minimum latency then). "Goodput" is the 200s completed per second in the counted time, as
a share of the capacity; p50/p99/p99.9 are those of the 200s; "shed" the 503s
(`upstream_unavailable`, answered at once), "errors" everything else (timeouts included);
"extra" the upstream requests beyond one per client request (retries). Every run stops after `--seconds`
(and at most `--request-timeout` more); the processes are always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adaptive import HOST, child, free_port, percentile, wait_listening

# -- the upstream (a child process) --------------------------------------------------------


def serve_upstream(port: int, capacity: int, service: float) -> None:
    """A uvicorn app serving at most `capacity` requests at once, each for `service` seconds."""
    import uvicorn

    state = {"requests": 0}
    slots: asyncio.Semaphore | None = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal slots
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/__stats":
            body = json.dumps(state).encode()
        else:
            state["requests"] += 1
            if slots is None:
                slots = asyncio.Semaphore(capacity)
            async with slots:
                await asyncio.sleep(service)
            body = b"ok"
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False, backlog=4096)


# -- the gateway (a child process) ---------------------------------------------------------


def serve_gateway(port: int, upstream: str, adaptive: bool) -> None:
    import uvicorn

    from asgi_gateway import Gateway

    svc: dict[str, Any] = {"servers": [{"url": upstream}]}
    if adaptive:
        svc["adaptive_concurrency"] = {}
    config = {
        "routes": [{"path": "/", "upstream": "svc"}],
        "upstreams": {"svc": svc},
        "status_path": "/-/status",
    }
    uvicorn.run(Gateway(config), host=HOST, port=port, log_level="warning", access_log=False, backlog=4096)


# -- the client (this process) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    scenario: str
    adaptive_concurrency: bool
    offered_per_second: float
    counted: int
    goodput_per_second: float
    goodput_percent: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    shed_percent: float
    errors: int
    extra_percent: float
    upstream_requests: int


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One request on the connection; its status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(head[9:12])


@dataclass(slots=True)
class _Outcome:
    scheduled: float
    status: int = 0
    done: float = 0.0
    #: Why no status came back: the exception's name, or "timeout".
    error: str = ""


async def offer(
    port: int, rate: float, seconds: float, connections: int, timeout: float, seed: int
) -> list[_Outcome]:
    """Open-loop Poisson arrivals at `rate` a second for `seconds`; every request's outcome."""
    request = f"GET /work HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
    rng = random.Random(seed)
    # First in, first out: every idle connection is used again soon, so none sits long enough
    # for the server's keep-alive timeout to close it under a request.
    idle: collections.deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = collections.deque()
    free = asyncio.Semaphore(connections)
    outcomes: list[_Outcome] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(outcome: _Outcome) -> None:
        async with free:
            connection = idle.popleft() if idle else await asyncio.open_connection(HOST, port, limit=1 << 16)
            reader, writer = connection
            try:
                outcome.status = await _exchange(reader, writer, request)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                outcome.error = type(exc).__name__
                writer.close()
                return
            except asyncio.CancelledError:
                writer.close()
                raise
            outcome.done = time.perf_counter()
            idle.append(connection)

    async def bounded(outcome: _Outcome) -> None:
        remaining = outcome.scheduled + timeout - time.perf_counter()
        try:
            await asyncio.wait_for(one(outcome), max(0.0, remaining))
        except TimeoutError:
            outcome.error = "timeout"

    start = time.perf_counter()
    at = start
    end = start + seconds
    while True:
        at += rng.expovariate(rate)
        if at >= end:
            break
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        outcome = _Outcome(at)
        outcomes.append(outcome)
        task = asyncio.ensure_future(bounded(outcome))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(list(tasks), timeout=timeout + 5)
    for task in list(tasks):
        task.cancel()
    for _, writer in idle:
        writer.close()
    return outcomes


def upstream_count(port: int) -> int:
    async def ask() -> int:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(f"GET /__stats HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            return int(json.loads(await reader.readexactly(length))["requests"])
        finally:
            writer.close()

    return asyncio.run(ask())


def run_one(scenario: str, load: float, adaptive: bool, args: argparse.Namespace) -> Result:
    capacity = args.capacity / args.service
    rate = load * capacity
    upstream_port, gateway_port = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            child("--upstream", str(upstream_port), str(args.capacity), str(args.service), script=__file__)
        )
        stack.enter_context(
            child(
                "--gateway",
                str(gateway_port),
                f"http://{HOST}:{upstream_port}",
                "1" if adaptive else "0",
                script=__file__,
            )
        )
        deadline = time.monotonic() + 30
        for port in (upstream_port, gateway_port):
            wait_listening(port, deadline)
        outcomes = asyncio.run(
            offer(gateway_port, rate, args.seconds, args.connections, args.request_timeout, args.seed)
        )
        served = upstream_count(upstream_port)
    start = min(o.scheduled for o in outcomes)
    counted_from = start + args.warmup
    counted_to = start + args.seconds
    counted = [o for o in outcomes if o.scheduled >= counted_from]
    accepted = sorted(o.done - o.scheduled for o in counted if o.status == 200)
    shed = sum(1 for o in counted if o.status == 503)
    errors = sum(1 for o in counted if o.status not in (200, 503))
    good = sum(1 for o in outcomes if o.status == 200 and counted_from <= o.done < counted_to)
    goodput = good / (args.seconds - args.warmup)
    return Result(
        scenario=scenario,
        adaptive_concurrency=adaptive,
        offered_per_second=round(rate, 1),
        counted=len(counted),
        goodput_per_second=round(goodput, 1),
        goodput_percent=round(100 * goodput / capacity, 1),
        p50_ms=round(percentile(accepted, 0.50) * 1e3, 2),
        p99_ms=round(percentile(accepted, 0.99) * 1e3, 2),
        p999_ms=round(percentile(accepted, 0.999) * 1e3, 2),
        shed_percent=round(100 * shed / max(1, len(counted)), 1),
        errors=errors,
        extra_percent=round(100 * max(0, served - len(outcomes)) / len(outcomes), 2),
        upstream_requests=served,
    )


RUNS = (
    ("unloaded (0.25x)", 0.25, False),
    ("unloaded (0.25x)", 0.25, True),
    ("overload (3x)", 3.0, False),
    ("overload (3x)", 3.0, True),
)


def _ms(value: float) -> str:
    # No request counted was answered 200 (all of them timed out): no percentile to show.
    return "-" if math.isnan(value) else f"{value:.1f} ms"


def table(results: Sequence[Result]) -> str:
    header = ["load", "adaptive_concurrency", "goodput", "p50", "p99", "p99.9", "shed", "extra", "errors"]
    rows = [
        [
            r.scenario,
            "{}" if r.adaptive_concurrency else "off",
            f"{r.goodput_per_second:.0f}/s ({r.goodput_percent:.0f}%)",
            *(_ms(value) for value in (r.p50_ms, r.p99_ms, r.p999_ms)),
            f"{r.shed_percent:.1f}%",
            f"{r.extra_percent:.1f}%",
            str(r.errors),
        ]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def targets(results: Sequence[Result], capacity: float) -> list[str]:
    """The issue's targets for the adaptive overload run, each with its verdict."""
    unloaded = next(r for r in results if r.scenario.startswith("unloaded") and not r.adaptive_concurrency)
    loaded = next(r for r in results if r.scenario.startswith("overload") and r.adaptive_concurrency)
    good = loaded.goodput_per_second >= 0.9 * capacity
    tail = loaded.p99_ms <= 2 * unloaded.p99_ms
    return [
        f"goodput >= 90% of capacity: {loaded.goodput_percent:.0f}% -> {'met' if good else 'NOT met'}",
        f"p99 of the accepted <= 2x the unloaded p99 ({unloaded.p99_ms:.1f} ms): {loaded.p99_ms:.1f} ms "
        f"= {loaded.p99_ms / unloaded.p99_ms:.2f}x -> {'met' if tail else 'NOT met'}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--upstream"]:
        serve_upstream(int(argv[1]), int(argv[2]), float(argv[3]))
        return 0
    if argv[:1] == ["--gateway"]:
        serve_gateway(int(argv[1]), argv[2], argv[3] == "1")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run for a CI smoke check")
    parser.add_argument("--seconds", type=float, default=None, help="seconds of load per run (10)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds not counted at the start (2)")
    parser.add_argument("--capacity", type=int, default=4, help="requests the upstream serves at once")
    parser.add_argument("--service", type=float, default=0.010, help="seconds each request takes upstream")
    parser.add_argument(
        "--load", type=float, default=3.0, help="offered load of the overload runs, x capacity"
    )
    parser.add_argument("--connections", type=int, default=512, help="client keep-alive connections at most")
    parser.add_argument("--request-timeout", type=float, default=5.0, help="seconds a client request waits")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    # The children find asgi_gateway as this process does (a checkout without installing it).
    root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    runs = [(name, args.load if load > 1 else load, adaptive) for name, load, adaptive in RUNS]
    runs = [(name.replace("3x", f"{args.load:g}x"), load, adaptive) for name, load, adaptive in runs]
    results = [run_one(name, load, adaptive, args) for name, load, adaptive in runs]
    capacity = args.capacity / args.service
    if args.json:
        for result in results:
            print(json.dumps(asdict(result)))
    else:
        print(
            f"Overload: one upstream serving {args.capacity} requests at once for {args.service * 1e3:g} ms "
            f"each (capacity {capacity:g}/s), open-loop Poisson load, {args.seconds:g} s per run "
            f"({args.warmup:g} s not counted), seed {args.seed}"
        )
        print(table(results))
        for line in targets(results, capacity):
            print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
