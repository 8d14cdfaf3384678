"""Active health checks: thresholds, timeouts and errors in-process; then against a real uvicorn upstream."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from servers import UpstreamProcess

from asgi_gateway._config import HealthCheckConfig, ServerConfig, UpstreamConfig
from asgi_gateway._exceptions import ConnectError
from asgi_gateway._health import BODY_LIMIT, HealthChecker
from asgi_gateway._layers.balancer import make_balancer
from asgi_gateway._layers.failover import FailoverLayer
from asgi_gateway._stack import make_servers
from asgi_gateway._transports.httpx import HttpxTransport
from asgi_gateway._types import GatewayEvents, Handler, Request, Response, Server


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


pytestmark = pytest.mark.anyio


class Stream:
    def __init__(
        self, chunks: list[bytes] | None = None, *, endless: bool = False, hang: bool = False
    ) -> None:
        self.chunks = chunks if chunks is not None else [b"ok"]
        self.endless = endless
        self.hang = hang
        self.read = 0
        self.closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.read += len(chunk)
            yield chunk
        while self.endless:
            self.read += 4096
            yield b"x" * 4096
        if self.hang:
            await anyio.sleep_forever()

    async def aclose(self) -> None:
        self.closed = True


Result = int | BaseException | Callable[[Request], Any]


class ScriptedTransport(Handler):
    """Answers each server's checks from a script (status, exception or async callable); 200 when empty."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[Result]] = {}
        self.default: dict[str, Result] = {}
        self.requests: list[Request] = []
        self.streams: list[Stream] = []

    async def handle_request(self, request: Request) -> Response:
        assert request.server is not None
        self.requests.append(request)
        url = request.server.url
        script = self.scripts.get(url)
        what = script.pop(0) if script else self.default.get(url, 200)
        if isinstance(what, BaseException):
            raise what
        if callable(what):
            response: Response = await what(request)
            return response
        stream = Stream()
        self.streams.append(stream)
        return Response(status=what, headers=[], stream=stream)


class Events(GatewayEvents):
    def __init__(self) -> None:
        self.changes: list[tuple[str, bool]] = []

    def health_changed(self, server: Server, healthy: bool) -> None:
        self.changes.append((server.url, healthy))


def make_upstream(urls: list[str], **check: Any) -> UpstreamConfig:
    options: dict[str, Any] = {
        "interval": 0.05,
        "timeout": 0.5,
        "healthy_threshold": 2,
        "unhealthy_threshold": 2,
    }
    options.update(check)
    return UpstreamConfig(
        name="users",
        servers=tuple(ServerConfig(url=url) for url in urls),
        health_check=HealthCheckConfig(**options),
    )


class Harness:
    def __init__(self, servers: int = 1, **check: Any) -> None:
        self.upstream = make_upstream([f"http://127.0.0.1:{9001 + i}" for i in range(servers)], **check)
        self.servers = make_servers(self.upstream)
        self.transport = ScriptedTransport()
        self.events = Events()
        self.changed = 0
        self.checker = HealthChecker(self.upstream, self.servers, self.transport, self.on_change, self.events)

    def on_change(self) -> None:
        self.changed += 1

    async def rounds(self, results: list[Result], server: int = 0) -> list[bool]:
        """Run one round per result; the server's health after each."""
        url = self.servers[server].url
        self.transport.scripts[url] = list(results)
        states = []
        for _ in results:
            await self.checker.check_once()
            states.append(self.servers[server].healthy)
        return states


async def test_check_request() -> None:
    h = Harness(path="/ready", timeout=0.75)
    await h.checker.check_once()
    [request] = h.transport.requests
    assert request.method == "GET"
    assert request.target == b"/ready"
    assert request.headers == [(b"user-agent", b"asgi-gateway-health/1")]
    assert request.host is None
    assert request.body.empty and request.body.length == 0
    assert request.server is h.servers[0]
    assert request.exchange.server is h.servers[0]
    assert request.connect_timeout == request.read_timeout == 0.75
    assert h.transport.streams[0].closed


async def test_servers_start_healthy_and_thresholds_hold_flapping() -> None:
    h = Harness(healthy_threshold=3, unhealthy_threshold=2)
    assert h.servers[0].healthy
    # One failure between passes never takes it down.
    assert await h.rounds([503, 200, 503, 200, 503]) == [True] * 5
    assert h.changed == 0
    assert await h.rounds([503]) == [False]
    assert h.changed == 1
    assert h.events.changes == [(h.servers[0].url, False)]
    # Passes broken by a failure do not bring it back; three in a row do.
    assert await h.rounds([200, 200, 503, 200, 200, 200]) == [False] * 5 + [True]
    assert h.changed == 2
    assert h.events.changes[-1] == (h.servers[0].url, True)


@pytest.mark.parametrize(
    ("status", "healthy"), [(200, True), (204, True), (302, True), (404, False), (500, False)]
)
async def test_status_classes(status: int, healthy: bool) -> None:
    h = Harness(unhealthy_threshold=1, healthy_threshold=1)
    assert await h.rounds([status]) == [healthy]


async def test_transport_errors_fail() -> None:
    h = Harness(unhealthy_threshold=1)
    assert await h.rounds([ConnectError("refused")]) == [False]
    assert h.checker._probes[0].last == "connect-failure"


async def test_timeout_fails_and_bounds_the_round() -> None:
    h = Harness(servers=3, unhealthy_threshold=1, timeout=0.2)

    async def hang(request: Request) -> Response:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    stream = Stream(hang=True)

    async def hang_mid_body(request: Request) -> Response:
        return Response(status=200, headers=[], stream=stream)

    h.transport.default = {h.servers[0].url: hang, h.servers[1].url: hang_mid_body, h.servers[2].url: hang}
    started = anyio.current_time()
    await h.checker.check_once()
    elapsed = anyio.current_time() - started
    # All three at once: one timeout long, not three.
    assert 0.19 <= elapsed < 0.55
    assert [s.healthy for s in h.servers] == [False, False, False]
    assert [p.last for p in h.checker._probes] == ["timeout"] * 3
    assert stream.closed


async def test_body_is_read_bounded_and_closed() -> None:
    h = Harness()
    stream = Stream(endless=True)

    async def endless(request: Request) -> Response:
        return Response(status=200, headers=[], stream=stream)

    h.transport.default[h.servers[0].url] = endless
    await h.checker.check_once()
    assert BODY_LIMIT <= stream.read < BODY_LIMIT + 8192
    assert stream.closed
    assert h.servers[0].healthy


async def test_unexpected_errors_count_and_never_stop_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(unhealthy_threshold=2, interval=0.02)
    h.transport.default[h.servers[0].url] = RuntimeError("a bug in a transport")
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.checker.run)
        with anyio.fail_after(5):
            while len(h.transport.requests) < 4:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert not h.servers[0].healthy
    assert h.changed == 1
    errors = [r for r in caplog.records if r.name == "asgi_gateway.health" and r.exc_info]
    assert errors and errors[0].__dict__["server"] == h.servers[0].url


async def test_on_change_errors_do_not_stop_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(unhealthy_threshold=1, healthy_threshold=1, interval=0.02)

    def broken() -> None:
        raise ValueError("listener bug")

    h.checker._on_change = broken
    h.transport.scripts[h.servers[0].url] = [503]
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.checker.run)
        with anyio.fail_after(5):
            while len(h.transport.requests) < 3:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert h.servers[0].healthy  # down, then up again on the next passing round
    assert any("recording the health" in r.getMessage() for r in caplog.records)


async def test_run_checks_every_interval_until_cancelled() -> None:
    h = Harness(servers=2, interval=0.1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.checker.run)
        await anyio.sleep(0.55)
        tg.cancel_scope.cancel()
    # Rounds at 0, ~0.1, ... ~0.5 (±10% jitter each): 5 or 6 rounds of 2 checks.
    assert 6 <= len(h.transport.requests) <= 14
    count = len(h.transport.requests)
    await anyio.sleep(0.2)
    assert len(h.transport.requests) == count


async def test_run_without_health_check_returns() -> None:
    upstream = UpstreamConfig(name="users", servers=(ServerConfig(url="http://127.0.0.1:9001"),))
    checker = HealthChecker(upstream, make_servers(upstream), ScriptedTransport(), lambda: None)
    with anyio.fail_after(1):
        await checker.run()


async def test_transitions_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asgi_gateway.health")
    h = Harness(unhealthy_threshold=1, healthy_threshold=1)
    await h.rounds([503, 200])
    down, up = [r for r in caplog.records if r.name == "asgi_gateway.health"]
    assert down.levelno == logging.WARNING
    assert up.levelno == logging.INFO
    assert down.__dict__["upstream"] == "users"
    assert down.__dict__["server"] == h.servers[0].url
    assert down.__dict__["reason"] == "status 503"
    assert up.__dict__["reason"] == "passed"


# -- a real upstream ----------------------------------------------------------------------


async def wait_for(predicate: Callable[[], bool], timeout: float, message: str) -> float:
    """Poll until `predicate()`; return how long it took."""
    started = anyio.current_time()
    while not predicate():
        if anyio.current_time() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await anyio.sleep(0.01)
    return anyio.current_time() - started


async def test_real_upstream_down_and_up(upstream_factory: Callable[..., UpstreamProcess]) -> None:
    upstream = upstream_factory("checked")
    config = make_upstream(
        [upstream.url], interval=0.1, timeout=0.5, healthy_threshold=2, unhealthy_threshold=2
    )
    servers = make_servers(config)
    server = servers[0]
    balancer = make_balancer(config)

    class Nowhere(Handler):
        async def handle_request(self, request: Request) -> Response:
            raise AssertionError("no requests in this test")

    layer = FailoverLayer(config, servers, balancer, Nowhere())
    async with httpx.AsyncClient() as client:
        checker = HealthChecker(config, servers, HttpxTransport(client), layer.refresh)
        async with anyio.create_task_group() as tg:
            tg.start_soon(checker.run)
            # /healthz answering 503: down after two rounds.
            upstream.set_healthy(False)
            await wait_for(lambda: not server.healthy, 3, "down on 503")
            assert layer.status()["available"] == 0
            upstream.set_healthy(True)
            took = await wait_for(lambda: server.healthy, 3, "up again")
            assert took < 0.1 * 1.1 * 2 + 0.5
            assert layer.status()["available"] == 1
            # The process killed: connection refused, down again; restarted: up again.
            await anyio.to_thread.run_sync(upstream.kill)
            await wait_for(lambda: not server.healthy, 3, "down when killed")
            assert checker._probes[0].last == "connect-failure"
            await anyio.to_thread.run_sync(upstream.restart)
            await wait_for(lambda: server.healthy, 3, "up after restart")
            # A stopped process (SIGSTOP) accepts but never answers: the timeout marks it down.
            upstream.stop()
            try:
                await wait_for(lambda: not server.healthy, 3, "down when hung")
                assert checker._probes[0].last == "timeout"
            finally:
                upstream.cont()
            tg.cancel_scope.cancel()
    assert upstream.stats()["requests"].get("healthz", 0) > 0
