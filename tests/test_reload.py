"""Live configuration: `gateway.reload()` and the admin endpoints, against real servers.

The gateway runs under uvicorn in a thread of this process (`GatewayServer`), so a test can
look at its objects (servers, pools) while real clients and real upstream processes talk to
it over sockets. Reloads go through `POST {admin.path}/reload`, which re-reads the config
file the gateway was started from, as an operator's would.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from servers import FileGateway, UpstreamProcess, Upstreams, wait_until
from test_websocket import WsUpstream, ask, session_id, ws

from asgi_gateway import ConfigError, Gateway

pytestmark = pytest.mark.anyio

ADMIN = "/-/gateway"


def config(routes: list[dict[str, Any]], upstreams: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"routes": routes, "upstreams": upstreams, "admin": {"path": ADMIN}, **top}


def servers(*processes: UpstreamProcess) -> dict[str, Any]:
    return {
        "servers": [{"url": process.url} for process in processes],
        "retry": {"backoff_base": 0.001, "backoff_max": 0.002},
    }


async def reload(client: httpx.AsyncClient, served: FileGateway, cfg: dict[str, Any]) -> httpx.Response:
    served.write(cfg)
    return await client.post(f"{ADMIN}/reload")


# -- under load --------------------------------------------------------------------------


async def test_twenty_reloads_under_load_lose_no_request(upstreams: Upstreams, served: Any) -> None:
    """Reloads that add and remove servers and routes while clients keep sending requests."""
    u1, u2, u3 = upstreams["u1"], upstreams["u2"], upstreams["u3"]
    pool = [u1, u2, u3]
    # Config k sends /stable to two of the three servers (a different pair each time) and
    # has one route of its own, /v{k}.
    sets = [(pool[k % 3], pool[(k + 1) % 3]) if k % 4 else (pool[k % 3],) for k in range(21)]

    def version(k: int) -> dict[str, Any]:
        return config(
            [
                {"path": "/stable", "upstream": "main"},
                {"path": f"/v{k}", "upstream": "main"},
            ],
            {"main": servers(*sets[k])},
        )

    gw = served(version(0))
    total = 10_000
    reload_every = total // 21
    sent = 0
    failures: list[str] = []
    # (started, server name) of every answered request, and when each reload was in.
    answered: list[tuple[float, str]] = []
    reloaded_at: list[float] = [0.0]
    deadline = time.monotonic() + 120

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < total and time.monotonic() < deadline:
            sent += 1
            started = time.monotonic()
            try:
                response = await client.get("/stable/echo")
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
                continue
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.text[:200]}")
                continue
            answered.append((started, response.headers["x-upstream-name"]))

    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as admin:
        async with anyio.create_task_group() as tg:
            clients = [httpx.AsyncClient(base_url=gw.url, timeout=10) for _ in range(6)]
            for client in clients:
                tg.start_soon(client_loop, client)
            for k in range(1, 21):
                with anyio.fail_after(60):
                    while sent < k * reload_every and time.monotonic() < deadline:
                        await anyio.sleep(0.005)
                response = await reload(admin, gw, version(k))
                assert response.status_code == 200, response.text
                reloaded_at.append(time.monotonic())
                assert response.json()["config"]["version"] == k + 1
                # Every request from now on is routed by config k: its own route answers, the
                # previous one's is gone.
                assert (await admin.get(f"/v{k}/echo")).status_code == 200
                assert (await admin.get(f"/v{k - 1}/echo")).status_code == 404
        for client in clients:
            await client.aclose()

    assert not failures, f"{len(failures)} failed requests, e.g. {failures[:3]}"
    assert sent >= total, f"only {sent} requests within the time bound"
    # A request that started after reload k went to a server of config k or a later one.
    late = 0
    for started, name in answered:
        k = max(i for i, at in enumerate(reloaded_at) if at <= started)
        allowed = {process.name for later in sets[k:] for process in later}
        if name not in allowed:
            late += 1
    assert late == 0, f"{late} requests went to a server removed before they started"


# -- what stays, what goes ---------------------------------------------------------------


async def test_a_server_that_stays_keeps_its_state_and_connections(upstreams: Upstreams, served: Any) -> None:
    u1, u2 = upstreams["u1"], upstreams["u2"]
    cfg = config([{"path": "/", "upstream": "main"}], {"main": servers(u1, u2)})
    gw = served(cfg)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        for _ in range(10):
            assert (await client.get("/echo")).status_code == 200
        before = {server.url: server for server in gw.gateway.stacks["main"].servers}
        kept = before[u1.url]
        connections = gw.pool().connection_count(kept)
        assert connections >= 1
        # (A health verdict kept across a reload: test_reload_interplay.py, with real checks.
        # Set by hand here, without checks, a reload would rightly clear it.)
        # u2 leaves; a route is added.
        cfg2 = config(
            [{"path": "/", "upstream": "main"}, {"path": "/more", "upstream": "main"}],
            {"main": servers(u1)},
        )
        gw.gateway.stacks["main"].failover.refresh()
        response = await reload(client, gw, cfg2)
        assert response.status_code == 200
        (server,) = gw.gateway.stacks["main"].servers
        assert server is kept
        assert gw.pool().connection_count(server) == connections
        answered = {(await client.get("/more/echo")).headers["x-upstream-name"] for _ in range(4)}
        assert answered == {"u1"}
        # No new connection to u1: the pooled ones served the requests after the reload.
        assert gw.pool().connection_count(server) == connections


async def test_a_request_in_flight_finishes_on_its_old_config(upstreams: Upstreams, served: Any) -> None:
    u1, u2 = upstreams["u1"], upstreams["u2"]
    gw = served(config([{"path": "/old", "upstream": "main"}], {"main": servers(u1)}))
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        async with anyio.create_task_group() as tg:
            result: list[httpx.Response] = []

            async def slow() -> None:
                result.append(await client.get("/old/slow", params={"delay": 1.0}))

            tg.start_soon(slow)
            (old_server,) = gw.gateway.stacks["main"].servers
            await anyio.to_thread.run_sync(
                lambda: wait_until(lambda: u1.stats()["in_flight"].get("slow"), 10)
            )
            # The route and its only server go away while the request is on it.
            response = await reload(
                client, gw, config([{"path": "/new", "upstream": "main"}], {"main": servers(u2)})
            )
            assert response.status_code == 200
            assert (await client.get("/old/echo")).status_code == 404
            assert (await client.get("/new/echo")).headers["x-upstream-name"] == "u2"
        assert result[0].status_code == 200
        assert result[0].headers["x-upstream-name"] == "u1"
        # Its connection closed once that last request was done (well before uvicorn's 5 s
        # keep-alive would have closed it), and no other was opened to it.
        await anyio.to_thread.run_sync(
            lambda: wait_until(lambda: gw.pool().connection_count(old_server) == 0, 2)
        )
        assert old_server.retired


async def test_an_ejected_server_stays_ejected_across_a_reload(upstreams: Upstreams, served: Any) -> None:
    u1, u2 = upstreams["u1"], upstreams["u2"]
    upstream = {**servers(u1, u2), "outlier_detection": {"consecutive_failures": 1, "base_ejection_time": 60}}
    gw = served(config([{"path": "/", "upstream": "main"}], {"main": upstream}))
    u2.fail(status=503)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        for _ in range(4):
            assert (await client.get("/echo")).headers["x-upstream-name"] == "u1"
        states = {s["url"]: s["state"] for s in gw.gateway.status()["upstreams"]["main"]["servers"]}
        assert states[u2.url] == "ejected"
        u2.fail_off()
        cfg = config(
            [{"path": "/", "upstream": "main"}, {"path": "/x", "upstream": "main"}], {"main": upstream}
        )
        assert (await reload(client, gw, cfg)).status_code == 200
        states = {s["url"]: s["state"] for s in gw.gateway.status()["upstreams"]["main"]["servers"]}
        assert states[u2.url] == "ejected"
        before = u2.stats()["total"]
        for _ in range(6):
            assert (await client.get("/x/echo")).headers["x-upstream-name"] == "u1"
        assert u2.stats()["total"] == before


# -- invalid configs ---------------------------------------------------------------------


async def test_an_invalid_reload_changes_nothing_and_says_why(upstreams: Upstreams, served: Any) -> None:
    u1 = upstreams["u1"]
    gw = served(config([{"path": "/", "upstream": "main"}], {"main": servers(u1)}))
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        state = gw.gateway._state
        bad = config(
            [{"path": "/", "upstream": "nope"}],
            {"main": {"servers": [{"url": "htp://x"}], "retry": {"attempts": 0}}},
        )
        response = await reload(client, gw, bad)
        assert response.status_code == 422
        body = response.json()
        keys = {error["key"] for error in body["errors"]}
        assert {
            "routes[0].upstream",
            "upstreams.main.servers[0].url",
            "upstreams.main.retry.attempts",
        } <= keys
        assert body["config"]["version"] == 1
        assert "upstreams.main.servers[0].url" in body["config"]["last_error"]
        assert gw.gateway._state is state
        assert (await client.get("/echo")).status_code == 200
        status = (await client.get(f"{ADMIN}/status")).json()
        assert "routes[0].upstream" in status["config"]["last_error"]
        # A file that does not parse at all is one error too, and changes nothing.
        gw.path.write_text("{not json")
        response = await client.post(f"{ADMIN}/reload")
        assert response.status_code == 422
        assert "cannot parse" in response.json()["errors"][0]["message"]
        # The next good reload clears the error.
        good = config([{"path": "/", "upstream": "main"}], {"main": servers(u1)}, forwarded=True)
        response = await reload(client, gw, good)
        assert response.status_code == 200
        assert response.json()["config"]["last_error"] is None
        assert response.json()["config"]["version"] == 2


def test_reload_raises_config_error_naming_every_bad_key(upstreams: Upstreams) -> None:
    u1 = upstreams["u1"]
    gateway = Gateway(config([{"path": "/", "upstream": "main"}], {"main": servers(u1)}))
    state = gateway._state
    with pytest.raises(ConfigError) as caught:
        gateway.reload(
            {"routes": [{"path": "x", "upstream": "main"}], "upstreams": {"main": {"servers": []}}}
        )
    assert {where for where, _ in caught.value.errors} >= {"routes[0].path", "upstreams.main.servers"}
    assert gateway._state is state
    assert gateway.status()["config"]["last_error"] is not None
    with pytest.raises(ConfigError, match="not built from a file"):
        gateway.reload()


def test_status_config_version_digest_and_time(tmp_path: Path, upstreams: Upstreams) -> None:
    u1 = upstreams["u1"]
    path = tmp_path / "gw.json"
    path.write_text(json.dumps(config([{"path": "/", "upstream": "main"}], {"main": servers(u1)})))
    gateway = Gateway(str(path))
    info = gateway.status()["config"]
    assert info["version"] == 1
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["last_error"] is None
    assert info["loaded_at"].endswith("+00:00")
    path.write_text(json.dumps(config([{"path": "/a", "upstream": "main"}], {"main": servers(u1)})))
    gateway.reload()
    info = gateway.status()["config"]
    assert info["version"] == 2
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_reloads_are_counted_by_result(upstreams: Upstreams) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    cfg = config([{"path": "/", "upstream": "main"}], {"main": servers(upstreams["u1"])})
    gateway = Gateway(cfg, meter_provider=provider)
    gateway.reload(cfg)
    gateway.reload(cfg)
    with pytest.raises(ConfigError):
        gateway.reload({"routes": []})
    counts: dict[str, int] = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "gateway.config.reloads":
                    for point in metric.data.data_points:
                        counts[str(point.attributes["result"])] = int(point.value)
    assert counts == {"success": 2, "failure": 1}


# -- WebSocket sessions ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[WsUpstream]:
    upstream = WsUpstream("wr")
    try:
        yield upstream.start()
    finally:
        upstream.close()


async def test_a_websocket_session_survives_five_reloads(ws_upstream: WsUpstream, served: Any) -> None:
    def version(k: int) -> dict[str, Any]:
        return config(
            [{"path": "/ws", "upstream": "ws"}, {"path": f"/v{k}", "upstream": "ws"}],
            {"ws": {"servers": [{"url": ws_upstream.url}]}},
        )

    gw = served(version(0))
    base = "ws" + gw.url[len("http") :]
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        async with ws(f"{base}/ws/echo?id={session_id()}") as connection:
            assert await ask(connection, "before") == "before"
            for k in range(1, 6):
                response = await reload(client, gw, version(k))
                assert response.status_code == 200
                assert await ask(connection, f"after {k}") == f"after {k}"
            assert gw.gateway.status()["config"]["version"] == 6


# -- the admin endpoints -----------------------------------------------------------------


async def test_admin_paths_are_the_gateways_own(upstreams: Upstreams, served: Any) -> None:
    u1 = upstreams["u1"]
    gw = served(config([{"path": "/", "upstream": "main"}], {"main": servers(u1)}))
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        before = u1.stats()["total"]
        assert (await client.get(f"{ADMIN}/nothing-here")).status_code == 404
        assert (await client.get(f"{ADMIN}")).status_code in (200, 404)
        assert (await client.post(f"{ADMIN}/status")).status_code == 405
        ready = await client.get(f"{ADMIN}/ready")
        assert (ready.status_code, ready.content) == (200, b"")
        status = (await client.get(f"{ADMIN}/status")).json()
        assert status["upstreams"]["main"]["servers"][0]["url"] == u1.url
        # The route for "/" would take them all: none reached the upstream.
        assert u1.stats()["total"] == before
        # Not a prefix match on the name: /-/gatewayish is an ordinary path.
        assert (await client.get("/-/gatewayish/echo")).headers["x-upstream-name"] == "u1"
        # Cross-site POSTs are refused, whatever else they carry.
        cross = await client.post(f"{ADMIN}/reload", headers={"sec-fetch-site": "cross-site"})
        assert cross.status_code == 403
        other = await client.post(f"{ADMIN}/reload", headers={"origin": "http://evil.example"})
        assert other.status_code == 403
        same = await client.post(f"{ADMIN}/reload", headers={"origin": gw.url})
        assert same.status_code == 200
        gw.gateway.start_draining()
        assert (await client.get(f"{ADMIN}/ready")).status_code == 503
        assert (await client.get("/echo")).status_code == 200


async def test_admin_token_and_addresses(upstreams: Upstreams, served: Any) -> None:
    u1 = upstreams["u1"]
    cfg = config([{"path": "/", "upstream": "main"}], {"main": servers(u1)})
    cfg["admin"] = {"path": ADMIN, "token": "s3cret"}
    gw = served(cfg)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        assert (await client.get(f"{ADMIN}/status")).status_code == 401
        wrong = await client.get(f"{ADMIN}/status", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"] == "unauthorized"
        right = await client.get(f"{ADMIN}/status", headers={"authorization": "Bearer s3cret"})
        assert right.status_code == 200
        # The probe needs no token.
        assert (await client.get(f"{ADMIN}/ready")).status_code == 200
        # From outside allow_ips: 403, token or not; the probe still answers.
        cfg["admin"] = {"path": ADMIN, "token": "s3cret", "allow_ips": ["10.0.0.0/8"]}
        gw.write(cfg)
        assert (await client.post(f"{ADMIN}/reload")).status_code == 401
        response = await client.post(f"{ADMIN}/reload", headers={"authorization": "Bearer s3cret"})
        assert response.status_code == 200
        refused = await client.get(f"{ADMIN}/status", headers={"authorization": "Bearer s3cret"})
        assert refused.status_code == 403
        assert (await client.get(f"{ADMIN}/ready")).status_code == 200


async def test_memory_rate_limits_keep_their_counts_across_a_reload(
    upstreams: Upstreams, served: Any
) -> None:
    u1 = upstreams["u1"]

    def version(extra: str) -> dict[str, Any]:
        return config(
            [
                {"path": "/limited", "upstream": "main", "rate_limit": {"rate": 1, "per": 60, "burst": 3}},
                {"path": extra, "upstream": "main"},
            ],
            {"main": servers(u1)},
        )

    gw = served(version("/a"))
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        assert [(await client.get("/limited/echo")).status_code for _ in range(3)] == [200] * 3
        assert (await reload(client, gw, version("/b"))).status_code == 200
        assert (await client.get("/limited/echo")).status_code == 429


# -- graceful drain ----------------------------------------------------------------------


async def test_drain_lets_requests_finish_then_closes_websockets_with_1001(
    upstreams: Upstreams, ws_upstream: WsUpstream, served: Any
) -> None:
    u1 = upstreams["u1"]
    gw = served(
        config(
            [{"path": "/ws", "upstream": "ws"}, {"path": "/", "upstream": "main"}],
            {"main": servers(u1), "ws": {"servers": [{"url": ws_upstream.url}]}},
        )
    )
    base = "ws" + gw.url[len("http") :]
    session = session_id()
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        async with ws(f"{base}/ws/echo?id={session}") as connection:
            assert await ask(connection, "hello") == "hello"
            async with anyio.create_task_group() as tg:
                slow: list[httpx.Response] = []

                async def slow_request() -> None:
                    slow.append(await client.get("/slow", params={"delay": 1.0}))

                tg.start_soon(slow_request)
                await anyio.to_thread.run_sync(
                    lambda: wait_until(lambda: u1.stats()["in_flight"].get("slow"), 10)
                )
                drained = await gw.in_gateway(gw.gateway.drain(10))
                # drain returned only once the slow request was done.
                assert slow and slow[0].status_code == 200
            assert drained is True
            assert (await client.get(f"{ADMIN}/ready")).status_code == 503
            from websockets.exceptions import ConnectionClosed

            with pytest.raises(ConnectionClosed):
                with anyio.fail_after(10):
                    await connection.recv()
            assert connection.close_code == 1001
        events = await anyio.to_thread.run_sync(lambda: ws_upstream.events(session))
        closes = [event for event in events if event["kind"] == "disconnect"]
        assert closes and closes[0]["code"] == 1001


async def test_drain_gives_up_on_requests_after_its_timeout(upstreams: Upstreams, served: Any) -> None:
    u1 = upstreams["u1"]
    gw = served(config([{"path": "/", "upstream": "main"}], {"main": servers(u1)}))
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/hang")
            await anyio.to_thread.run_sync(
                lambda: wait_until(lambda: u1.stats()["in_flight"].get("hang"), 10)
            )
            started = time.monotonic()
            assert await gw.in_gateway(gw.gateway.drain(0.3)) is False
            assert time.monotonic() - started < 3
            tg.cancel_scope.cancel()


async def test_a_reload_from_a_loop_callback_starts_the_new_health_checks(
    upstreams: Upstreams, served: Any
) -> None:
    """As a signal handler installed with `loop.add_signal_handler` calls it: outside any task."""
    u1, u2 = upstreams["u1"], upstreams["u2"]
    check = {"path": "/healthz", "interval": 0.1, "timeout": 1.0, "unhealthy_threshold": 1}
    gw = served(config([{"path": "/", "upstream": "main"}], {"main": servers(u1)}))
    u2.set_healthy(False)
    cfg = config([{"path": "/", "upstream": "main"}], {"main": {**servers(u1, u2), "health_check": check}})
    assert gw.loop is not None
    gw.loop.call_soon_threadsafe(gw.gateway.reload, cfg)

    def u2_state() -> str | None:
        for server in gw.gateway.status()["upstreams"]["main"]["servers"]:
            if server["url"] == u2.url:
                return str(server["state"])
        return None

    await anyio.to_thread.run_sync(lambda: wait_until(lambda: u2_state() == "unhealthy", 5))


def test_an_upstream_a_reload_removes_leaves_the_available_servers_gauge(upstreams: Upstreams) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    u1 = upstreams["u1"]
    both = config(
        [{"path": "/a", "upstream": "a"}, {"path": "/b", "upstream": "b"}],
        {"a": servers(u1), "b": servers(u1)},
    )
    gateway = Gateway(both, meter_provider=MeterProvider(metric_readers=[reader]))

    def reported() -> set[str]:
        names: set[str] = set()
        for resource in reader.get_metrics_data().resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "gateway.upstream.available_servers":
                        names |= {
                            str(point.attributes["gateway.upstream"]) for point in metric.data.data_points
                        }
        return names

    assert reported() == {"a", "b"}
    gateway.reload(config([{"path": "/a", "upstream": "a"}], {"a": servers(u1)}))
    assert reported() == {"a"}
