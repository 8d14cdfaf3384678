"""The example app in examples/fastapi_app runs as the README says and proxies for real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from servers import free_port, wait_until

from asgi_gateway import load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app"


def test_the_config_file_form_is_valid() -> None:
    config = load_config(EXAMPLE / "gateway.toml")
    assert [route.path for route in config.routes] == ["/api/users", "/api/orders"]
    assert config.status_path == "/-/gateway/status"


def test_the_example_serves_its_own_routes_and_proxies_the_rest() -> None:
    port = free_port()
    demo_ports = ",".join(str(free_port()) for _ in range(3))
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLE / "main.py"), "--port", str(port), "--demo-ports", demo_ports],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=5) as client:

            def ready() -> bool:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                try:
                    return client.get("/hello").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(ready, timeout=30)
            assert client.get("/hello").json() == {"hello": "from the host app, not proxied"}
            served = {client.get("/api/users/42").json()["served_by"] for _ in range(4)}
            assert served == {"demo-1", "demo-2"}
            # One Server (the upstream's, relayed) and one Date (the front server's) per answer.
            proxied = client.get("/api/users/42")
            assert proxied.headers.get_list("server") == ["uvicorn"]
            assert len(proxied.headers.get_list("date")) == 1
            orders = client.get("/api/orders/7", params={"expand": "items"}).json()
            assert orders["served_by"] == "demo-3"
            assert orders["path"] == "/7" and orders["query"] == "expand=items"
            status = client.get("/-/gateway/status").json()
            assert set(status["upstreams"]) == {"users", "orders"}
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=15)
    assert f"curl -s {base}/api/users/42" in output
    assert "Traceback" not in output
