"""Failover and health checks end to end: a real gateway under uvicorn, real upstream processes
that the tests kill (SIGKILL) and start again."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from servers import GatewayServer, make_host_app, wait_until

from asgi_gateway import Gateway

STATUS = "/-/gateway/status"
INTERVAL = 0.1
HEALTHY_THRESHOLD = 2
#: Slack on top of interval x threshold (x 1.1 for the jitter): scheduling on a busy 2-core box.
MARGIN = 0.4


def server(upstream: Any, *, backup: bool = False) -> dict[str, Any]:
    return {"url": upstream.url, "backup": backup}


def config(servers: list[dict[str, Any]], **upstream: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "servers": servers,
        "retry": {"attempts": 3, "backoff_base": 0.001, "backoff_max": 0.005},
        "timeouts": {"connect": 1.0, "read": 5.0, "total": 10.0},
    }
    spec.update(upstream)
    return {
        "routes": [{"path": "/api", "upstream": "svc", "strip_prefix": True}],
        "upstreams": {"svc": spec},
        "status_path": STATUS,
    }


def active_check(**overrides: Any) -> dict[str, Any]:
    check: dict[str, Any] = {
        "path": "/healthz",
        "interval": INTERVAL,
        "timeout": 0.5,
        "healthy_threshold": HEALTHY_THRESHOLD,
        "unhealthy_threshold": 2,
    }
    check.update(overrides)
    return check


def servers_status(base_url: str) -> dict[str, dict[str, Any]]:
    """The status view of upstream `svc`, servers keyed by URL (plus the upstream under "")."""
    body = httpx.get(base_url + STATUS, timeout=5).json()
    upstream = body["upstreams"]["svc"]
    return {"": upstream, **{s["url"]: s for s in upstream["servers"]}}


class RequestStream:
    """A bounded stream of GETs in a thread: (time, status, upstream name) for each."""

    def __init__(self, url: str, *, limit: int = 20000, pause: float = 0.003) -> None:
        self.url = url
        self.limit = limit
        self.pause = pause
        self.results: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            for _ in range(self.limit):
                if self._stop.is_set():
                    return
                try:
                    response = client.get(self.url)
                    self.results.append(
                        (time.monotonic(), response.status_code, response.headers.get("x-upstream-name", ""))
                    )
                except httpx.HTTPError as exc:
                    self.results.append((time.monotonic(), 0, repr(exc)))
                time.sleep(self.pause)

    def __enter__(self) -> RequestStream:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive()

    def since(self, when: float) -> list[tuple[float, int, str]]:
        return [result for result in list(self.results) if result[0] > when]

    def wait_for(
        self, predicate: Callable[[list[tuple[float, int, str]]], bool], timeout: float, message: str
    ) -> None:
        wait_until(lambda: predicate(list(self.results)), timeout, message=message)


def names(results: list[tuple[float, int, str]]) -> set[str]:
    return {name for _, _, name in results}


def test_backups_serve_while_primaries_are_killed_then_traffic_returns(
    upstreams: Any, gateway_factory: Callable[..., str]
) -> None:
    u1, u2, u3 = upstreams
    base = gateway_factory(
        config(
            [server(u1), server(u2), server(u3, backup=True)],
            health_check=active_check(),
            # Only the active checks here: passive ejection (tested below) would hold them out longer.
            outlier_detection=False,
        )
    )
    with RequestStream(base + "/api/echo") as stream:
        stream.wait_for(lambda r: {"u1", "u2"} <= names(r), 10, "both primaries to serve")
        assert "u3" not in names(stream.results)

        killed = time.monotonic()
        u1.kill()
        u2.kill()
        stream.wait_for(lambda r: sum(1 for t, _, n in r if t > killed and n == "u3") >= 30, 10, "backup")
        status = servers_status(base)
        assert status[u1.url]["state"] == status[u2.url]["state"] == "unhealthy"
        assert status[""]["mode"] == "backup"

        u1.restart()
        ready = time.monotonic()
        stream.wait_for(lambda r: any(t > ready and n == "u1" for t, _, n in r), 5, "failback to u1")
        took = next(t for t, _, n in stream.since(ready) if n == "u1") - ready
        assert took < INTERVAL * 1.1 * HEALTHY_THRESHOLD + MARGIN
        u2.restart()
        ready = time.monotonic()
        stream.wait_for(lambda r: any(t > ready and n == "u2" for t, _, n in r), 5, "failback to u2")
        took = next(t for t, _, n in stream.since(ready) if n == "u2") - ready
        assert took < INTERVAL * 1.1 * HEALTHY_THRESHOLD + MARGIN
        settled = time.monotonic()
        stream.wait_for(lambda r: len([x for x in r if x[0] > settled]) >= 30, 10, "traffic after failback")

    assert names(stream.since(settled)) == {"u1", "u2"}
    # No request lost in either switch: retries reached a live server every time.
    failed = [result for result in stream.results if result[1] != 200]
    assert not failed, failed[:5]
    assert len(stream.results) >= 100


def test_a_server_answering_503_is_ejected_by_passive_detection_then_readmitted(
    upstreams: Any, gateway_factory: Callable[..., str]
) -> None:
    u1, u2, _ = upstreams
    base = gateway_factory(
        config(
            [server(u1), server(u2)],
            outlier_detection={
                "consecutive_failures": 3,
                "base_ejection_time": 1.0,
                "max_ejection_time": 4.0,
            },
        )
    )
    u1.fail(503)
    with httpx.Client(base_url=base, timeout=10) as client:
        answers = [client.get("/api/echo") for _ in range(12)]
        # Each 503 was retried on u2; u1 got exactly `consecutive_failures` requests, then none.
        assert [r.status_code for r in answers] == [200] * 12
        assert {r.headers["x-upstream-name"] for r in answers} == {"u2"}
        assert u1.requests("echo") == 3
        status = servers_status(base)
        assert status[u1.url]["state"] == "ejected"
        assert status[u1.url]["recent_failures"] == 3
        assert status[u1.url]["last_failure"] == "503"
        assert 0 < status[u1.url]["ejected_for"] <= 1.0
        assert status[u2.url]["state"] == "healthy"
        ejected_at = time.monotonic() - (1.0 - status[u1.url]["ejected_for"])

        u1.fail_off()

        def served_by_u1() -> bool:
            return client.get("/api/echo").headers["x-upstream-name"] == "u1"

        wait_until(served_by_u1, 5, message="u1 readmitted")
        back_after = time.monotonic() - ejected_at
        assert 1.0 <= back_after < 1.0 + MARGIN + 0.2
    assert servers_status(base)[u1.url]["state"] == "healthy"


class Flapper:
    """A tiny upstream whose /healthz answers follow `pattern`, one entry per check, cycling."""

    def __init__(self, name: str, pattern: list[int]) -> None:
        self.name = name
        self.pattern = pattern
        self.checks = 0

    def flap(self, pattern: list[int]) -> None:
        self.pattern = pattern
        self.checks = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        status = 200
        if scope["path"] == "/healthz":
            pattern = self.pattern
            status = pattern[self.checks % len(pattern)]
            self.checks += 1
        headers = [(b"x-upstream-name", self.name.encode()), (b"content-length", b"2")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


def test_flapping_is_held_by_the_thresholds(
    upstreams: Any,
    gateway_factory: Callable[..., str],
    serve: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="asgi_gateway.health")
    flapper = Flapper("flapper", [200, 503])
    flapper_url = serve(flapper)
    base = gateway_factory(
        config(
            [{"url": flapper_url}, server(upstreams.u1)],
            health_check=active_check(interval=0.03, healthy_threshold=2, unhealthy_threshold=2),
        )
    )

    def transitions() -> list[str]:
        return [r.getMessage() for r in caplog.records if getattr(r, "server", None) == flapper_url]

    # Up, failing every other check: never two failures in a row, so it stays in.
    wait_until(lambda: flapper.checks >= 20, 10, message="20 checks")
    assert transitions() == []
    assert servers_status(base)[flapper_url]["state"] == "healthy"
    with httpx.Client(base_url=base, timeout=10) as client:
        assert "flapper" in {client.get("/api/x").headers["x-upstream-name"] for _ in range(6)}

    # Two failures in a row take it down.
    flapper.flap([503])
    wait_until(lambda: servers_status(base)[flapper_url]["state"] == "unhealthy", 5, message="down")
    assert len(transitions()) == 1 and "down" in transitions()[0]

    # Down, passing every other check: never two passes in a row, so it stays out.
    flapper.flap([503, 200])
    wait_until(lambda: flapper.checks >= 20, 10, message="20 more checks")
    assert len(transitions()) == 1
    with httpx.Client(base_url=base, timeout=10) as client:
        assert {client.get("/api/x").headers["x-upstream-name"] for _ in range(6)} == {"u1"}

    flapper.flap([200])
    wait_until(lambda: servers_status(base)[flapper_url]["state"] == "healthy", 5, message="up")
    assert len(transitions()) == 2 and "healthy again" in transitions()[1]


def test_all_down_answers_503_at_once_with_retry_after(
    upstreams: Any, gateway_factory: Callable[..., str]
) -> None:
    u1, u2, _ = upstreams
    base = gateway_factory(
        config(
            [server(u1), server(u2)],
            outlier_detection={
                "consecutive_failures": 1,
                "base_ejection_time": 7.0,
                "max_ejection_percent": 100,
            },
        )
    )
    u1.kill()
    u2.kill()
    with httpx.Client(base_url=base, timeout=10) as client:
        # The first request finds both dead (and ejects them); from then on nothing is tried.
        first = client.get("/api/echo")
        assert first.status_code in (502, 503)
        started = time.monotonic()
        response = client.get("/api/echo")
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert response.json()["error"] == "upstream_unavailable"
    assert response.headers["content-type"] == "application/json"
    assert 6 <= int(response.headers["retry-after"]) <= 7
    assert elapsed < 0.25
    status = servers_status(base)
    assert status[""]["mode"] == "unavailable"
    assert {status[u.url]["state"] for u in (u1, u2)} == {"ejected"}


def test_all_unhealthy_answers_503_unless_panic(upstreams: Any, gateway_factory: Callable[..., str]) -> None:
    u1, u2, _ = upstreams
    strict = gateway_factory(config([server(u1), server(u2)], health_check=active_check()))
    panicky = gateway_factory(config([server(u1), server(u2)], health_check=active_check(), panic=True))
    u1.set_healthy(False)
    u2.set_healthy(False)
    for base in (strict, panicky):
        wait_until(lambda b=base: servers_status(b)[""]["available"] == 0, 5, message="all unhealthy")
    with httpx.Client(timeout=10) as client:
        started = time.monotonic()
        refused = client.get(strict + "/api/echo")
        elapsed = time.monotonic() - started
        assert refused.status_code == 503
        assert refused.json()["error"] == "upstream_unavailable"
        # Only a passing check can bring one back: about interval x healthy_threshold, at least 1 s.
        assert int(refused.headers["retry-after"]) == max(1, math.ceil(INTERVAL * HEALTHY_THRESHOLD))
        assert elapsed < 0.25
        served = [client.get(panicky + "/api/echo") for _ in range(6)]
    assert [r.status_code for r in served] == [200] * 6
    assert {r.headers["x-upstream-name"] for r in served} == {"u1", "u2"}
    assert servers_status(panicky)[""]["mode"] == "panic"


def test_no_health_check_runs_after_shutdown(upstreams: Any) -> None:
    u1 = upstreams.u1
    app = make_host_app(config([server(u1)], health_check=active_check(interval=0.05)))
    gateway = GatewayServer(app).start()
    try:
        wait_until(lambda: u1.requests("healthz") >= 3, 5, message="health checks running")
    finally:
        gateway.stop()
    assert not gateway.thread.is_alive()
    after = u1.requests("healthz")
    # Ten intervals with nothing: the loop is gone, not just late.
    time.sleep(0.5)
    assert u1.requests("healthz") == after


@pytest.mark.anyio
async def test_lifespan_leaves_no_check_task(upstreams: Any) -> None:
    gateway = Gateway(config([server(upstreams.u1)], health_check=active_check(interval=0.05)))

    def checks() -> list[asyncio.Task[Any]]:
        return [task for task in asyncio.all_tasks() if task.get_name() == "health check svc"]

    async with gateway.lifespan():
        await asyncio.sleep(0)
        assert len(checks()) == 1
        deadline = time.monotonic() + 5
        while upstreams.u1.requests("healthz") < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    assert checks() == []
