"""The operator's window: the status page (in a real headless Chromium), `/metrics` parsed by
prometheus_client's own parser, and the drain/enable actions, against real upstreams.

The gateway runs under uvicorn in a thread of this process (`GatewayServer`); the upstreams
are real processes (`UpstreamProcess`), killed for real. The browser is Debian's Chromium
driven by Playwright (`pip install playwright`, no browser download); without it the browser
tests fail, saying what to install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import FileGateway, UpstreamProcess, Upstreams, free_port, wait_until

ADMIN = "/-/gateway"
CHROMIUM = os.environ.get("GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium")
#: The README's screenshot, taken again by a run with GATEWAY_TEST_SCREENSHOT=1 (else into the
#: test's own directory, so that a test run leaves the checkout as it was).
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "images" / "admin-page.png"


def gateway_config(
    *upstreams: UpstreamProcess, interval: float | None = None, **admin: Any
) -> dict[str, Any]:
    upstream: dict[str, Any] = {
        "servers": [{"url": process.url} for process in upstreams],
        "retry": {"backoff_base": 0.001, "backoff_max": 0.002},
    }
    if interval is not None:
        upstream["health_check"] = {
            "path": "/healthz",
            "interval": interval,
            "timeout": 0.5,
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
        }
    return {
        "routes": [{"path": "/", "upstream": "main"}],
        "upstreams": {"main": upstream},
        "admin": {"path": ADMIN, **admin},
    }


def server_row(status: dict[str, Any], index: int) -> dict[str, Any]:
    return next(s for s in status["upstreams"]["main"]["servers"] if s["index"] == index)


# -- the page, in a browser --------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"the browser tests need Chromium at {CHROMIUM}: apt-get install -y chromium "
            "(or set GATEWAY_TEST_CHROMIUM to a Chromium binary)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need Playwright: pip install -e '.[test]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def test_the_page_follows_health_and_drains_a_server(
    browser: Any,
    upstream_factory: Callable[..., UpstreamProcess],
    served: Callable[..., FileGateway],
    tmp_path: Path,
) -> None:
    a, b, c = upstream_factory("a"), upstream_factory("b"), upstream_factory("c")
    gw = served(gateway_config(a, b, c, interval=0.2))
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        for _ in range(30):
            assert client.get("/echo").status_code == 200
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    problems: list[str] = []
    page.on(
        "console",
        lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None,
    )
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    try:
        page.goto(f"{gw.url}{ADMIN}/")
        # The script has taken over the view from the server-rendered one.
        page.wait_for_selector("#updated:has-text('updated')", timeout=3000)
        for process in (a, b, c):
            assert process.url in page.inner_text("main")
        # An upstream dies: its row turns unhealthy without a reload of the page.
        b.kill()
        started = time.monotonic()
        page.wait_for_selector('tr[data-server^="main/1/"][data-state="unhealthy"]', timeout=3000)
        assert time.monotonic() - started < 3.0
        # Drain a's server with its button: a form POST, then the page again.
        page.click('tr[data-server^="main/0/"] button[data-action="drain"]')
        page.wait_for_selector('tr[data-server^="main/0/"][data-state="drained"]', timeout=3000)
        assert "drain" in page.inner_text("#actions")
        before = a.requests("echo")
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            names = {client.get("/echo").headers["x-upstream-name"] for _ in range(20)}
        assert names == {"c"}
        assert a.requests("echo") == before
        page.wait_for_selector('tr[data-server^="main/2/"] td.n:not(:has-text("0"))', timeout=3000)
        page.wait_for_selector("#updated:has-text('updated')", timeout=3000)
        screenshot = (
            DOCS_SCREENSHOT if os.environ.get("GATEWAY_TEST_SCREENSHOT") else tmp_path / "admin-page.png"
        )
        page.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.stat().st_size > 10_000
        # And back.
        page.click('tr[data-server^="main/0/"] button[data-action="enable"]')
        page.wait_for_selector('tr[data-server^="main/0/"][data-state="healthy"]', timeout=3000)
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            names = {client.get("/echo").headers["x-upstream-name"] for _ in range(20)}
        assert "a" in names
        assert problems == []
    finally:
        page.close()


def test_the_page_is_complete_without_javascript(
    upstreams: Upstreams, served: Callable[..., FileGateway]
) -> None:
    u1, u2 = upstreams.u1, upstreams.u2
    cfg = gateway_config(u1, u2, trace_url="http://localhost:16686/trace/{trace_id}")
    # Names come from the config: they must be shown, never parsed as markup.
    cfg["upstreams"] = {"<b>main</b>": cfg["upstreams"]["main"]}
    cfg["routes"] = [{"path": "/down", "upstream": "dead"}, {"path": "/", "upstream": "<b>main</b>"}]
    cfg["upstreams"]["dead"] = {
        "servers": [{"url": f"http://127.0.0.1:{free_port()}"}],
        "retry": {"attempts": 1},
    }
    from opentelemetry.sdk.trace import TracerProvider

    gw = served(cfg, tracer_provider=TracerProvider())
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        assert client.get("/echo").status_code == 200
        failed = client.get("/down/x")
        assert failed.status_code >= 500
        page = client.get(f"{ADMIN}/")
        assert client.get(ADMIN).text.startswith("<!doctype html>")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'nonce-" in policy
    html = page.text
    assert "<b>main</b>" not in html and "&lt;b&gt;main&lt;/b&gt;" in html
    for process in (u1, u2):
        assert process.url in html
    # The recent error, with its request id and a link to its trace.
    request_id = failed.headers["x-request-id"]
    assert f'data-request-id="{request_id}"' in html
    status = httpx.get(f"{gw.url}{ADMIN}/status").json()
    error = status["admin"]["recent_errors"][0]
    assert error["request_id"] == request_id and error["route"] == "/down" and error["upstream"] == "dead"
    assert error["trace_id"] and f"http://localhost:16686/trace/{error['trace_id']}" in html
    # No asset from anywhere: everything inline, nonce'd.
    assert "src=" not in html and "<link" not in html
    server = status["upstreams"]["<b>main</b>"]["servers"][0]
    assert server["requests"] >= 1 and server["latency_p50"] is not None


# -- drain / enable ------------------------------------------------------------------------------


def test_drain_survives_a_reload_and_refuses_unknown_servers(
    upstreams: Upstreams, served: Callable[..., FileGateway]
) -> None:
    u1, u2 = upstreams.u1, upstreams.u2
    cfg = gateway_config(u1, u2)
    gw = served(cfg)
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        drained = client.post(f"{ADMIN}/servers/main/1/drain")
        assert drained.status_code == 200 and drained.json()["servers"] == 1
        assert server_row(client.get(f"{ADMIN}/status").json(), 1)["state"] == "drained"
        assert {client.get("/echo").headers["x-upstream-name"] for _ in range(10)} == {"u1"}
        cfg["upstreams"]["main"]["servers"][0]["weight"] = 2
        gw.write(cfg)
        assert client.post(f"{ADMIN}/reload").status_code == 200
        status = client.get(f"{ADMIN}/status").json()
        assert status["config"]["version"] == 2
        assert server_row(status, 1)["state"] == "drained"
        assert {client.get("/echo").headers["x-upstream-name"] for _ in range(10)} == {"u1"}
        assert client.post(f"{ADMIN}/servers/main/1/enable").status_code == 200
        assert "u2" in {client.get("/echo").headers["x-upstream-name"] for _ in range(10)}
        for path in ("/servers/nope/0/drain", "/servers/main/2/drain", "/servers/main/x/drain"):
            missing = client.post(f"{ADMIN}{path}")
            assert missing.status_code == 404 and missing.json()["error"] == "not_found", path
        assert client.get(f"{ADMIN}/servers/main/0/drain").status_code == 405
        actions = client.get(f"{ADMIN}/status").json()["admin"]["actions"]
        assert [a["action"] for a in actions] == ["enable", "reload", "drain"]
        assert actions[0]["client"] == "127.0.0.1" and actions[0]["target"] == "main/1"


def test_the_new_endpoints_follow_token_addresses_and_origin(
    upstreams: Upstreams, served: Callable[..., FileGateway]
) -> None:
    u1 = upstreams.u1
    cfg = gateway_config(u1, token="s3cret")
    gw = served(cfg)
    auth = {"authorization": "Bearer s3cret"}
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        for method, path in (("GET", "/"), ("GET", "/metrics"), ("POST", "/servers/main/0/drain")):
            assert client.request(method, f"{ADMIN}{path}").status_code == 401, path
            assert (
                client.request(method, f"{ADMIN}{path}", headers={"authorization": "Bearer no"}).status_code
                == 401
            )
        for headers in (
            {"origin": "http://evil.example"},
            {"sec-fetch-site": "cross-site"},
            {"origin": "null"},
        ):
            refused = client.post(f"{ADMIN}/servers/main/0/drain", headers={**auth, **headers})
            assert refused.status_code == 403, headers
        assert server_row(client.get(f"{ADMIN}/status", headers=auth).json(), 0)["state"] == "healthy"
        # A same-origin form POST: the redirect back to the page.
        form = client.post(
            f"{ADMIN}/servers/main/0/drain", headers={**auth, "origin": gw.url, "accept": "text/html"}
        )
        assert (form.status_code, form.headers["location"]) == (303, f"{ADMIN}/")
        assert server_row(client.get(f"{ADMIN}/status", headers=auth).json(), 0)["state"] == "drained"
        assert client.get(f"{ADMIN}/", headers=auth).status_code == 200
        cfg["admin"]["allow_ips"] = ["10.0.0.0/8"]
        gw.write(cfg)
        assert client.post(f"{ADMIN}/reload", headers=auth).status_code == 200
        for method, path in (("GET", "/"), ("GET", "/metrics"), ("POST", "/servers/main/0/enable")):
            assert client.request(method, f"{ADMIN}{path}", headers=auth).status_code == 403, path


# -- /metrics ---------------------------------------------------------------------------------


def samples(text: str) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def test_metrics_count_the_requests_made(upstreams: Upstreams, served: Callable[..., FileGateway]) -> None:
    u1, u2 = upstreams.u1, upstreams.u2
    u2.fail(503, count=3)
    gw = served(gateway_config(u1, u2))
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        statuses = [client.get("/echo").status_code for _ in range(12)]
        assert statuses == [200] * 12
        response = client.get(f"{ADMIN}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    served_count = sum(
        s.value
        for s in found["http_server_request_duration_seconds_count"]
        if s.labels.get("http_route") == "/"
    )
    assert served_count == 12
    # Each 503 was retried on the other server: three retries, fifteen attempts.
    retries = sum(s.value for s in found["gateway_retries_total"])
    assert retries == 3
    attempts = sum(s.value for s in found["http_client_request_duration_seconds_count"])
    assert attempts == 15
    available = [
        s for s in found["gateway_upstream_available_servers"] if s.labels["gateway_upstream"] == "main"
    ]
    assert [s.value for s in available] == [2]


def test_metrics_need_the_library(upstreams: Upstreams) -> None:
    """Without prometheus_client the endpoint says what to install (a child process without it)."""
    script = f"""
import json, sys
sys.modules["prometheus_client"] = None  # what an install without the extra has: ImportError
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import httpx
from servers import GatewayServer
from asgi_gateway import Gateway
config = {{"routes": [{{"path": "/", "upstream": "main"}}],
          "upstreams": {{"main": {{"servers": [{{"url": {upstreams.u1.url!r}}}]}}}},
          "admin": {{"path": "{ADMIN}"}}}}
with GatewayServer(Gateway(config)) as server:
    response = httpx.get(server.url + "{ADMIN}/metrics")
    print(json.dumps([response.status_code, response.json()]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    status, body = json.loads(result.stdout.strip().splitlines()[-1])
    assert status == 503
    assert "pip install 'asgi-gateway[admin]'" in body["detail"]


def test_metrics_with_workers_sum_every_worker(upstreams: Upstreams, tmp_path: Path) -> None:
    """`asgi-gateway serve --workers 2`: whichever worker answers a scrape, it counts all requests."""
    u1 = upstreams.u1
    config = tmp_path / "gateway.json"
    config.write_text(json.dumps(gateway_config(u1)))
    port = free_port()
    exe = shutil.which("asgi-gateway", path=str(Path(sys.executable).parent))
    assert exe is not None
    # Named here (rather than the supervisor's own temporary one) to see that both workers wrote.
    shared = tmp_path / "metrics"
    shared.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared)}
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [exe, "serve", str(config), "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{base}{ADMIN}/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout=30, message="the gateway to serve")
        # New connections each: the workers share the accepting socket, so both take some.
        for _ in range(40):
            response = httpx.get(f"{base}/echo", timeout=10)
            assert response.status_code == 200
        assert len(list(shared.glob("histogram_*.db"))) == 2, sorted(p.name for p in shared.iterdir())
        for _ in range(10):
            text = httpx.get(f"{base}{ADMIN}/metrics", timeout=10).text
            total = sum(
                s.value
                for s in samples(text)["http_server_request_duration_seconds_count"]
                if s.labels.get("http_route") == "/"
            )
            assert total == 40
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()
