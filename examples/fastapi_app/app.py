"""A FastAPI app with its own routes, acting as an API gateway for others.

Two ways to configure the gateway are shown: a dict in code (`build_app()`), and a
config file (`build_app("gateway.toml")`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from asgi_gateway import GatewayMiddleware
from asgi_gateway._otel_setup import configure_from_environment

HERE = Path(__file__).parent
DEMO_PORTS = (9101, 9102, 9103)


def demo_config(ports: tuple[int, ...] = DEMO_PORTS) -> dict[str, Any]:
    """Gateway config for the embedded demo upstreams."""
    return {
        "routes": [
            {"path": "/api/users", "upstream": "users"},
            {"path": "/api/orders", "upstream": "orders", "strip_prefix": True, "methods": ["GET", "POST"]},
        ],
        "upstreams": {
            "users": {
                "servers": [{"url": f"http://127.0.0.1:{ports[0]}"}, {"url": f"http://127.0.0.1:{ports[1]}"}],
                "balancer": "round_robin",
                "health_check": {"path": "/healthz", "interval": 2.0, "timeout": 1.0},
            },
            "orders": {
                "servers": [
                    {"url": f"http://127.0.0.1:{ports[2]}"},
                    {"url": f"http://127.0.0.1:{ports[0]}", "backup": True},
                ],
                "retry": {"attempts": 2},
            },
        },
        "status_path": "/-/gateway/status",
    }


def build_app(config: Any = None) -> FastAPI:
    """The host app: its own routes, plus the gateway in front of them."""
    app = FastAPI(title="asgi_gateway example")

    @app.get("/")
    async def index() -> dict[str, Any]:
        return {
            "local": "this answer comes from the FastAPI app itself",
            "try": ["/api/users/42", "/api/orders/7?expand=items", "/-/gateway/status", "/hello"],
        }

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "from the host app, not proxied"}

    app.add_middleware(
        GatewayMiddleware,
        config=config if config is not None else demo_config(),
        **configure_from_environment(),
    )
    return app


# `uvicorn examples.fastapi_app.app:app --no-server-header` serves the config-file form (the
# upstream's Server header is relayed, so uvicorn's own would be a second one); main.py starts
# the demo upstreams too.
app = build_app(os.environ.get("GATEWAY_CONFIG", str(HERE / "gateway.toml")))
