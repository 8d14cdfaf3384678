"""Every balancer through a real gateway (GatewayMiddleware under uvicorn) and three real uvicorn
upstreams, observed through which upstream answered (its `x-upstream-name` header)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from servers import UpstreamProcess, Upstreams, wait_until

from asgi_gateway._layers.balancer import peak_ewma

STATUS = "/-/gateway/status"
NAMES = ("u1", "u2", "u3")


def gateway_config(
    servers: Sequence[tuple[UpstreamProcess, int]],
    balancer: str,
    hash_on: str | None = None,
    health_check: dict[str, Any] | None = None,
) -> dict[str, Any]:
    upstream: dict[str, Any] = {
        "servers": [{"url": server.url, "weight": weight} for server, weight in servers],
        "balancer": balancer,
        # One attempt, no ejections: every answer shows the balancer's own choice.
        "retry": {"attempts": 1},
        "outlier_detection": False,
        "timeouts": {"connect": 2.0, "read": 20.0, "total": 30.0},
    }
    if hash_on is not None:
        upstream["hash_on"] = hash_on
    if health_check is not None:
        upstream["health_check"] = health_check
    return {
        "routes": [{"path": "/api", "upstream": "svc"}],
        "upstreams": {"svc": upstream},
        "status_path": STATUS,
    }


def equal(upstreams: Upstreams, *weights: int) -> list[tuple[UpstreamProcess, int]]:
    return list(zip(upstreams, weights or (1, 1, 1), strict=True))


def served_by(client: httpx.Client, path: str = "/api/echo", **kwargs: Any) -> str:
    response = client.get(path, **kwargs)
    assert response.status_code == 200, response.text
    return response.headers["x-upstream-name"]


def available(client: httpx.Client) -> int:
    return int(client.get(STATUS).json()["upstreams"]["svc"]["available"])


def test_round_robin_exact_smooth_sequence(upstreams: Upstreams, gateway_factory: Callable[..., str]) -> None:
    base = gateway_factory(gateway_config(equal(upstreams, 1, 2, 3), "round_robin"))
    with httpx.Client(base_url=base, timeout=10) as client:
        picks = [served_by(client) for _ in range(12)]
    assert picks == ["u3", "u2", "u1", "u3", "u2", "u3"] * 2


@pytest.mark.parametrize(
    "kind", ["round_robin", "random", "weighted_random", "least_connections", "consistent_hash"]
)
def test_every_kind_spreads_over_every_server(
    kind: str, upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    config = gateway_config(equal(upstreams), kind, "header:x-user-id" if kind == "consistent_hash" else None)
    base = gateway_factory(config)
    with httpx.Client(base_url=base, timeout=10) as client:
        picks = [served_by(client, headers={"x-user-id": f"user-{i}"}) for i in range(90)]
        if kind == "consistent_hash":
            assert picks == [served_by(client, headers={"x-user-id": f"user-{i}"}) for i in range(90)]
    got = collections.Counter(picks)
    assert set(got) == set(NAMES)
    assert min(got.values()) >= 10, got
    # The upstreams saw exactly what the gateway reports.
    assert {name: upstreams[name].requests("echo") for name in NAMES} == {
        name: got[name] * (2 if kind == "consistent_hash" else 1) for name in NAMES
    }


def test_random_ignores_weights_and_weighted_random_follows_them(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    servers = equal(upstreams, 1, 1, 4)
    uniform = gateway_factory(gateway_config(servers, "random"))
    weighted = gateway_factory(gateway_config(servers, "weighted_random"))
    n = 300
    with httpx.Client(base_url=uniform, timeout=10) as client:
        got_uniform = collections.Counter(served_by(client) for _ in range(n))
    with httpx.Client(base_url=weighted, timeout=10) as client:
        got_weighted = collections.Counter(served_by(client) for _ in range(n))
    # Expected 100 each (binomial sd 8.2), and 50 / 50 / 200 (sd 6.5, 6.5, 8.2): bounds at > 5 sd.
    assert all(55 < got_uniform[name] < 145 for name in NAMES), got_uniform
    assert all(15 < got_weighted[name] < 90 for name in ("u1", "u2")), got_weighted
    assert 155 < got_weighted["u3"] < 245, got_weighted


@pytest.mark.anyio
async def test_least_connections_avoids_a_slow_server(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    # u1 is paused (SIGSTOP): it accepts connections but answers nothing until continued, so the
    # requests it gets stay in flight and least connections sends it at most a couple of them
    # while u2 and u3 serve the rest.
    slow = upstreams.u1
    base = gateway_factory(gateway_config(equal(upstreams), "least_connections"))
    statuses: list[int] = []
    served: collections.Counter[str] = collections.Counter()
    todo = iter(range(180))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in todo:
            response = await client.get("/api/echo", params={"i": str(i)})
            statuses.append(response.status_code)
            served[response.headers.get("x-upstream-name", "")] += 1

    async def in_flight_on_slow(client: httpx.AsyncClient) -> int:
        status = (await client.get(STATUS)).json()["upstreams"]["svc"]["servers"]
        return int(next(s["in_flight"] for s in status if s["url"] == slow.url))

    slow.stop()
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as workers:
                    for _ in range(6):
                        workers.start_soon(worker, client)
                    # The queue drains through the workers that are not waiting on u1.
                    while len(statuses) + await in_flight_on_slow(client) < 180:
                        await anyio.sleep(0.01)
                    waiting = await in_flight_on_slow(client)
                    # While u1 holds requests in flight and the others hold none, it gets nothing.
                    for _ in range(30):
                        response = await client.get("/api/echo")
                        assert response.headers["x-upstream-name"] in ("u2", "u3")
                    assert await in_flight_on_slow(client) == waiting
                    workers.cancel_scope.cancel()
            assert 1 <= waiting <= 3, waiting
            assert statuses == [200] * len(statuses)
            assert len(statuses) == 180 - waiting
            assert served["u1"] == 0 and served["u2"] > 30 and served["u3"] > 30, served
            # Once u1 answers, the gateway lets go of its requests.
            slow.cont()
            with anyio.fail_after(10):
                while await in_flight_on_slow(client):
                    await anyio.sleep(0.01)
    finally:
        slow.cont()
    assert await anyio.to_thread.run_sync(slow.requests) == waiting


def test_consistent_hash_keys_move_only_off_a_down_server_and_return(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    check = {
        "path": "/healthz",
        "interval": 0.05,
        "timeout": 1.0,
        "healthy_threshold": 1,
        "unhealthy_threshold": 1,
    }
    base = gateway_factory(gateway_config(equal(upstreams), "consistent_hash", "header:X-User-Id", check))
    users = [f"user-{i}" for i in range(120)]
    with httpx.Client(base_url=base, timeout=10) as client:

        def mapping() -> dict[str, str]:
            return {user: served_by(client, headers={"x-user-id": user}) for user in users}

        before = mapping()
        assert set(before.values()) == set(NAMES)
        upstreams.u2.set_healthy(False)
        wait_until(lambda: available(client) == 2, message="u2 to be marked down")
        during = mapping()
        for user in users:
            if before[user] == "u2":
                assert during[user] in ("u1", "u3")
            else:
                assert during[user] == before[user], user
        upstreams.u2.set_healthy(True)
        wait_until(lambda: available(client) == 3, message="u2 to be back")
        assert mapping() == before


def test_consistent_hash_on_cookie_path_and_client_ip(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    by_cookie = gateway_factory(gateway_config(equal(upstreams), "consistent_hash", "cookie:session"))
    with httpx.Client(base_url=by_cookie, timeout=10) as client:
        # No session cookie: round robin.
        assert [served_by(client) for _ in range(6)] == ["u1", "u2", "u3"] * 2
        sessions = {i: served_by(client, headers={"cookie": f"theme=dark; session=s{i}"}) for i in range(60)}
        assert set(sessions.values()) == set(NAMES)
        assert all(served_by(client, headers={"cookie": f"session=s{i}"}) == sessions[i] for i in range(60))
    by_path = gateway_factory(gateway_config(equal(upstreams), "consistent_hash", "path"))
    with httpx.Client(base_url=by_path, timeout=10) as client:
        paths = {i: served_by(client, f"/api/items/{i}") for i in range(60)}
        assert set(paths.values()) == set(NAMES)
        assert all(served_by(client, f"/api/items/{i}") == paths[i] for i in range(60))
    by_ip = gateway_factory(gateway_config(equal(upstreams), "consistent_hash", "client_ip"))
    with httpx.Client(base_url=by_ip, timeout=10) as client:
        # Every request comes from 127.0.0.1: one server for all.
        assert len({served_by(client, f"/api/items/{i}") for i in range(20)}) == 1


@pytest.mark.anyio
async def test_peak_ewma_moves_traffic_off_a_slow_server_and_back_when_it_recovers(
    upstreams: Upstreams, gateway_factory: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The decay shortened from 10 s to 0.5 s, so that a slow server is tried again (and found
    # fast) within a second or two rather than tens of seconds.
    monkeypatch.setattr(peak_ewma, "PEAK_EWMA_DECAY", 0.5)
    slow = upstreams.u1
    base = gateway_factory(gateway_config(equal(upstreams), "peak_ewma"))
    served: list[str] = []
    phase = {"name": "warm-up"}
    by_phase: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

    async def worker(client: httpx.AsyncClient) -> None:
        for _ in range(5000):
            response = await client.get("/api/echo")
            assert response.status_code == 200, response.text
            name = response.headers["x-upstream-name"]
            served.append(name)
            by_phase[phase["name"]][name] += 1

    async def wait_for(predicate: Callable[[], bool], seconds: float, what: str) -> None:
        with anyio.move_on_after(seconds):
            while not predicate():
                await anyio.sleep(0.01)
            return
        raise AssertionError(f"timed out after {seconds}s waiting for {what}: {dict(by_phase)}")

    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as workers:
                    # Two at a time: too few in flight for least_connections to see the slow server.
                    for _ in range(2):
                        workers.start_soon(worker, client)
                    await wait_for(lambda: len(served) >= 150, 20, "warm-up traffic")
                    assert all(by_phase["warm-up"][name] for name in NAMES), by_phase["warm-up"]
                    # u1 turns slow without failing: 50 ms before each answer, many times the others even on a
                    # loaded machine (coverage on, two cores shared with the upstreams and the client).
                    await anyio.to_thread.run_sync(lambda: slow.admin("delay", seconds=0.05))
                    phase["name"] = "switching"
                    # Once a slow answer has come back ...
                    await wait_for(lambda: by_phase["switching"]["u1"] >= 1, 10, "a slow answer")
                    phase["name"] = "slow"
                    start = len(served)
                    await wait_for(lambda: len(served) - start >= 600, 20, "traffic while u1 is slow")
                    # ... u1 gets a probe now and then; round robin would give it 200 of these 600,
                    # least_connections about 40.
                    slow_share = by_phase["slow"]
                    assert slow_share["u1"] <= 15, slow_share
                    assert slow_share["u2"] + slow_share["u3"] >= 585, slow_share
                    # u1 recovers: once a probe finds it fast again, its share comes back.
                    await anyio.to_thread.run_sync(lambda: slow.admin("delay", seconds=0))
                    phase["name"] = "recovered"

                    def u1_is_back() -> bool:
                        return served[-150:].count("u1") >= 20

                    await wait_for(u1_is_back, 15, "u1's share to come back")
                    workers.cancel_scope.cancel()
    finally:
        await anyio.to_thread.run_sync(lambda: slow.admin("delay", seconds=0))
