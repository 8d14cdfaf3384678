"""The command line: `asgi-gateway check|serve CONFIG` and `python -m asgi_gateway`, as real processes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import Upstreams, free_port, http_client

BAD_URL_MESSAGE = "upstreams.users.servers[1].url: 'htp://x' is not an http(s) URL"


def console_script() -> str:
    beside_python = Path(sys.executable).with_name("asgi-gateway")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("asgi-gateway")
    assert found, "the asgi-gateway console script is not installed"
    return found


def run_module(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asgi_gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def config(users_url: str = "http://127.0.0.1:9001") -> dict[str, Any]:
    return {
        "routes": [
            {"path": "/api/users", "upstream": "users"},
            {"path": "/api/orders", "upstream": "orders", "strip_prefix": True, "methods": ["GET"]},
        ],
        "upstreams": {
            "users": {"servers": [{"url": users_url}]},
            "orders": {
                "servers": [
                    {"url": "http://127.0.0.1:9003"},
                    {"url": "http://127.0.0.1:9004", "backup": True},
                ]
            },
        },
    }


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_check_prints_routes_and_upstreams(tmp_path: Path) -> None:
    result = run_module("check", str(write(tmp_path / "gateway.json", config())))
    assert result.returncode == 0, result.stderr
    for text in (
        "/api/users",
        "/api/orders",
        "users",
        "orders",
        "http://127.0.0.1:9001",
        "http://127.0.0.1:9004",
    ):
        assert text in result.stdout, result.stdout


def test_check_accepts_yaml_and_toml(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text(
        "routes:\n  - path: /api\n    upstream: api\nupstreams:\n  api:\n    servers:\n      - url: http://127.0.0.1:9005\n"
    )
    (tmp_path / "gateway.toml").write_text(
        '[[routes]]\npath = "/api"\nupstream = "api"\n\n[[upstreams.api.servers]]\nurl = "http://127.0.0.1:9005"\n'
    )
    for name in ("gateway.yaml", "gateway.toml"):
        result = run_module("check", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        assert "http://127.0.0.1:9005" in result.stdout


def test_check_bad_config_exits_2_with_the_message_and_no_traceback(tmp_path: Path) -> None:
    data = config()
    data["upstreams"]["users"]["servers"].append({"url": "htp://x"})
    result = subprocess.run(
        [console_script(), "check", str(write(tmp_path / "gateway.json", data))],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert BAD_URL_MESSAGE in output
    assert "Traceback" not in output


def six_mistakes() -> tuple[dict[str, Any], list[str]]:
    """A config with six mistakes in different sections, and the line each must give."""
    data = config()
    data["routes"][1]["upstream"] = "nope"
    users = data["upstreams"]["users"]
    users["servers"][0]["url"] = "htp://x"
    users["health_check"] = {"timeout": "1s"}
    orders = data["upstreams"]["orders"]
    orders["retry"] = {"attempts": 0}
    orders["timeouts"] = {"total": -1}
    data["trusted_proxies"] = ["localhost"]
    return data, [
        "routes[1].upstream: 'nope' is not a configured upstream (orders, users)",
        "upstreams.users.servers[0].url: 'htp://x' is not an http(s) URL",
        "upstreams.users.health_check.timeout: '1s' is not a number",
        "upstreams.orders.retry.attempts: 0 must be at least 1",
        "upstreams.orders.timeouts.total: -1 must be greater than 0",
        "trusted_proxies[0]: 'localhost' is not an IP address or CIDR",
    ]


@pytest.mark.parametrize("command", ["check", "serve"])
def test_bad_config_prints_every_error_and_exits_2(tmp_path: Path, command: str) -> None:
    data, expected = six_mistakes()
    path = write(tmp_path / "gateway.json", data)
    args = [command, str(path)] if command == "check" else [command, str(path), "--port", str(free_port())]
    result = subprocess.run(
        [console_script(), *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""
    # A count first, then one line per error, so the file can be fixed in one go.
    header, *lines = result.stderr.splitlines()
    assert header == f"asgi-gateway: invalid config {path}: 6 errors"
    assert sorted(lines) == sorted(f"  {line}" for line in expected)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.toml", None, "missing.toml"),
        ("broken.toml", "routes = [", "broken.toml"),
        ("unknown.json", json.dumps({**config(), "extra": 1}), "extra"),
    ],
)
def test_check_other_bad_configs_exit_2_without_traceback(
    tmp_path: Path, name: str, content: str | None, expected: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    result = run_module("check", str(path))
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert expected in output
    assert "Traceback" not in output


def test_help_and_usage_errors() -> None:
    assert run_module("--help").returncode == 0
    usage = run_module()
    assert usage.returncode == 2
    assert "Traceback" not in usage.stderr


def test_serve_bad_config_exits_2(tmp_path: Path) -> None:
    data = config()
    data["upstreams"]["users"]["servers"].append({"url": "htp://x"})
    result = subprocess.run(
        [console_script(), "serve", str(write(tmp_path / "gateway.json", data)), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert BAD_URL_MESSAGE in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def wait_answering(process: subprocess.Popen[bytes], client: httpx.Client, url: str) -> httpx.Response | None:
    """Poll `url` until it answers; None if the process exited first (e.g. lost its port)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        try:
            return client.get(url, timeout=2)
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError(f"asgi-gateway serve did not answer {url} within 30s")


def test_serve_forwards_requests(tmp_path: Path, upstreams: Upstreams) -> None:
    path = write(tmp_path / "gateway.json", config(upstreams.u1.url))
    for _ in range(3):  # the port is chosen here, so another process may take it first
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        command = [console_script(), "serve", str(path), "--host", "127.0.0.1", "--port", str(port)]
        process = subprocess.Popen(
            [*command, "--log-level", "warning"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = http_client(base_url, timeout=5)
        try:
            response = wait_answering(process, client, "/api/users/echo")
            if response is None:
                continue
            assert response.status_code == 200
            assert response.json()["server"] == "u1"
            assert response.json()["raw_path"] == "/api/users/echo"
            # Unmatched requests get 404 from the standalone gateway.
            assert client.get("/nothing").status_code == 404
            # trusted_proxies is empty: a client's X-Forwarded-For is replaced, even from 127.0.0.1.
            spoofed = client.get("/api/users/echo", headers={"x-forwarded-for": "6.6.6.6"}, timeout=5)
            forwarded = [v for k, v in spoofed.json()["headers"] if k == "x-forwarded-for"]
            assert forwarded == ["127.0.0.1"]
            process.terminate()
            process.wait(15)
            # A graceful shutdown; uvicorn re-raises the signal afterwards so supervisors see it.
            assert process.returncode in (0, -signal.SIGTERM)
            return
        finally:
            client.close()
            if process.poll() is None:
                process.kill()
                process.wait(10)
    raise AssertionError("asgi-gateway serve never started")
