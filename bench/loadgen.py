"""Load generators: `wrk` (the real one), and a pure-Python stand-in for `--smoke` where wrk is missing.

Both give the same `LoadResult`. The stand-in runs as its own process:

    python bench/loadgen.py http://127.0.0.1:8000/1k --connections 32 --duration 2

and prints one JSON object; it is far slower than wrk, so it only proves the harness works.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["LoadResult", "python_command", "run_load", "wrk_command"]

# wrk's own summary, as one JSON line: exact counts and percentiles instead of its rounded text.
_WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration": %.6f, "bytes": %d, "errors": %d, '
    .. '"non_2xx": %d, "p50_ms": %.4f, "p99_ms": %.4f}\\n',
    summary.requests, summary.duration / 1e6, summary.bytes,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50.0) / 1e3, latency:percentile(99.0) / 1e3))
end
"""


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    duration: float
    bytes: int
    #: Socket errors and timeouts.
    errors: int
    #: Responses with a status other than 2xx/3xx.
    non_2xx: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration if self.duration else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.bytes / self.duration / (1 << 20) if self.duration else 0.0


def _script_path() -> str:
    path = Path(tempfile.gettempdir()) / "asgi_gateway_bench_wrk.lua"
    if not path.exists() or path.read_text() != _WRK_SCRIPT:
        path.write_text(_WRK_SCRIPT)
    return str(path)


def wrk_command(wrk: str, url: str, connections: int, duration: float) -> list[str]:
    return [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        _script_path(),
        url,
    ]


def python_command(url: str, connections: int, duration: float) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        url,
        "--connections",
        str(connections),
        "--duration",
        str(duration),
    ]


def run_load(command: Sequence[str], timeout: float) -> LoadResult:
    """Run a load generator command (already pinned if need be) and parse its JSON line."""
    done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return LoadResult(**json.loads(line[len("BENCH_JSON ") :]))
    raise RuntimeError(
        f"load generator gave no result (exit {done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}"
    )


# -- the pure-Python stand-in ------------------------------------------------------------------


async def _connection(
    host: str, port: int, request: bytes, deadline: float, latencies: list[float], counts: dict[str, int]
) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while time.perf_counter() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
            assert reader is not None and writer is not None
            start = time.perf_counter()
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            body = await asyncio.wait_for(reader.readexactly(length), 30.0)
            latencies.append(time.perf_counter() - start)
            counts["bytes"] += len(head) + len(body)
            if not 200 <= status < 400:
                counts["non_2xx"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            counts["errors"] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def generate(url: str, connections: int, duration: float) -> LoadResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
    latencies: list[float] = []
    counts = {"bytes": 0, "errors": 0, "non_2xx": 0}
    start = time.perf_counter()
    deadline = start + duration
    await asyncio.gather(
        *(_connection(host, port, request, deadline, latencies, counts) for _ in range(connections))
    )
    elapsed = time.perf_counter() - start
    latencies.sort()

    def percentile(p: float) -> float:
        if not latencies:
            return 0.0
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

    return LoadResult(
        requests=len(latencies),
        duration=elapsed,
        bytes=counts["bytes"],
        errors=counts["errors"],
        non_2xx=counts["non_2xx"],
        p50_ms=percentile(50),
        p99_ms=percentile(99),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A pure-Python HTTP/1.1 load generator (wrk's stand-in).")
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=2.0)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(generate(args.url, args.connections, args.duration))
    else:
        result = uvloop.run(generate(args.url, args.connections, args.duration))
    print("BENCH_JSON " + json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
