"""A `Gateway` mounted in a FastAPI app, started and stopped by `lifespan=gateway.lifespan`."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI
from servers import Upstreams, serve_app, wait_until

from asgi_gateway import Gateway


def config(upstreams: Upstreams) -> dict[str, Any]:
    return {
        "routes": [{"path": "/api/users", "upstream": "users"}],
        "upstreams": {
            "users": {
                "servers": [{"url": upstreams.u1.url}, {"url": upstreams.u2.url}],
                "health_check": {
                    "path": "/healthz",
                    "interval": 0.1,
                    "timeout": 1.0,
                    "unhealthy_threshold": 1,
                },
            }
        },
        "status_path": "/-/status",
    }


def test_mounted_gateway_proxies_and_runs_its_health_checks(upstreams: Upstreams) -> None:
    gateway = Gateway(config(upstreams))
    app = FastAPI(lifespan=gateway.lifespan)

    @app.get("/own")
    async def own() -> dict[str, bool]:
        return {"own": True}

    app.mount("/gw", gateway)
    with serve_app(app) as base, httpx.Client(base_url=base, timeout=5) as client:
        assert client.get("/own").json() == {"own": True}
        # Routes are relative to the mount point, and the path goes upstream as it is there.
        answer = client.get("/gw/api/users/7")
        assert answer.status_code == 200
        assert answer.json()["raw_path"] == "/api/users/7"
        # Unmatched under the mount: the standalone gateway's 404.
        assert client.get("/gw/elsewhere").status_code == 404
        # The lifespan started the active checks: a server failing them leaves the rotation.
        upstreams.u2.set_healthy(False)

        def u2_down() -> bool:
            servers = client.get("/gw/-/status").json()["upstreams"]["users"]["servers"]
            return [s["state"] for s in servers] == ["healthy", "unhealthy"]

        wait_until(u2_down, timeout=5)
        assert {client.get("/gw/api/users/echo").json()["server"] for _ in range(6)} == {"u1"}
