"""Retries, budget, deadline and body replay through a real gateway and real upstreams."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from servers import UpstreamProcess, Upstreams, free_port, wait_until

MiB = 1024 * 1024


def gateway_config(
    servers: Sequence[str],
    *,
    retry: dict[str, Any] | None = None,
    timeouts: dict[str, Any] | None = None,
    outlier_detection: Any = False,
    **top: Any,
) -> dict[str, Any]:
    upstream: dict[str, Any] = {
        "servers": [{"url": url} for url in servers],
        "retry": retry or {},
        "timeouts": {"connect": 1.0, "read": 10.0, "total": 20.0, **(timeouts or {})},
        "outlier_detection": outlier_detection,
    }
    return {"routes": [{"path": "/api", "upstream": "svc"}], "upstreams": {"svc": upstream}, **top}


def total_requests(servers: Sequence[UpstreamProcess], op: str) -> int:
    return sum(server.requests(op) for server in servers)


@pytest.mark.anyio
async def test_one_of_three_killed_during_1000_gets_every_get_succeeds(
    upstream_factory: Callable[..., UpstreamProcess], gateway_factory: Callable[..., str]
) -> None:
    servers = [upstream_factory(f"k{i}") for i in range(3)]
    victim = servers[1]
    base = gateway_factory(gateway_config([s.url for s in servers], outlier_detection={}))
    statuses: list[int] = []
    todo = iter(range(1000))
    killed = anyio.Event()
    served_before_kill = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal served_before_kill
        for i in todo:
            # `slow` keeps requests in flight on the victim when it dies, so resets happen too.
            response = await client.get(f"{base}/api/slow", params={"delay": "0.01", "i": str(i)})
            statuses.append(response.status_code)
            if len(statuses) == 300 and not killed.is_set():
                killed.set()
                served_before_kill = await anyio.to_thread.run_sync(victim.requests, "slow")
                await anyio.to_thread.run_sync(victim.kill)

    async with httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(worker, client)

    assert len(statuses) == 1000
    failures = [status for status in statuses if status != 200]
    assert failures == []
    assert served_before_kill > 0
    survivors = [servers[0], servers[2]]
    assert total_requests(survivors, "slow") >= 1000 - 300


def test_post_answered_503_is_retried_only_with_an_idempotency_key(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    failing, healthy = upstreams.u1, upstreams.u2
    failing.fail(503)
    base = gateway_factory(gateway_config([failing.url, healthy.url]))
    with httpx.Client(base_url=base, timeout=30) as client:
        plain = [client.post("/api/echo", content=b"order") for _ in range(4)]
        assert sorted(r.status_code for r in plain) == [200, 200, 503, 503]  # round robin, no retry
        assert all(r.json()["server"] == "u1" for r in plain if r.status_code == 503)
        assert (failing.requests(), healthy.requests()) == (2, 2)

        failing.reset()
        healthy.reset()
        failing.fail(503)
        keyed = [
            client.post("/api/echo", content=b"order", headers={"Idempotency-Key": f"k{i}"}) for i in range(4)
        ]
        assert [r.status_code for r in keyed] == [200] * 4
        assert {r.json()["server"] for r in keyed} == {"u2"}
        # Each keyed POST that met u1 went on to u2 (how many met u1 is the balancer's business).
        assert failing.requests() >= 1 and healthy.requests() == 4


def test_post_with_connection_refused_is_retried_on_another_server(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    base = gateway_config([dead, upstreams.u1.url])
    url = gateway_factory(base)
    with httpx.Client(base_url=url, timeout=30) as client:
        responses = [client.post("/api/echo", content=f"order {i}".encode()) for i in range(4)]
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.json()["body"] for r in responses] == [f"order {i}" for i in range(4)]
    assert upstreams.u1.requests() == 4


def test_post_is_not_sent_twice_when_its_server_dies_mid_request(
    upstreams: Upstreams,
    upstream_factory: Callable[..., UpstreamProcess],
    gateway_factory: Callable[..., str],
) -> None:
    victim, other = upstream_factory("victim"), upstreams.u1
    base = gateway_factory(gateway_config([victim.url, other.url], timeouts={"total": 3.0}))
    with httpx.Client(base_url=base, timeout=30) as client:
        # Warm a keep-alive connection to each server and end on `other`: round robin sends the
        # POST next to the victim, over a reused connection.
        for _ in range(4):
            last = client.get("/api/echo").json()["server"]
        if last != "u1":
            assert client.get("/api/echo").json()["server"] == "u1"
        result: list[httpx.Response] = []
        poster = threading.Thread(target=lambda: result.append(client.post("/api/hang", content=b"pay")))
        poster.start()
        wait_until(lambda: victim.stats()["in_flight"].get("hang") == 1, message="the POST at the victim")
        victim.kill()
        poster.join(30)
    # The victim had the POST: sending it anywhere again could charge twice.
    assert result[0].status_code == 502
    assert other.requests("hang") == 0


@pytest.mark.parametrize("total", [1.0, 1.5])
def test_hanging_server_gives_504_within_total(
    upstreams: Upstreams, gateway_factory: Callable[..., str], total: float
) -> None:
    hanging = upstreams.u1
    base = gateway_factory(gateway_config([hanging.url], timeouts={"read": 30.0, "total": total}))
    with httpx.Client(base_url=base, timeout=30) as client:
        start = time.monotonic()
        response = client.get("/api/hang")
        elapsed = time.monotonic() - start
    assert response.status_code == 504
    assert response.json()["error"] == "gateway_timeout"
    assert total * 0.9 <= elapsed <= total * 1.1
    # Nothing keeps going upstream-bound: the attempt's connection was closed.
    hanging.wait_disconnects("hang", 1, timeout=5)
    assert hanging.stats()["in_flight"] == {}


def test_read_timeouts_are_retried_within_total(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    servers = [upstreams.u1, upstreams.u2]
    for server in servers:
        server.fail(mode="hang")
    config = gateway_config(
        [s.url for s in servers], retry={"attempts": 5}, timeouts={"read": 0.3, "total": 1.0}
    )
    base = gateway_factory(config)
    with httpx.Client(base_url=base, timeout=30) as client:
        start = time.monotonic()
        response = client.get("/api/echo")
        elapsed = time.monotonic() - start
    assert response.status_code == 504
    assert 0.9 <= elapsed <= 1.1
    # Three or four tries of 0.3 s (plus backoff) fit in the second; the last is cut by the deadline.
    assert 3 <= total_requests(servers, "echo") <= 4
    for server in servers:
        server.wait_disconnects("echo", server.requests(), timeout=5)


def test_budget_bounds_what_failing_upstreams_see(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    servers = [upstreams.u1, upstreams.u2]
    for server in servers:
        server.fail(503)
    retry = {"attempts": 3, "budget_ratio": 0.2, "budget_min_per_second": 0.1}
    base = gateway_factory(gateway_config([s.url for s in servers], retry=retry))
    n = 50
    start = time.monotonic()
    with httpx.Client(base_url=base, timeout=30) as client:
        statuses = [client.get("/api/echo").status_code for _ in range(n)]
    assert time.monotonic() - start < 9  # within one budget window, so the bound below is exact
    assert statuses == [503] * n
    seen = total_requests(servers, "echo")
    # 0.2 x 50 requests + 0.1/s x 10 s = 11 retries at most; without a budget it would be 150.
    assert seen <= n + 11
    assert seen >= n + 9  # and the budget is spent, not simply refused


def test_retry_after_is_honoured(upstreams: Upstreams, gateway_factory: Callable[..., str]) -> None:
    server = upstreams.u1
    base = gateway_factory(gateway_config([server.url], timeouts={"total": 5.0}))
    with httpx.Client(base_url=base, timeout=30) as client:
        server.fail(503, count=1, retry_after=1)
        start = time.monotonic()
        response = client.get("/api/echo")
        elapsed = time.monotonic() - start
        assert response.status_code == 200
        assert 1.0 <= elapsed < 1.5  # the jittered backoff alone would be under 0.25 s
        assert server.requests() == 2

        # A Retry-After past the deadline: the client gets the upstream's 503 at once.
        server.reset()
        server.fail(503, count=1, retry_after=30)
        start = time.monotonic()
        response = client.get("/api/echo")
        assert time.monotonic() - start < 0.9
        assert response.status_code == 503
        assert response.headers["retry-after"] == "30"
        assert response.json() == {"server": "u1", "error": "fail mode"}
        assert server.requests() == 1


def test_body_within_buffer_limit_is_replayed_intact(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    server = upstreams.u1
    config = gateway_config(
        [server.url], retry={"buffer_limit": 16 * MiB}, max_body_size=64 * MiB, timeouts={"read": 30.0}
    )
    base = gateway_factory(config)
    body = os.urandom(10 * MiB)
    with httpx.Client(base_url=base, timeout=60) as client:
        server.fail(503, count=1)
        response = client.put("/api/upload", content=body)
        assert response.status_code == 200
        assert response.json()["sha256"] == hashlib.sha256(body).hexdigest()
        assert response.json()["length"] == len(body)
        assert server.requests("upload") == 2

        # Past the buffer limit the body streams: once it went out it cannot be sent again.
        server.reset()
        large = os.urandom(20 * MiB)
        server.fail(503, count=1)
        response = client.put("/api/upload", content=large)
        assert response.status_code == 503
        assert response.json()["server"] == "u1"
        assert server.requests("upload") == 1

        # ... though it streams fine when nothing fails.
        response = client.put("/api/upload", content=large)
        assert response.status_code == 200
        assert response.json()["sha256"] == hashlib.sha256(large).hexdigest()
