"""A reload against the gateway's other moving parts: what an upstream has learned or holds
(adaptive limit, latency estimates, retry budget, places under `max_concurrent_requests`,
ejections, health verdicts) outlives a reload that keeps the upstream; the background work of
a config swapped in starts whenever the swap happens; drains may overlap.

As in `test_reload.py`: the gateway under uvicorn in a thread, real upstream processes,
reloads through `POST {admin.path}/reload`.
"""

from __future__ import annotations

import gc
import socket
import time
from typing import Any

import anyio
import httpx
import pytest
from servers import HOST, Upstreams, wait_until
from test_reload import config, reload, servers

from asgi_gateway import ConfigError, Gateway

pytestmark = pytest.mark.anyio


def upstream_status(gw: Any, name: str = "main") -> dict[str, Any]:
    status: dict[str, Any] = gw.gateway.status()["upstreams"][name]
    return status


def server_state(gw: Any, url: str, name: str = "main") -> str | None:
    for server in upstream_status(gw, name)["servers"]:
        if server["url"] == url:
            return str(server["state"])
    return None


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    await anyio.to_thread.run_sync(lambda: wait_until(predicate, timeout))


# -- what an upstream holds and has learned --------------------------------------------------


async def test_the_adaptive_limit_and_its_places_outlive_a_reload(upstreams: Upstreams, served: Any) -> None:
    u1 = upstreams["u1"]
    # A limit that ends its measurement after five requests and then stays at two.
    adaptive = {"initial_limit": 2, "min_limit": 1, "max_limit": 2, "min_rtt_samples": 5}

    def version(extra: str, **changes: Any) -> dict[str, Any]:
        upstream = {**servers(u1), "adaptive_concurrency": {**adaptive, **changes}}
        return config(
            [{"path": extra, "upstream": "main"}, {"path": "/", "upstream": "main"}], {"main": upstream}
        )

    gw = served(version("/a"))
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        for _ in range(5):
            assert (await client.get("/echo")).status_code == 200
        learned = upstream_status(gw)["adaptive_concurrency"]
        assert learned["measuring_min_rtt"] is False and learned["limit"] == 2
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(client.get, "/hang")
            await wait_for(lambda: u1.stats()["in_flight"].get("hang") == 2)
            assert (await reload(client, gw, version("/b"))).status_code == 200
            # The two requests from before the reload still hold both places.
            after = upstream_status(gw)["adaptive_concurrency"]
            assert after["measuring_min_rtt"] is False
            assert (after["limit"], after["in_flight"]) == (2, 2)
            refused = await client.get("/echo")
            assert refused.status_code == 503
            assert refused.json()["error"] == "upstream_unavailable"
            tg.cancel_scope.cancel()
        await wait_for(lambda: upstream_status(gw)["adaptive_concurrency"]["in_flight"] == 0)
        # Other settings: another controller, which measures afresh.
        assert (await reload(client, gw, version("/c", buffer=0.5))).status_code == 200
        assert upstream_status(gw)["adaptive_concurrency"]["measuring_min_rtt"] is True


async def test_max_concurrent_requests_counts_the_requests_from_before_a_reload(
    upstreams: Upstreams, served: Any
) -> None:
    u1 = upstreams["u1"]

    def version(extra: str) -> dict[str, Any]:
        upstream = {**servers(u1), "max_concurrent_requests": 1}
        return config(
            [{"path": extra, "upstream": "main"}, {"path": "/", "upstream": "main"}], {"main": upstream}
        )

    gw = served(version("/a"))
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/hang")
            await wait_for(lambda: u1.stats()["in_flight"].get("hang") == 1)
            assert (await reload(client, gw, version("/b"))).status_code == 200
            refused = await client.get("/echo")
            assert refused.status_code == 503
            assert u1.stats()["requests"].get("echo") is None
            tg.cancel_scope.cancel()
        await wait_for(lambda: u1.stats()["in_flight"].get("hang", 0) == 0)
        await wait_for(lambda: gw.gateway.stacks["main"].retry.in_flight == 0)
        assert (await client.get("/echo")).status_code == 200


async def test_the_retry_budget_spent_before_a_reload_stays_spent(upstreams: Upstreams, served: Any) -> None:
    u1 = upstreams["u1"]
    # One retry per ten seconds, whatever the traffic.
    budget = {"attempts": 2, "budget_ratio": 0.0, "budget_min_per_second": 0.1}

    def version(extra: str, **retry: Any) -> dict[str, Any]:
        upstream = servers(u1)
        upstream = {**upstream, "retry": {**upstream["retry"], **budget, **retry}, "outlier_detection": None}
        return config(
            [{"path": extra, "upstream": "main"}, {"path": "/", "upstream": "main"}], {"main": upstream}
        )

    gw = served(version("/a"))
    u1.fail(503)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        assert (await client.get("/echo")).status_code == 503
        assert u1.stats()["total"] == 2  # the budget's one retry
        assert (await reload(client, gw, version("/b"))).status_code == 200
        assert (await client.get("/echo")).status_code == 503
        assert u1.stats()["total"] == 3  # no retry left
        # Another budget: counted from the reload on.
        assert (await reload(client, gw, version("/c", budget_min_per_second=0.2))).status_code == 200
        assert (await client.get("/echo")).status_code == 503
        assert u1.stats()["total"] == 5


async def test_peak_ewma_estimates_outlive_a_reload(upstreams: Upstreams, served: Any) -> None:
    u1, u2 = upstreams["u1"], upstreams["u2"]

    def version(extra: str, balancer: str = "peak_ewma") -> dict[str, Any]:
        upstream = {**servers(u1, u2), "balancer": balancer}
        return config(
            [{"path": extra, "upstream": "main"}, {"path": "/", "upstream": "main"}], {"main": upstream}
        )

    gw = served(version("/a"))
    # Slow enough that no first answer of u1 (a connection to open, lazy set-up) is slower.
    u2.admin("delay", seconds=1.0)

    def slow_hits() -> int:
        return int(u2.stats()["requests"].get("echo", 0))

    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        # Both measured: u2 is tried (not measured yet costs nothing) and then avoided.
        for _ in range(6):
            assert (await client.get("/echo")).status_code == 200
        assert slow_hits() >= 1
        before = slow_hits()
        assert (await reload(client, gw, version("/b"))).status_code == 200
        for _ in range(6):
            assert (await client.get("/echo")).status_code == 200
        # A balancer starting afresh would try the slow server again at once.
        assert slow_hits() == before
        # Another kind of balancer learns nothing from this one.
        assert (await reload(client, gw, version("/c", "least_connections"))).status_code == 200
        assert (await reload(client, gw, version("/d"))).status_code == 200
        for _ in range(2):
            assert (await client.get("/echo")).status_code == 200
        assert slow_hits() == before + 1


# -- verdicts ------------------------------------------------------------------------------


async def test_servers_marked_down_come_back_when_a_reload_drops_the_health_check(
    upstreams: Upstreams, served: Any
) -> None:
    u1, u2 = upstreams["u1"], upstreams["u2"]
    check = {"path": "/healthz", "interval": 0.1, "timeout": 1.0, "unhealthy_threshold": 1}

    def version(**extra: Any) -> dict[str, Any]:
        return config([{"path": "/", "upstream": "main"}], {"main": {**servers(u1, u2), **extra}})

    gw = served(version(health_check=check))
    u2.set_healthy(False)
    await wait_for(lambda: server_state(gw, u2.url) == "unhealthy")
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        # Still checked: the verdict stays (the new checks carry on the run of failures).
        assert (await reload(client, gw, version(health_check={**check, "interval": 0.2}))).status_code == 200
        assert server_state(gw, u2.url) == "unhealthy"
        assert upstream_status(gw)["available"] == 1
        assert (await reload(client, gw, version())).status_code == 200
        # No check is left that could ever bring it back: it must not stay down.
        assert server_state(gw, u2.url) == "healthy"
        assert upstream_status(gw)["available"] == 2


async def test_an_ejection_outlives_a_reload_that_adds_discovery(upstreams: Upstreams, served: Any) -> None:
    u1, u2 = upstreams["u1"], upstreams["u2"]
    outlier = {"consecutive_failures": 1, "base_ejection_time": 60}
    # IP literals: discovery has nothing to look up, the servers stay as configured.
    discovery = {"type": "dns", "interval": 5.0, "nameservers": [f"{HOST}:53"]}

    def version(**extra: Any) -> dict[str, Any]:
        upstream = {**servers(u1, u2), "outlier_detection": outlier, **extra}
        return config([{"path": "/", "upstream": "main"}], {"main": upstream})

    gw = served(version())
    u2.fail(502)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        for _ in range(10):
            await client.get("/echo")
            if server_state(gw, u2.url) == "ejected":
                break
        assert server_state(gw, u2.url) == "ejected"
        assert (await reload(client, gw, version(discovery=discovery))).status_code == 200
        assert server_state(gw, u2.url) == "ejected"
        u2.reset()
        for _ in range(4):
            assert (await client.get("/echo")).headers["x-upstream-name"] == "u1"


# -- background work -----------------------------------------------------------------------


async def test_a_reload_during_the_first_start_starts_the_new_configs_background(
    upstreams: Upstreams,
) -> None:
    """A reload while the first config's DNS lookups are still under way (they hold the
    start-up for up to their timeout): the new config's health checks must still run."""
    u2 = upstreams["u2"]
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind((HOST, 0))
    silent.settimeout(10)
    nameserver = f"{HOST}:{silent.getsockname()[1]}"
    first = config(
        [{"path": "/", "upstream": "users"}],
        {
            "users": {
                "servers": [{"url": "http://users.gateway.test:8000"}],
                "discovery": {"type": "dns", "interval": 5.0, "nameservers": [nameserver]},
            }
        },
    )
    check = {"path": "/healthz", "interval": 0.1, "timeout": 1.0, "unhealthy_threshold": 1}
    second = config([{"path": "/", "upstream": "main"}], {"main": {**servers(u2), "health_check": check}})
    u2.set_healthy(False)
    gateway = Gateway(first)
    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                serving = anyio.Event()

                async def run() -> None:
                    async with gateway.running():
                        serving.set()
                        await anyio.sleep_forever()

                tg.start_soon(run)
                await anyio.to_thread.run_sync(silent.recv, 512)  # the first lookup is out
                gateway.reload(second)
                await serving.wait()
                deadline = time.monotonic() + 5
                while gateway.status()["upstreams"]["main"]["servers"][0]["state"] != "unhealthy":
                    assert time.monotonic() < deadline, "the new config's health check never ran"
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
    finally:
        silent.close()


# -- drain ---------------------------------------------------------------------------------


async def test_two_drains_at_once_both_end_with_the_last_request(upstreams: Upstreams, served: Any) -> None:
    u1 = upstreams["u1"]
    gw = served(config([{"path": "/", "upstream": "main"}], {"main": servers(u1)}))
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        async with anyio.create_task_group() as tg:
            slow: list[httpx.Response] = []

            async def slow_request() -> None:
                slow.append(await client.get("/slow", params={"delay": 0.5}))

            tg.start_soon(slow_request)
            await wait_for(lambda: u1.stats()["in_flight"].get("slow"))
            results: list[bool] = []

            async def drain() -> None:
                results.append(await gw.in_gateway(gw.gateway.drain(30)))

            started = time.monotonic()
            with anyio.fail_after(10):
                async with anyio.create_task_group() as drains:
                    drains.start_soon(drain)
                    drains.start_soon(drain)
            assert results == [True, True]
            assert slow and slow[0].status_code == 200
            # Both ended with the slow request, not at their timeout.
            assert time.monotonic() - started < 10


def test_a_failed_reload_leaves_the_limit_gauge_on_the_limit_serving(upstreams: Upstreams) -> None:
    """A config that fails only once built (a PEM key that does not parse) changes nothing,
    the adaptive limit that the gauge reports included."""
    u1 = upstreams["u1"]
    main = {**servers(u1), "adaptive_concurrency": {}}
    gateway = Gateway(config([{"path": "/", "upstream": "main"}], {"main": main}))
    serving = gateway.stacks["main"].concurrency
    bad_key = {"jwt": {"public_key": "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n"}}
    broken = config(
        [{"path": "/", "upstream": "main", "auth": bad_key}],
        {"main": {**main, "adaptive_concurrency": {"buffer": 0.5}}},
    )
    with pytest.raises(ConfigError):
        gateway.reload(broken)
    gc.collect()
    assert serving is not None
    assert gateway.telemetry.concurrency_limits.get("main") is serving
