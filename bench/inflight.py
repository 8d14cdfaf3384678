"""Hold many requests in flight through a proxy, for the memory figure.

    python bench/inflight.py http://127.0.0.1:8000/slow --count 1000 --timeout 60

Opens `count` connections, sends one GET on each, prints "sent", then waits for every answer
(the runner releases them at the slow upstream once it has measured the proxy's RSS) and prints
one JSON object: how many came back 200 and how many failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit


async def _one(host: str, port: int, request: bytes, sent: asyncio.Queue[None]) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        sent.put_nowait(None)
        head = await reader.readuntil(b"\r\n\r\n")
        return head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def hold(url: str, count: int, timeout: float) -> dict[str, int]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    sent: asyncio.Queue[None] = asyncio.Queue()
    tasks = []
    for i in range(count):
        request = f"GET {parts.path or '/'}/{i} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
        tasks.append(asyncio.ensure_future(_one(host, port, request, sent)))
    try:
        async with asyncio.timeout(timeout):
            for _ in range(count):
                await sent.get()
            print("sent", flush=True)
            await asyncio.wait(tasks)
    except TimeoutError:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    ok = sum(1 for task in tasks if not task.cancelled() and task.exception() is None and task.result())
    return {"ok": ok, "failed": count - ok}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Hold many slow requests in flight through a proxy.")
    parser.add_argument("url")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    result = asyncio.run(hold(args.url, args.count, args.timeout))
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
