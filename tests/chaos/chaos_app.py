"""The gateway under test, imported by uvicorn in a subprocess of its own.

`python -m uvicorn chaos_app:make_app --factory --app-dir tests/chaos` serves a small host app
wrapped by `GatewayMiddleware(config=$CHAOS_GATEWAY_CONFIG)`. The host app answers what the
routes do not match:

- `/__chaos/state`: what can only be counted from inside the process, as JSON: `tasks` (asyncio
  tasks alive, this request's own included), `pool` (the built-in client's connections: open,
  idle, busy, waiters), `in_flight` (requests holding a slot per upstream) and `servers` (each
  server's in-flight count and availability);
- anything else: 404 with `{"host_app": true, "path", "raw_path"}`, so a test can tell a request
  the gateway kept for the host app from one it forwarded.

Memory, file descriptors and sockets are read from outside with psutil.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from asgi_gateway import GatewayMiddleware

CONFIG_ENV = "CHAOS_GATEWAY_CONFIG"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def _json(send: Send, data: Any, status: int = 200) -> None:
    body = json.dumps(data).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _pool_state(gateway: Any) -> dict[str, int]:
    inner = gateway._transport._inner
    pools = list(getattr(inner, "_pools", {}).values())
    connections = sum(len(pool.connections) for pool in pools)
    idle = sum(len(pool.idle) for pool in pools)
    return {
        "connections": connections,
        "idle": idle,
        "busy": connections - idle,
        "slots": sum(pool.count for pool in pools),
        "waiters": sum(len(pool.waiters) for pool in pools),
    }


def make_app() -> Any:
    holder: dict[str, Any] = {}

    async def host_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] == "/__chaos/state":
            gateway = holder["middleware"].gateway
            await _json(
                send,
                {
                    "tasks": len(asyncio.all_tasks()),
                    "pool": _pool_state(gateway),
                    "in_flight": {name: stack.handler.in_flight for name, stack in gateway.stacks.items()},
                    "servers": {
                        server.url: {"in_flight": server.in_flight, "healthy": server.healthy}
                        for stack in gateway.stacks.values()
                        for server in stack.servers
                    },
                },
            )
            return
        raw_path = scope.get("raw_path") or scope["path"].encode()
        await _json(
            send, {"host_app": True, "path": scope["path"], "raw_path": raw_path.decode("latin-1")}, 404
        )

    middleware = GatewayMiddleware(host_app, config=os.environ[CONFIG_ENV])
    holder["middleware"] = middleware
    return middleware
