"""Instructions per request of a real uvicorn process serving the proxy, counted by valgrind.

    python bench/process_instructions.py                        # floors and the gateway
    python bench/process_instructions.py gateway-off --tree /tmp/exp   # against another checkout
    python bench/process_instructions.py gateway-off --coarse 0.5      # timers shared as under load

Unlike `bench/instructions.py` (an in-process driver and a transport that answers at once),
this counts the whole server: uvicorn, httptools, the event loop, the built-in client and its
upstream socket, under valgrind, while `--connections` keep-alive clients (not under valgrind)
send requests to it. An upstream uvicorn answering 1 KiB by itself runs beside it. Each figure
is the count of a run of 2N requests minus one of N, divided by N. System calls' kernel time is
not counted, so the gateway's own share is larger here than in seconds.

Valgrind makes the process about 50 times slower, so a 10 ms slot of the gateway's coarse
timers holds about 50 times fewer timers than under real load, and each slot's loop timer
weighs that much more. `--coarse SECONDS` copies the tree with that timer resolution
(0.5 matches real load at 50 times the speed) for figures comparable with load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from instructions import callgrind_total
from run import CASES, HOST, free_port

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "bench" / "apps"
#: bench/run.py's cases that this counts: the floors and the gateway's own set-ups.
MEASURED = {case.key: case for case in CASES if case.app.startswith(("floor_app:", "gateway_app:"))}
DEFAULT = ("floor-uvicorn", "floor-pool", "gateway-off", "fastapi-off", "fastapi-sampled")


def _wait_listening(port: int, process: subprocess.Popen[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bench: the server exited with {process.returncode} before listening")
        try:
            socket.create_connection((HOST, port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing listened on port {port} within {timeout:g}s")


def drive(port: int, requests: int, connections: int) -> None:
    """`requests` GET /1k requests over `connections` keep-alive connections, each answered 200."""
    line = b"GET /1k HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\n\r\n"

    async def client(count: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        for _ in range(count):
            writer.write(line)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            if not head.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"bench: the proxy answered {head[:40]!r}")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if length is None:
                raise SystemExit("bench: a response without Content-Length")
            await asyncio.wait_for(reader.readexactly(int(length.group(1))), 60)
        writer.close()

    async def main() -> None:
        shares = [requests // connections + (index < requests % connections) for index in range(connections)]
        await asyncio.gather(*(client(share) for share in shares if share))

    asyncio.run(main())


def count(app: str, env: dict[str, str], requests: int, connections: int, tree: Path | None) -> int:
    """valgrind's instruction count of a uvicorn process serving `app` for `requests` requests."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gw-process-") as tmp:
        out = Path(tmp) / "callgrind.out"
        environment = {**os.environ, "PYTHONHASHSEED": "0", **env}
        if tree is not None:
            environment["PYTHONPATH"] = str(tree)
        command = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
            sys.executable, "-m", "uvicorn", "--app-dir", str(APPS), app, "--loop", "uvloop",
            "--http", "httptools", "--host", HOST, "--port", str(port), "--log-level", "warning",
            "--no-access-log",
        ]  # fmt: skip
        process = subprocess.Popen(command, env=environment, cwd=tmp, stderr=subprocess.PIPE, text=True)
        try:
            _wait_listening(port, process)
            drive(port, 20, 1)  # the first requests' warm-up, in both runs alike
            drive(port, requests, connections)
            process.send_signal(signal.SIGINT)
            _, errors = process.communicate(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if process.returncode not in (0, -signal.SIGINT):
            raise SystemExit(f"bench: the server failed ({process.returncode}):\n{errors[-2000:]}")
        return callgrind_total(out)


def _coarse_tree(tree: Path | None, resolution: float, into: Path) -> Path:
    """A copy of `tree`'s (or this checkout's) asgi_gateway with the coarse timers' resolution changed."""
    source = (tree or ROOT) / "asgi_gateway"
    shutil.copytree(source, into / "asgi_gateway")
    loop = into / "asgi_gateway" / "_loop.py"
    text = loop.read_text()
    old = "resolution: float = 0.01"
    if text.count(old) != 1:
        raise SystemExit(f"bench: {loop} has no `{old}` to change")
    loop.write_text(text.replace(old, f"resolution: float = {resolution!r}"))
    return into


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(DEFAULT), help=f"of: {', '.join(MEASURED)}")
    parser.add_argument("--requests", type=int, default=1000, help="N: the runs send N and 2N requests")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--tree", type=Path, action="append", help="a checkout to import asgi_gateway from")
    parser.add_argument("--coarse", type=float, help="the coarse timers' resolution in the measured copy")
    args = parser.parse_args(argv)
    unknown = [case for case in args.cases if case not in MEASURED]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}: choose among {', '.join(MEASURED)}")
    if shutil.which("valgrind") is None:
        print("bench: valgrind not found (Debian/Ubuntu: apt-get install valgrind)", file=sys.stderr)
        return 2
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(APPS), "floor_app:app", "--loop", "uvloop",
         "--http", "httptools", "--host", HOST, "--port", str(upstream_port), "--log-level", "warning",
         "--no-access-log"],
        env={**os.environ, "BENCH_FLOOR": "uvicorn"}, text=True,
    )  # fmt: skip
    url = f"http://{HOST}:{upstream_port}"
    # As bench/run.py's harness passes them: the gateway balances over BENCH_UPSTREAMS (here
    # one server three times), the pool floor relays to BENCH_UPSTREAM.
    upstream_env = {"BENCH_UPSTREAMS": f"{url},{url},{url}", "BENCH_UPSTREAM": url}
    try:
        _wait_listening(upstream_port, upstream)
        with tempfile.TemporaryDirectory(prefix="gw-trees-") as tmp:
            trees: list[Path | None] = list(args.tree or [None])
            if args.coarse is not None:
                trees = [
                    _coarse_tree(tree, args.coarse, Path(tmp) / str(index))
                    for index, tree in enumerate(trees)
                ]
            print(f"instructions per request ({args.connections} connections, N={args.requests})", flush=True)
            for case in args.cases:
                measured = MEASURED[case]
                app, env = measured.app, {**upstream_env, **dict(measured.env)}
                for tree, title in zip(trees, args.tree or [None], strict=True):
                    once = count(app, env, args.requests, args.connections, tree)
                    twice = count(app, env, 2 * args.requests, args.connections, tree)
                    name = str(title) if title is not None else "this checkout"
                    print(f"  {case:16} {name:24} {(twice - once) / args.requests:12,.0f}", flush=True)
    finally:
        upstream.terminate()
        upstream.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
