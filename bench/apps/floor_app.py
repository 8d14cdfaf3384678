"""Floors for the gateway's own cost: what uvicorn and the built-in client cost with no gateway.

    BENCH_FLOOR=uvicorn   uvicorn answers 1 KiB by itself (no upstream)
    BENCH_FLOOR=pool      each request relayed to BENCH_UPSTREAM by the built-in HTTP/1.1 client,
                          with no router, header rules or layers

`python bench/run.py --only floor-uvicorn,floor-pool,gateway-off` puts them beside the gateway.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from asgi_gateway._transports.pool import PoolTransport
from asgi_gateway._types import Exchange, Request, RequestBody, Server

_BODIES = {"/1m": b"x" * 1048576}
_BODY = b"x" * 1024


async def _uvicorn_alone(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = _BODIES.get(scope["path"], _BODY)
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _pool_alone() -> Any:
    url = os.environ["BENCH_UPSTREAM"]
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    server = Server(url=url, scheme="http", host=host, port=port, host_header=f"{host}:{port}".encode())
    pool = PoolTransport()
    opened = False

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal opened
        if scope["type"] != "http":
            return
        if not opened:
            await pool.__aenter__()
            opened = True
        exchange = Exchange("floor", "/", None, "", scope["path"], "http")  # type: ignore[arg-type]
        request = Request(scope["method"], scope["raw_path"], [], RequestBody([], 0), exchange, server=server)
        response = await pool.handle_request(request)
        try:
            await send(
                {"type": "http.response.start", "status": response.status, "headers": response.headers}
            )
            async for chunk in response.stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    return app


_floor = os.environ.get("BENCH_FLOOR", "uvicorn")
if _floor == "uvicorn":
    app = _uvicorn_alone
elif _floor == "pool":
    app = _pool_alone()
else:
    raise SystemExit(f"BENCH_FLOOR must be uvicorn or pool, not {_floor!r}")
