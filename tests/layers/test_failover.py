"""The failover layer in-process: a fake inner handler, a fake clock, a stand-in balancer."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import replace
from typing import Any

import anyio
import pytest

from asgi_gateway._config import HealthCheckConfig, OutlierDetectionConfig, ServerConfig, UpstreamConfig
from asgi_gateway._exceptions import (
    ConnectError,
    ConnectionReset,
    ConnectTimeout,
    InvalidResponse,
    NoServerAvailable,
    PoolTimeout,
    ReadTimeout,
    TotalTimeout,
    error_response,
)
from asgi_gateway._layers.balancer import Balancer, make_balancer
from asgi_gateway._layers.failover import FailoverLayer
from asgi_gateway._types import Exchange, GatewayEvents, Handler, Request, RequestBody, Response, Server


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class StubBalancer(Balancer):
    """Round robin over the set it was given, preferring servers not in `exclude`."""

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.sets = 0
        self.position = 0

    def set_servers(self, servers: Sequence[Server]) -> None:
        self.servers = list(servers)
        self.sets += 1

    def pick(self, request: Request, exclude: Collection[Server] = ()) -> Server | None:
        if not self.servers:
            return None
        for offset in range(len(self.servers)):
            server = self.servers[(self.position + offset) % len(self.servers)]
            if server not in exclude:
                self.position += offset + 1
                return server
        server = self.servers[self.position % len(self.servers)]
        self.position += 1
        return server


class Stream:
    def __init__(self, chunks: list[bytes] | None = None, error: BaseException | None = None) -> None:
        self.chunks = chunks or [b"ok"]
        self.error = error
        self.closed = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error

    async def aclose(self) -> None:
        self.closed += 1


Behaviour = int | BaseException | Callable[[Request], Any]


class FakeInner(Handler):
    """Answers per server: a status, an exception to raise, or an async callable."""

    def __init__(self) -> None:
        self.behaviour: dict[str, Behaviour] = {}
        self.calls: list[Server] = []

    async def handle_request(self, request: Request) -> Response:
        assert request.server is not None
        self.calls.append(request.server)
        what = self.behaviour.get(request.server.url, 200)
        if isinstance(what, BaseException):
            raise what
        if callable(what):
            result: Response = await what(request)
            return result
        return Response(status=what, headers=[], stream=Stream())


class Events(GatewayEvents):
    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def ejected(self, server: Server, duration: float, exchange: Exchange | None) -> None:
        self.log.append(("ejected", server.url, duration, exchange))

    def readmitted(self, server: Server) -> None:
        self.log.append(("readmitted", server.url))

    def failover(self, exchange: Exchange, group: str) -> None:
        self.log.append(("failover", group))

    def available_changed(self, upstream: str, available: int) -> None:
        self.log.append(("available", upstream, available))

    def named(self, kind: str) -> list[tuple[Any, ...]]:
        return [entry for entry in self.log if entry[0] == kind]


def make_servers(primaries: int, backups: int = 0) -> list[Server]:
    servers = []
    for i in range(primaries + backups):
        port = 9001 + i
        servers.append(
            Server(
                url=f"http://127.0.0.1:{port}",
                scheme="http",
                host="127.0.0.1",
                port=port,
                backup=i >= primaries,
                index=i,
                upstream="users",
                host_header=f"127.0.0.1:{port}".encode(),
            )
        )
    return servers


def make_upstream(
    servers: list[Server],
    *,
    consecutive_failures: int = 3,
    base: float = 10.0,
    maximum: float = 100.0,
    percent: float = 100,
    **kwargs: Any,
) -> UpstreamConfig:
    return UpstreamConfig(
        name="users",
        servers=tuple(ServerConfig(url=s.url, backup=s.backup) for s in servers),
        outlier_detection=OutlierDetectionConfig(
            consecutive_failures=consecutive_failures,
            base_ejection_time=base,
            max_ejection_time=maximum,
            max_ejection_percent=percent,
        ),
        **kwargs,
    )


class Harness:
    def __init__(self, primaries: int = 2, backups: int = 0, **config: Any) -> None:
        self.servers = make_servers(primaries, backups)
        self.upstream = make_upstream(self.servers, **config)
        self.clock = Clock()
        self.balancer = StubBalancer()
        self.backup_balancer = StubBalancer()
        self.inner = FakeInner()
        self.events = Events()
        self.layer = FailoverLayer(
            self.upstream,
            self.servers,
            self.balancer,
            self.inner,
            self.events,
            self.clock,
            backup_balancer=self.backup_balancer,
        )

    def request(self, tried: list[Server] | None = None) -> Request:
        exchange = Exchange(
            request_id="r1",
            route="/api",
            upstream=self.upstream,
            client_ip="127.0.0.1",
            path="/",
            scheme="http",
        )
        exchange.tried = list(tried or [])
        exchange.attempts = len(exchange.tried) + 1
        return Request(method="GET", target=b"/", headers=[], body=RequestBody([], 0), exchange=exchange)

    async def send(self, tried: list[Server] | None = None) -> tuple[Server, int]:
        """One attempt; the response body is read and closed. Returns (server, status)."""
        request = self.request(tried)
        response = await self.layer.handle_request(request)
        assert request.server is response.server
        assert request.exchange.server is request.server
        assert request.exchange.tried[-1] is request.server
        error: BaseException | None = None
        try:
            async for _ in response.stream:
                pass
        except BaseException as exc:
            error = exc
        await response.aclose(error)
        return request.server, response.status

    async def fail(self, server: Server, times: int, status: int = 503) -> None:
        self.inner.behaviour[server.url] = status
        for _ in range(times):
            request = self.request()
            # Route the attempt to `server` by letting the balancer see only it (once any due
            # readmission has rebuilt the balancer's set).
            self.layer.refresh()
            saved = self.balancer.servers
            self.balancer.servers = [server]
            try:
                response = await self.layer.handle_request(request)
            finally:
                if self.balancer.servers == [server]:
                    self.balancer.servers = saved
            await response.aclose()


async def test_picks_and_sets_the_attempt_server() -> None:
    h = Harness(primaries=2)
    seen = {(await h.send())[0].url for _ in range(4)}
    assert seen == {h.servers[0].url, h.servers[1].url}
    assert all(server.in_flight == 0 for server in h.servers)


async def test_ejects_after_consecutive_failures_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(primaries=3, consecutive_failures=3, base=10.0)
    bad = h.servers[0]
    caplog.set_level(logging.INFO, logger="asgi_gateway.health")
    await h.fail(bad, 2)
    assert bad.consecutive_failures == 2
    assert bad not in h.layer._ejected
    await h.fail(bad, 1)
    assert bad.ejected_until == h.clock.now + 10.0
    [ejected] = h.events.named("ejected")
    assert ejected[1:3] == (bad.url, 10.0)
    assert ejected[3] is not None  # the exchange that caused it
    assert h.events.named("available")[-1] == ("available", "users", 2)
    # No pick goes to it while ejected.
    picks = {(await h.send())[0] for _ in range(10)}
    assert bad not in picks
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING and "ejected" in r.getMessage()]
    assert record.__dict__["upstream"] == "users"
    assert record.__dict__["server"] == bad.url
    assert record.__dict__["reason"] == "503"


async def test_success_resets_the_count() -> None:
    h = Harness(primaries=2, consecutive_failures=3)
    bad = h.servers[0]
    await h.fail(bad, 2)
    h.inner.behaviour[bad.url] = 200
    h.balancer.servers = [bad]
    await h.send()
    assert bad.consecutive_failures == 0
    await h.fail(bad, 2)
    assert bad not in h.layer._ejected


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (ConnectError("refused"), True),
        (ConnectTimeout("slow connect"), True),
        (ConnectionReset("reset"), True),
        (InvalidResponse("garbage"), True),
        (ReadTimeout("slow"), True),
        (TotalTimeout("deadline"), False),
        # The gateway's own pool being full says nothing about the server.
        (PoolTimeout("pool full"), False),
        (RuntimeError("bug"), False),
    ],
)
async def test_which_errors_count(error: BaseException, counts: bool) -> None:
    h = Harness(primaries=2, consecutive_failures=2)
    bad = h.servers[0]
    h.inner.behaviour[bad.url] = error
    h.balancer.servers = [bad]
    for _ in range(2):
        with pytest.raises(type(error)):
            await h.layer.handle_request(h.request())
        assert bad.in_flight == 0
    assert (bad in h.layer._ejected) is counts


@pytest.mark.parametrize("status", [500, 501, 404, 429])
async def test_other_statuses_are_success(status: int) -> None:
    h = Harness(primaries=2, consecutive_failures=1)
    await h.fail(h.servers[0], 3, status=status)
    assert not h.layer._ejected


async def test_body_errors_count_but_client_disconnects_do_not() -> None:
    h = Harness(primaries=2, consecutive_failures=2)
    bad = h.servers[0]

    async def broken_body(request: Request) -> Response:
        return Response(status=200, headers=[], stream=Stream([b"x"], error=ConnectionReset("mid-body")))

    h.inner.behaviour[bad.url] = broken_body
    h.balancer.servers = [bad]
    for _ in range(3):
        response = await h.layer.handle_request(h.request())
        # The client went away: says nothing about the server.
        await response.aclose(OSError("client disconnected"))
    assert bad.consecutive_failures == 0
    for _ in range(2):
        h.balancer.servers = [bad]
        assert (await h.send())[0] is bad
    assert bad in h.layer._ejected
    assert h.layer.status()["servers"][0]["last_failure"] == "body reset"


async def test_ejection_doubles_and_is_capped() -> None:
    h = Harness(primaries=4, consecutive_failures=1, base=10.0, maximum=35.0)
    bad = h.servers[0]
    durations = []
    for _ in range(4):
        await h.fail(bad, 1)
        durations.append(bad.ejected_until - h.clock.now)
        h.clock.advance(durations[-1])  # just back, no healthy time to decay
        await h.send()  # a pick readmits it
        assert bad not in h.layer._ejected
    assert durations == [10.0, 20.0, 35.0, 35.0]
    assert bad.ejections == 4


async def test_ejection_multiplier_decays_while_healthy() -> None:
    h = Harness(primaries=4, consecutive_failures=1, base=10.0, maximum=1000.0)
    bad = h.servers[0]
    for _ in range(3):
        await h.fail(bad, 1)
        h.clock.advance(bad.ejected_until - h.clock.now)
    assert bad.ejections == 3
    # Two base times back in service take two doublings off: the next ejection is 2x base, not 8x.
    h.clock.advance(25.0)
    await h.fail(bad, 1)
    assert bad.ejected_until - h.clock.now == 20.0
    h.clock.advance(20.0 + 1000.0)
    await h.fail(bad, 1)
    assert bad.ejected_until - h.clock.now == 10.0


async def test_readmission_after_the_ejection_time(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asgi_gateway.health")
    h = Harness(primaries=2, consecutive_failures=1, base=10.0)
    bad = h.servers[0]
    await h.fail(bad, 1)
    h.inner.behaviour[bad.url] = 200
    h.clock.advance(9.9)
    assert bad not in {(await h.send())[0] for _ in range(4)}
    assert not h.events.named("readmitted")
    h.clock.advance(0.1)
    assert bad in {(await h.send())[0] for _ in range(4)}
    assert h.events.named("readmitted") == [("readmitted", bad.url)]
    assert h.events.named("available")[-1] == ("available", "users", 2)
    infos = [r for r in caplog.records if r.levelno == logging.INFO and "readmitted" in r.getMessage()]
    assert infos and infos[0].__dict__["server"] == bad.url


async def test_readmission_waits_for_the_active_check() -> None:
    h = Harness(primaries=2, consecutive_failures=1, base=10.0)
    bad = h.servers[0]
    await h.fail(bad, 1)
    bad.healthy = False
    h.layer.refresh()
    h.inner.behaviour[bad.url] = 200
    h.clock.advance(11.0)
    assert bad not in {(await h.send())[0] for _ in range(4)}
    assert h.layer.status()["servers"][0]["state"] == "unhealthy"
    bad.healthy = True
    h.layer.refresh()
    assert bad in {(await h.send())[0] for _ in range(4)}


async def test_max_ejection_percent() -> None:
    h = Harness(primaries=4, consecutive_failures=1, percent=50)
    for server in h.servers:
        await h.fail(server, 1)
    assert len(h.layer._ejected) == 2
    assert h.layer.status()["available"] == 2
    # A third failing server stays in; once one returns, the next failure can eject it.
    third = next(s for s in h.servers if s not in h.layer._ejected)
    assert third.consecutive_failures >= 1
    h.clock.advance(10.0)
    await h.fail(third, 1)
    assert third in h.layer._ejected


@pytest.mark.parametrize(("servers", "percent"), [(1, 50), (3, 10), (2, 0)])
async def test_at_least_one_may_be_ejected(servers: int, percent: float) -> None:
    h = Harness(primaries=servers, consecutive_failures=1, percent=percent)
    for server in h.servers:
        await h.fail(server, 1)
    assert len(h.layer._ejected) == 1


async def test_outlier_detection_off() -> None:
    h = Harness(primaries=2)
    first, second = h.servers
    upstream = replace(h.upstream, outlier_detection=None)
    layer = FailoverLayer(upstream, h.servers, StubBalancer(), h.inner, h.events, h.clock)
    h.inner.behaviour[first.url] = 503
    h.inner.behaviour[second.url] = ConnectError("refused")
    for _ in range(20):
        try:
            response = await layer.handle_request(h.request())
        except ConnectError:
            continue
        await response.aclose()
    assert first.ejected_until == second.ejected_until == 0
    assert not h.events.named("ejected")
    # Failures still show in the status view.
    assert [s["recent_failures"] for s in layer.status()["servers"]] == [10, 10]


async def test_backups_only_when_no_primary_is_available() -> None:
    h = Harness(primaries=2, backups=1)
    backup = h.servers[2]
    assert backup not in {(await h.send())[0] for _ in range(10)}
    assert not h.events.named("failover")
    h.servers[0].healthy = False
    h.layer.refresh()
    assert backup not in {(await h.send())[0] for _ in range(10)}
    h.servers[1].healthy = False
    h.layer.refresh()
    assert {(await h.send())[0] for _ in range(3)} == {backup}
    assert h.events.named("failover") == [("failover", "backup")] * 3
    assert h.layer.status()["mode"] == "backup"
    # Failback: one primary recovers and takes the traffic again at once.
    h.servers[1].healthy = True
    h.layer.refresh()
    assert {(await h.send())[0] for _ in range(3)} == {h.servers[1]}


async def test_backups_after_primaries_ejected() -> None:
    h = Harness(primaries=2, backups=2, consecutive_failures=1, percent=100)
    for primary in h.servers[:2]:
        await h.fail(primary, 1)
    assert {(await h.send())[0] for _ in range(4)} == set(h.servers[2:])


async def test_backup_is_the_last_resort_of_a_retry() -> None:
    h = Harness(primaries=2, backups=1)
    p1, p2, backup = h.servers
    # One primary tried: the retry goes to the other primary.
    server, _ = await h.send(tried=[p1])
    assert server is p2
    assert not h.events.named("failover")
    # Every available primary tried: the backup gets the retry.
    server, _ = await h.send(tried=[p1, p2])
    assert server is backup
    assert h.events.named("failover") == [("failover", "backup")]
    # A tried primary that is unavailable now does not count as one left to try.
    p2.healthy = False
    h.layer.refresh()
    server, _ = await h.send(tried=[p1])
    assert server is backup


async def test_no_last_resort_without_available_backups() -> None:
    h = Harness(primaries=2, backups=1)
    p1, p2, backup = h.servers
    backup.healthy = False
    h.layer.refresh()
    server, _ = await h.send(tried=[p1, p2])
    assert server in (p1, p2)


async def test_panic_sends_to_every_server() -> None:
    h = Harness(primaries=2, backups=1, panic=True)
    for server in h.servers:
        server.healthy = False
    h.layer.refresh()
    assert {(await h.send())[0] for _ in range(6)} == set(h.servers)
    assert h.events.named("failover") == [("failover", "panic")] * 6
    assert h.layer.status()["mode"] == "panic"
    assert h.events.named("available")[-1] == ("available", "users", 0)


async def test_nothing_available_is_a_fast_503_with_retry_after() -> None:
    h = Harness(primaries=2, consecutive_failures=1, base=12.3, percent=100)
    for server in h.servers:
        await h.fail(server, 1)
    h.clock.advance(0.5)
    calls = len(h.inner.calls)
    with pytest.raises(NoServerAvailable) as info:
        await h.layer.handle_request(h.request())
    assert len(h.inner.calls) == calls
    assert info.value.retry_after == 12  # ceil(12.3 - 0.5)
    status, headers, body = error_response(info.value, "r1")
    assert status == 503
    assert (b"retry-after", b"12") in headers
    assert json.loads(body)["error"] == "upstream_unavailable"
    h.clock.advance(11.7)
    with pytest.raises(NoServerAvailable) as info:
        await h.layer.handle_request(h.request())
    assert info.value.retry_after == 1  # 0.1 s left: never less than 1
    h.clock.advance(0.2)
    assert (await h.send())[1] == 503  # back, still answering 503 in this test


async def test_retry_after_with_only_active_checks_to_wait_for() -> None:
    h = Harness(
        primaries=1,
        health_check=HealthCheckConfig(interval=2.0, healthy_threshold=3),
    )
    h.servers[0].healthy = False
    h.layer.refresh()
    with pytest.raises(NoServerAvailable) as info:
        await h.layer.handle_request(h.request())
    assert info.value.retry_after == 6


async def test_in_flight_is_released_once_on_close() -> None:
    h = Harness(primaries=1)
    server = h.servers[0]
    response = await h.layer.handle_request(h.request())
    assert server.in_flight == 1
    await response.aclose()
    await response.aclose()
    assert server.in_flight == 0


async def test_in_flight_is_released_on_exceptions() -> None:
    h = Harness(primaries=1)
    server = h.servers[0]
    h.inner.behaviour[server.url] = ValueError("boom")
    with pytest.raises(ValueError, match="boom"):
        await h.layer.handle_request(h.request())
    assert server.in_flight == 0


async def test_in_flight_is_released_on_cancellation() -> None:
    h = Harness(primaries=1)
    server = h.servers[0]
    started = anyio.Event()

    async def hang(request: Request) -> Response:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    h.inner.behaviour[server.url] = hang
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.layer.handle_request, h.request())
        await started.wait()
        assert server.in_flight == 1
        tg.cancel_scope.cancel()
    assert server.in_flight == 0
    assert server.consecutive_failures == 0


async def test_picks_do_not_rebuild_the_available_set() -> None:
    h = Harness(primaries=3)
    sets = h.balancer.sets
    for _ in range(50):
        await h.send()
    assert h.balancer.sets == sets


async def test_status_is_json() -> None:
    h = Harness(primaries=2, backups=1, consecutive_failures=1, base=30.0)
    await h.fail(h.servers[0], 1)
    h.servers[1].healthy = False
    h.layer.refresh()
    response = await h.layer.handle_request(h.request())  # held open: in flight
    status = json.loads(json.dumps(h.layer.status()))
    await response.aclose()
    assert status["upstream"] == "users"
    assert status["mode"] == "backup"
    assert status["available"] == 1
    first, second, third = status["servers"]
    assert first["state"] == "ejected"
    assert first["ejected_for"] == 30.0
    assert first["ejected_until"].endswith("+00:00")
    assert first["recent_failures"] == 1
    assert first["ejections"] == 1
    assert second["state"] == "unhealthy"
    assert second["ejected_until"] is None
    assert third["backup"] is True
    assert third["in_flight"] == 1
    assert third["state"] == "healthy"
    # Recent failures age out of the window.
    h.clock.advance(61.0)
    assert h.layer.status()["servers"][0]["recent_failures"] == 0


async def test_with_the_real_balancer() -> None:
    servers = make_servers(2, 1)
    upstream = make_upstream(servers, consecutive_failures=1, percent=100)
    inner = FakeInner()
    events = Events()
    clock = Clock()
    # The backup balancer is made here, like the main one, from the upstream's config.
    layer = FailoverLayer(upstream, servers, make_balancer(upstream), inner, events, clock)
    p1, p2, backup = servers

    async def send(tried: list[Server]) -> Server:
        exchange = Exchange(
            request_id="r", route="/", upstream=upstream, client_ip="", path="/", scheme="http", tried=tried
        )
        request = Request(method="GET", target=b"/", headers=[], body=RequestBody([], 0), exchange=exchange)
        response = await layer.handle_request(request)
        await response.aclose()
        assert request.server is not None
        return request.server

    assert {await send([]) for _ in range(4)} == {p1, p2}
    assert await send([p1, p2]) is backup
    inner.behaviour[p1.url] = inner.behaviour[p2.url] = 503
    while len(layer._ejected) < 2:
        await send([])
    assert {await send([]) for _ in range(3)} == {backup}
    inner.behaviour.clear()
    clock.advance(10.0)
    assert {await send([]) for _ in range(4)} == {p1, p2}


# -- changing the server set (discovery) and taking over a previous layer (reload) ---------


def extra_server(port: int, *, backup: bool = False) -> Server:
    return Server(
        url=f"http://127.0.0.1:{port}",
        scheme="http",
        host="127.0.0.1",
        port=port,
        backup=backup,
        upstream="users",
        host_header=f"127.0.0.1:{port}".encode(),
    )


async def test_set_servers_keeps_the_state_of_servers_that_stay() -> None:
    h = Harness(primaries=3, consecutive_failures=2, base=10.0)
    ejected, stays, leaves = h.servers
    await h.fail(ejected, 2)
    await h.fail(stays, 1)
    assert ejected in h.layer._ejected
    until = ejected.ejected_until
    joins = extra_server(9101)

    removed = h.layer.set_servers([ejected, stays, joins])

    assert removed == [leaves]
    assert h.layer.servers == (ejected, stays, joins)
    # Still ejected, with its time and count; the other keeps its run of failures.
    assert ejected in h.layer._ejected and ejected.ejected_until == until and ejected.ejections == 1
    assert stays.consecutive_failures == 1
    assert set(h.balancer.servers) == {stays, joins}
    picks = {(await h.send())[0] for _ in range(6)}
    assert picks == {stays, joins}
    # The ejection still ends when it was due to, and the new server's failures count.
    h.clock.advance(10.0)
    picks = {(await h.send())[0] for _ in range(9)}
    assert picks == {ejected, stays, joins}
    await h.fail(joins, 2)
    assert joins in h.layer._ejected


async def test_set_servers_drains_a_removed_server() -> None:
    h = Harness(primaries=2, consecutive_failures=1)
    leaving, staying = h.servers
    h.balancer.servers = [leaving]
    request = h.request()
    response = await h.layer.handle_request(request)
    assert request.server is leaving and leaving.in_flight == 1

    assert h.layer.set_servers([staying]) == [leaving]

    # No new request goes to it; the one in flight shows as draining until it ends.
    assert {(await h.send())[0] for _ in range(4)} == {staying}
    [draining] = [s for s in h.layer.status()["servers"] if s["state"] == "draining"]
    assert draining["url"] == leaving.url and draining["in_flight"] == 1 and draining["available"] is False
    # Its failure now judges nothing (it is gone) and raises nothing.
    await response.aclose(ConnectionReset("gone"))
    assert leaving.in_flight == 0
    assert [s["url"] for s in h.layer.status()["servers"]] == [staying.url]


async def test_set_servers_with_the_first_backups_makes_a_backup_balancer() -> None:
    servers = make_servers(1)
    upstream = make_upstream(servers)
    layer = FailoverLayer(upstream, servers, StubBalancer(), FakeInner())
    backup = extra_server(9102, backup=True)
    layer.set_servers([*servers, backup])
    servers[0].healthy = False
    layer.refresh()
    assert layer.status()["mode"] == "backup"
    assert layer.status()["available"] == 1


async def test_take_over_carries_ejection_and_history_of_shared_servers() -> None:
    h = Harness(primaries=3, consecutive_failures=2, base=10.0)
    shared_ejected, shared, dropped = h.servers
    await h.fail(shared_ejected, 2)
    await h.fail(shared, 1)
    new_balancer = StubBalancer()
    newcomer = extra_server(9103)
    layer = FailoverLayer(
        h.upstream, [shared_ejected, shared, newcomer], new_balancer, h.inner, clock=h.clock
    )

    assert layer.take_over(h.layer) == [dropped]

    assert shared_ejected in layer._ejected
    assert set(new_balancer.servers) == {shared, newcomer}
    status = {s["url"]: s for s in layer.status()["servers"]}
    assert status[shared_ejected.url]["state"] == "ejected"
    assert status[shared.url]["recent_failures"] == 1 and status[shared.url]["last_failure"] == "503"
    # The previous layer serves on as it was.
    assert shared_ejected in h.layer._ejected and h.layer.servers == (shared_ejected, shared, dropped)
