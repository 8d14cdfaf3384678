"""Small demo upstream services, so the example runs with nothing else installed or started."""

from __future__ import annotations

import json
import os
from typing import Any


def make_upstream(name: str) -> Any:
    """A tiny ASGI service that says who it is and echoes what it received."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        size = 0
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        if scope["path"] == "/healthz":
            payload: dict[str, Any] = {"ok": True}
        else:
            payload = {
                "served_by": name,
                "pid": os.getpid(),
                "method": scope["method"],
                "path": scope["path"],
                "query": scope["query_string"].decode("latin-1"),
                "body_bytes": size,
                "headers": {k.decode(): v.decode("latin-1") for k, v in scope["headers"]},
            }
        body = json.dumps(payload, indent=2).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app
