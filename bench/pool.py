"""The built-in client's CPU per request on an idle keep-alive connection, in-process.

    python bench/pool.py [--requests 5000] [--rounds 9] [--concurrency 1] [--path /1k]

`bench/upstream.py` answers in a subprocess of its own, so the CPU measured here (process
time, not wall time) is the client's alone: `PoolTransport.handle_request` on a pooled
connection, the response read and closed. Best of the rounds (the least disturbed).
`measure(module, ...)` takes the module holding `PoolTransport`, for comparing two versions.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from asgi_gateway._types import Exchange, Request, RequestBody, Server

_UPSTREAM = Path(__file__).with_name("upstream.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_upstream() -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    process = subprocess.Popen([sys.executable, str(_UPSTREAM), "--port", str(port)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("bench/upstream.py did not start")


def _request(server: Server, path: bytes) -> Request:
    exchange = Exchange("bench", "/", None, "", path.decode(), "http")  # type: ignore[arg-type]
    return Request("GET", path, [(b"accept", b"*/*")], RequestBody([], 0), exchange, server=server)


async def measure(
    module: ModuleType, port: int, requests: int, rounds: int, concurrency: int, path: bytes
) -> float:
    """CPU µs per request, best of `rounds`."""
    host = "127.0.0.1"
    server = Server(url=f"http://{host}:{port}", scheme="http", host=host, port=port)
    server.host_header = f"{host}:{port}".encode()
    best = float("inf")
    async with module.PoolTransport() as transport:

        async def worker(count: int) -> None:
            for _ in range(count):
                response = await transport.handle_request(_request(server, path))
                try:
                    async for _chunk in response.stream:
                        pass
                finally:
                    await response.aclose()

        await asyncio.gather(*(worker(50) for _ in range(concurrency)))  # warm up, open connections
        per_worker = max(1, requests // concurrency)
        for _ in range(rounds):
            start = time.process_time()
            await asyncio.gather(*(worker(per_worker) for _ in range(concurrency)))
            best = min(best, (time.process_time() - start) / (per_worker * concurrency))
    return best * 1e6


def run(coroutine: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in the bench extra
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--path", default="/1k")
    args = parser.parse_args()
    from asgi_gateway._transports import pool

    process, port = start_upstream()
    try:
        cost = run(measure(pool, port, args.requests, args.rounds, args.concurrency, args.path.encode()))
    finally:
        process.terminate()
        process.wait(10)
    print(f"PoolTransport: {cost:.1f} µs CPU per request ({args.path}, concurrency {args.concurrency})")


if __name__ == "__main__":
    main()
