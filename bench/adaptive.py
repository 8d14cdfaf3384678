"""Adaptive routing against real upstream processes on 127.0.0.1: the "Slow server" scenario.

    python bench/adaptive.py              # 4 runs of 3,000 requests each, about 15 s in all
    python bench/adaptive.py --scenario stalls|overload|all   # hedging; adaptive concurrency; every table
    python bench/adaptive.py --quick      # CI smoke check: 400 requests per run
    python bench/adaptive.py --json       # one JSON object per run instead of the table

Five upstream processes answer after 2 ms (±25%, seeded per server); in the slow runs one of
them takes ten times as long (20 ms) without failing. The gateway runs alone under uvicorn in
its own process, with one upstream over the five and the balancer of the run; its balancers
draw from `random.Random(seed)`. The client keeps `--connections` keep-alive connections busy
(closed loop) and times each request from its first byte sent to its last byte read; the first
`--warmup` requests of each run are not counted (peak_ewma learns the latencies from them).
"Extra" is the upstream requests beyond one per client request (retries), "slow share" the
slow server's part of them. Every run stops after `--requests` or `--timeout` seconds,
whichever comes first; the processes are always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

HOST = "127.0.0.1"
BASE_DELAY = 0.002
SLOW_FACTOR = 10
SERVERS = 5
RUNS = (
    ("all healthy", "round_robin", False),
    ("one 10x slower", "round_robin", True),
    ("one 10x slower", "least_connections", True),
    ("one 10x slower", "peak_ewma", True),
)


# -- the upstream (a child process) --------------------------------------------------------


class _Upstream(asyncio.Protocol):
    """Answers each GET after its delay; `/__stats` answers at once with the count served."""

    def __init__(self, state: dict[str, int], delay: float, rng: random.Random) -> None:
        self.state = state
        self.delay = delay
        self.rng = rng
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        loop = asyncio.get_running_loop()
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            if b" /__stats" in head.split(b"\r\n", 1)[0]:
                self._answer(json.dumps(self.state).encode())
                continue
            self.state["requests"] += 1
            loop.call_later(self.delay * (0.75 + 0.5 * self.rng.random()), self._answer, b"ok")

    def _answer(self, body: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


def serve_upstream(port: int, delay: float, seed: int) -> None:
    async def main() -> None:
        state = {"requests": 0}
        rng = random.Random(seed)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Upstream(state, delay, rng), HOST, port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- the gateway (a child process) ---------------------------------------------------------


def serve_gateway(port: int, balancer: str, upstreams: Sequence[str], seed: int) -> None:
    import uvicorn

    from asgi_gateway import Gateway
    from asgi_gateway._layers import balancer as balancers

    # Seeded balancers: every balancer the gateway makes draws from `random.Random(seed)`.
    make = balancers.make_balancer

    def seeded(upstream: object, rng: random.Random | None = None) -> balancers.Balancer:
        return make(upstream, rng or random.Random(seed))  # type: ignore[arg-type]

    import asgi_gateway._stack as stack

    stack.make_balancer = seeded  # type: ignore[assignment]
    config = {
        "routes": [{"path": "/", "upstream": "svc"}],
        "upstreams": {"svc": {"servers": [{"url": url} for url in upstreams], "balancer": balancer}},
    }
    uvicorn.run(Gateway(config), host=HOST, port=port, log_level="warning", access_log=False)


# -- the client (this process) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    scenario: str
    balancer: str
    requests: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    extra_percent: float
    slow_share_percent: float
    errors: int
    seconds: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {HOST}:{port}") from None
            time.sleep(0.05)


@contextlib.contextmanager
def child(*args: str, script: str = __file__) -> Iterator[subprocess.Popen[bytes]]:
    """`script` (this file, or a scenario module's) run with `args`; stopped on the way out."""
    process = subprocess.Popen([sys.executable, script, *args], stdin=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bool:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return head.startswith(b"HTTP/1.1 200")


async def load(
    port: int, requests: int, warmup: int, connections: int, timeout: float
) -> tuple[list[float], int]:
    """Latencies in seconds of the requests after the first `warmup`, and the errors among them."""
    request = f"GET /work HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
    latencies: list[float] = []
    errors = 0
    sent = 0
    total = warmup + requests

    async def worker() -> None:
        nonlocal sent, errors
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while sent < total:
                sent += 1
                counted = sent > warmup
                start = time.perf_counter()
                try:
                    ok = await _get(reader, writer, request)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    ok = False
                    writer.close()
                    reader, writer = await asyncio.open_connection(HOST, port)
                if counted:
                    latencies.append(time.perf_counter() - start)
                    errors += not ok
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(worker()) for _ in range(connections)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    except TimeoutError:
        pass
    return latencies, errors


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def upstream_count(port: int) -> int:
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(f"GET /__stats HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
        data = b""
        while not data.endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(json.loads(data.partition(b"\r\n\r\n")[2])["requests"])


def run_one(scenario: str, balancer: str, slow: bool, args: argparse.Namespace, seed: int) -> Result:
    ports = [free_port() for _ in range(SERVERS)]
    delays = [BASE_DELAY * (SLOW_FACTOR if slow and i == SERVERS - 1 else 1) for i in range(SERVERS)]
    gateway_port = free_port()
    urls = [f"http://{HOST}:{port}" for port in ports]
    with contextlib.ExitStack() as stack:
        for i, (port, delay) in enumerate(zip(ports, delays, strict=True)):
            stack.enter_context(child("--upstream", str(port), str(delay), str(seed * 100 + i)))
        stack.enter_context(child("--gateway", str(gateway_port), balancer, str(seed), *urls))
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
    return Result(
        scenario=scenario,
        balancer=balancer,
        requests=len(latencies),
        p50_ms=round(percentile(latencies, 0.50) * 1e3, 2),
        p99_ms=round(percentile(latencies, 0.99) * 1e3, 2),
        p999_ms=round(percentile(latencies, 0.999) * 1e3, 2),
        extra_percent=round(100 * max(0, sum(served) - client_requests) / client_requests, 2),
        slow_share_percent=round(100 * served[-1] / max(1, sum(served)), 1) if slow else 0.0,
        errors=errors,
        seconds=round(seconds, 1),
    )


def table(results: Sequence[Result]) -> str:
    header = ["servers", "balancer", "p50", "p99", "p99.9", "extra", "slow share", "errors"]
    rows = [
        [
            r.scenario,
            r.balancer,
            f"{r.p50_ms:.1f} ms",
            f"{r.p99_ms:.1f} ms",
            f"{r.p999_ms:.1f} ms",
            f"{r.extra_percent:.1f}%",
            f"{r.slow_share_percent:.1f}%" if r.scenario != "all healthy" else "-",
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--upstream"]:
        serve_upstream(int(argv[1]), float(argv[2]), int(argv[3]))
        return 0
    if argv[:1] == ["--gateway"]:
        serve_gateway(int(argv[1]), argv[2], argv[4:], int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run for a CI smoke check")
    parser.add_argument("--requests", type=int, default=None, help="counted requests per run (3000)")
    parser.add_argument("--warmup", type=int, default=300, help="requests per run before counting")
    parser.add_argument("--connections", type=int, default=8, help="concurrent client connections")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per run at most")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument(
        "--scenario",
        choices=("slow", "stalls", "overload", "all"),
        default="slow",
        help="what to run (all: the three, one after the other)",
    )
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = 400 if args.quick else 3000
    if args.quick:
        args.warmup = min(args.warmup, 100)
    # The children find asgi_gateway as this process does (a checkout without installing it).
    root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    if args.scenario == "all":
        status = 0
        for scenario in ("slow", "stalls", "overload"):
            flags = ["--quick"] * args.quick + ["--json"] * args.json
            status |= main([*flags, "--seed", str(args.seed), "--scenario", scenario])
        return status
    if args.scenario == "overload":
        import adaptive_overload

        flags = ["--quick"] * args.quick + ["--json"] * args.json
        return adaptive_overload.main([*flags, "--seed", str(args.seed)])
    if args.scenario == "stalls":
        import adaptive_stalls

        return adaptive_stalls.main(args)
    results = [run_one(scenario, kind, slow, args, args.seed) for scenario, kind, slow in RUNS]
    if args.json:
        for result in results:
            print(json.dumps(asdict(result)))
    else:
        print(
            f"Slow server: {SERVERS} upstreams answering in {BASE_DELAY * 1e3:g} ms (one of them in "
            f"{BASE_DELAY * SLOW_FACTOR * 1e3:g} ms in the slow runs), {args.connections} connections, "
            f"{args.requests} requests per run after {args.warmup}, seed {args.seed}"
        )
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
