"""The adaptive concurrency limit: the gradient controller on a clock of the test's own, then
through a real gateway (GatewayMiddleware under uvicorn) and a real uvicorn upstream."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from servers import HOST, RawConnection, UpstreamProcess, Upstreams, wait_until

from asgi_gateway import ConfigError, load_config
from asgi_gateway._config import AdaptiveConcurrencyConfig
from asgi_gateway._layers.concurrency import GradientController

STATUS = "/-/gateway/status"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def controller(clock: Clock, **keys: Any) -> GradientController:
    config = replace(AdaptiveConcurrencyConfig(), **keys)
    return GradientController(config, "svc", clock=clock, rng=random.Random(7))


def measure(limiter: GradientController, rtt: float) -> None:
    """Answer the minimum-RTT measurement's requests, all in `rtt`."""
    assert limiter.measuring
    for _ in range(100):
        if not limiter.measuring:
            return
        assert limiter.acquire()
        limiter.sample(rtt, limiter.epoch)
        limiter.release()
    raise AssertionError("the measurement did not end")


def window(limiter: GradientController, clock: Clock, rtt: float, *, busy: bool = True) -> int:
    """One sample window: `interval` later, five latencies of `rtt`; the limit after it.

    `busy`: the traffic takes every place the limit has first.
    """
    while busy and limiter.acquire():
        pass
    clock.now += 0.1
    for _ in range(5):
        limiter.sample(rtt, limiter.epoch)
    return limiter.limit


def hold(limiter: GradientController, count: int) -> None:
    for _ in range(count):
        assert limiter.acquire()


# -- the controller --------------------------------------------------------------------


def test_the_minimum_is_measured_first_at_the_floor_then_the_initial_limit_applies() -> None:
    clock = Clock()
    limiter = controller(clock, min_rtt_samples=10)
    assert limiter.limit == 3 and limiter.measuring and limiter.min_rtt is None
    hold(limiter, 3)
    assert not limiter.acquire(), "past the floor while measuring"
    for _ in range(3):
        limiter.release()
    for rtt in [0.010] * 5 + [0.012] * 5:
        assert limiter.acquire()
        limiter.sample(rtt, limiter.epoch)
        limiter.release()
    assert not limiter.measuring
    assert limiter.min_rtt == pytest.approx(0.010)
    assert limiter.limit == 20  # tens, not hundreds
    assert limiter.status()["limit"] == 20


def test_the_limit_grows_while_latency_stays_at_its_minimum() -> None:
    clock = Clock()
    limiter = controller(clock)
    measure(limiter, 0.010)
    limits = [window(limiter, clock, 0.010) for _ in range(6)]
    # gradient 1.25 (the buffer) each window, plus sqrt(limit) headroom: 20 -> 30 -> 43 -> ...
    assert limits[0] == int(20 * 1.25 + (20 * 1.25) ** 0.5)
    assert limits == sorted(limits) and limits[-1] > 100


def test_the_limit_shrinks_under_rising_latency_to_the_floor_and_grows_back() -> None:
    clock = Clock()
    limiter = controller(clock)
    measure(limiter, 0.010)
    for _ in range(3):
        window(limiter, clock, 0.010)
    high = limiter.limit
    # Twice the latency: gradient 1.25 / 2 = 0.625.
    after = window(limiter, clock, 0.020)
    assert after == int(high * 0.625 + (high * 0.625) ** 0.5)
    # Ten times: the gradient is clamped at 0.5, and the limit goes no lower than min_limit.
    limits = [window(limiter, clock, 0.100) for _ in range(12)]
    assert limits[1] < limits[0] and limits[-1] == 3
    back = [window(limiter, clock, 0.010) for _ in range(8)]
    assert back == sorted(back) and back[-1] > high


def test_a_limit_under_half_used_stays_as_it_is() -> None:
    clock = Clock()
    limiter = controller(clock)
    measure(limiter, 0.010)
    hold(limiter, 9)  # under half of 20: neither a quiet spell nor a latency spike moves it
    assert [window(limiter, clock, 0.010, busy=False) for _ in range(4)] == [20] * 4
    assert [window(limiter, clock, 0.500, busy=False) for _ in range(4)] == [20] * 4
    assert limiter.sample_rtt == pytest.approx(0.500)
    hold(limiter, 1)  # half of it
    assert window(limiter, clock, 0.010, busy=False) > 20


def test_floor_and_ceiling() -> None:
    clock = Clock()
    limiter = controller(clock, min_limit=5, initial_limit=10, max_limit=40)
    measure(limiter, 0.010)
    assert max(window(limiter, clock, 0.001) for _ in range(10)) == 40
    assert limiter.in_flight == 40 and not limiter.acquire()
    assert min(window(limiter, clock, 1.0) for _ in range(10)) == 5


def test_a_window_needs_its_interval_and_enough_samples() -> None:
    clock = Clock()
    limiter = controller(clock)
    measure(limiter, 0.010)
    hold(limiter, 20)
    for _ in range(50):  # within the interval: no update however many samples
        limiter.sample(0.100, limiter.epoch)
    assert limiter.limit == 20 and limiter.sample_rtt is None
    clock.now += 1.0
    limiter.sample(0.100, limiter.epoch)
    assert limiter.limit < 20 and limiter.sample_rtt == pytest.approx(0.100)
    level = limiter.limit
    clock.now += 1.0
    for _ in range(4):  # the interval has passed, but four samples say too little
        limiter.sample(0.100, limiter.epoch)
    assert limiter.limit == level
    limiter.sample(0.100, limiter.epoch)
    assert limiter.limit < level


def test_the_minimum_is_measured_again_after_its_jittered_interval() -> None:
    clock = Clock()
    limiter = controller(clock, min_rtt_interval=60.0, jitter=0.5, min_rtt_samples=10)
    measure(limiter, 0.010)
    start = clock.now
    remeasured_at = None
    for _ in range(1000):
        window(limiter, clock, 0.010)
        if limiter.measuring:
            remeasured_at = clock.now
            break
    assert remeasured_at is not None
    expected = 60.0 * (1 + random.Random(7).uniform(0.0, 0.5))
    assert expected - 0.1 <= remeasured_at - start <= expected + 0.2
    assert limiter.limit == 3
    grown = limiter.status()
    assert grown["measuring_min_rtt"] is True
    # The requests started before the measurement ran under the old limit: not counted in it.
    old_epoch = limiter.epoch - 1
    for _ in range(50):
        limiter.sample(0.500, old_epoch)
    assert limiter.measuring
    while limiter.in_flight:
        limiter.release()
    measure(limiter, 0.020)
    assert limiter.min_rtt == pytest.approx(0.020)
    # The limit from before the measurement is back.
    assert limiter.limit > 20


def test_acquire_and_release_count_in_flight() -> None:
    limiter = controller(Clock(), min_limit=2, initial_limit=2, max_limit=2)
    assert limiter.acquire() and limiter.acquire()
    assert not limiter.acquire()
    assert limiter.in_flight == 2
    limiter.release()
    assert limiter.acquire()
    error = limiter.refusal()
    assert error.status == 503 and error.code == "upstream_unavailable"


# -- config --------------------------------------------------------------------------------


def config_with(adaptive: Any) -> dict[str, Any]:
    return {
        "routes": [{"path": "/", "upstream": "api"}],
        "upstreams": {"api": {"servers": ["http://127.0.0.1:9"], "adaptive_concurrency": adaptive}},
    }


def test_an_empty_mapping_turns_it_on_with_its_defaults() -> None:
    assert load_config(config_with({})).upstreams["api"].adaptive_concurrency == AdaptiveConcurrencyConfig()
    assert load_config(config_with(None)).upstreams["api"].adaptive_concurrency is None


@pytest.mark.parametrize(
    ("keys", "where"),
    [
        ({"min_limit": 0}, "min_limit"),
        ({"min_limit": 21}, "min_limit"),
        ({"max_limit": 19}, "max_limit"),
        ({"initial_limit": 2.5}, "initial_limit"),
        ({"interval": 0}, "interval"),
        ({"min_rtt_interval": -1}, "min_rtt_interval"),
        ({"min_rtt_samples": 0}, "min_rtt_samples"),
        ({"sample_percentile": 101}, "sample_percentile"),
        ({"buffer": -0.1}, "buffer"),
        ({"jitter": 1.5}, "jitter"),
        ({"gradient": 1}, "gradient"),
    ],
)
def test_bad_values_are_refused_at_their_key_path(keys: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(config_with(keys))
    assert caught.value.path == f"upstreams.api.adaptive_concurrency.{where}"


# -- through a real gateway ----------------------------------------------------------------


def gateway_config(upstream: UpstreamProcess, **adaptive: Any) -> dict[str, Any]:
    return {
        "routes": [{"path": "/api", "upstream": "svc"}],
        "upstreams": {
            "svc": {
                "servers": [{"url": upstream.url}],
                "retry": {"attempts": 1},
                "outlier_detection": False,
                "adaptive_concurrency": adaptive,
            }
        },
        "status_path": STATUS,
    }


def limit_status(base: str) -> dict[str, Any]:
    with httpx.Client(base_url=base, timeout=10) as client:
        status: dict[str, Any] = client.get(STATUS).json()["upstreams"]["svc"]["adaptive_concurrency"]
    return status


@contextlib.contextmanager
def offered_load(base: str, workers: int) -> Iterator[dict[str, int]]:
    """`workers` threads sending GET /api/echo in a loop until the block ends; counts by status."""
    counts: dict[str, int] = {"200": 0, "503": 0, "other": 0}
    stop = threading.Event()

    def work() -> None:
        with httpx.Client(base_url=base, timeout=10) as client:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    status = client.get("/api/echo").status_code
                except httpx.HTTPError:
                    status = 0
                key = str(status) if status in (200, 503) else "other"
                counts[key] += 1
                if status == 503:
                    # A refused request is answered at once: pace the retries of the client.
                    stop.wait(0.03)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    try:
        yield counts
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)


def test_the_limit_shrinks_when_the_upstream_slows_down_and_grows_back(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    u1 = upstreams.u1
    # The upstream's own delay dominates its latency, so the gateway's and the client's CPU
    # time (one process, shared cores) is not what the limit reacts to.
    u1.admin("delay", seconds=0.05)
    # More clients than the limit may reach: the limit is always at least half used, so it
    # follows the latency (a limit less used is left as it is).
    keys = {"initial_limit": 8, "min_limit": 2, "max_limit": 16, "interval": 0.05}
    base = gateway_factory(gateway_config(u1, **keys, min_rtt_samples=10, min_rtt_interval=3600))
    with offered_load(base, workers=12) as counts:
        measured = wait_until(lambda: (s := limit_status(base))["min_rtt"] is not None and s, 20)
        assert 0.045 <= measured["min_rtt"] < 0.3
        # At its minimum latency, with the traffic using it, the limit grows from the initial 8.
        grown = wait_until(lambda: (s := limit_status(base))["limit"] > 8 and s, 20, message="growth")
        u1.admin("delay", seconds=0.3)
        shrunk = wait_until(lambda: (s := limit_status(base))["limit"] <= 3 and s, 20, message="shrinking")
        assert shrunk["sample_rtt"] > 0.2
        wait_until(lambda: counts["503"] > 0, 20, message="an overflow")
        u1.admin("delay", seconds=0.05)
        back = wait_until(lambda: (s := limit_status(base))["limit"] >= 8 and s, 30, message="growth again")
    assert grown["limit"] > 8 and back["limit"] >= 8
    assert counts["other"] == 0, counts
    wait_until(lambda: limit_status(base)["in_flight"] == 0, 10, message="every place given back")


@pytest.fixture
def held() -> Iterator[list[RawConnection]]:
    """Connections a test keeps open; closed at its end."""
    connections: list[RawConnection] = []
    try:
        yield connections
    finally:
        for connection in connections:
            connection.close()


def test_overflow_gets_503_at_once_and_never_reaches_the_upstream(
    upstreams: Upstreams, gateway_factory: Callable[..., str], held: list[RawConnection]
) -> None:
    u1 = upstreams.u1
    base = gateway_factory(gateway_config(u1, initial_limit=2, min_limit=2, max_limit=2))
    for _ in range(2):
        connection = RawConnection.to(base)
        connection.send(b"GET /api/hang HTTP/1.1\r\nHost: gw\r\n\r\n")
        held.append(connection)
    wait_until(lambda: u1.stats()["in_flight"].get("hang", 0) == 2, 10, message="two requests hanging")
    status = limit_status(base)
    assert status["limit"] == 2 and status["in_flight"] == 2

    with httpx.Client(base_url=base, timeout=5) as client:
        started = time.monotonic()
        response = client.get("/api/echo")
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "1"
    body = response.json()
    assert body["error"] == "upstream_unavailable" and body["request_id"]
    assert elapsed < 1.0
    assert u1.requests("echo") == 0

    # A body in the retry buffer's size (read whole before an upstream is tried) and one
    # larger (streamed): the client sends the head and holds the body; the answer comes anyway.
    for length in (60_000, 10_000_000):
        with RawConnection.to(base, timeout=5) as connection:
            connection.send(
                b"POST /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n\r\n" % length
            )
            answer = connection.read_response()
        assert answer.status == 503, (length, answer)
        assert answer.header("retry-after") == b"1"
        assert json.loads(answer.body)["error"] == "upstream_unavailable"
    assert u1.requests("upload") == 0

    for connection in held:
        connection.close()
    wait_until(lambda: limit_status(base)["in_flight"] == 0, 10, message="the places given back")
    with httpx.Client(base_url=base, timeout=5) as client:
        assert client.get("/api/echo").status_code == 200


def test_an_upstream_without_the_key_has_no_limit_in_status(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    config = gateway_config(upstreams.u1)
    del config["upstreams"]["svc"]["adaptive_concurrency"]
    base = gateway_factory(config)
    with httpx.Client(base_url=base, timeout=5) as client:
        assert "adaptive_concurrency" not in client.get(STATUS).json()["upstreams"]["svc"]
        assert client.get("/api/echo").status_code == 200


def test_the_limit_is_a_gauge(upstreams: Upstreams, gateway_factory: Callable[..., str]) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    base = gateway_factory(gateway_config(upstreams.u1, min_rtt_samples=5), meter_provider=provider)
    with httpx.Client(base_url=base, timeout=5) as client:
        for _ in range(5):
            assert client.get("/api/echo").status_code == 200
    assert limit_status(base)["limit"] == 20

    points: dict[str, int] = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "gateway.concurrency.limit":
                    for point in metric.data.data_points:
                        points[str(point.attributes["gateway.upstream"])] = int(point.value)
    assert points == {"svc": 20}


def test_no_place_is_kept_by_a_client_that_goes_away(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    u1 = upstreams.u1
    base = gateway_factory(gateway_config(u1, initial_limit=2, min_limit=2, max_limit=2))
    port = int(base.rsplit(":", 1)[1])

    def in_flight() -> int:
        return int(limit_status(base)["in_flight"])

    for round_ in range(1, 4):
        # A body announced and never sent, then gone.
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(b"POST /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n")
            wait_until(lambda: in_flight() == 1, 10, message="the upload's place taken")
        wait_until(lambda: in_flight() == 0, 10, message="the upload's place given back")
        # A request hanging upstream, then gone.
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(b"GET /api/hang HTTP/1.1\r\nHost: gw\r\n\r\n")
            wait_until(lambda n=round_: u1.requests("hang") == n and in_flight() == 1, 10, message="hanging")
        wait_until(lambda: in_flight() == 0, 10, message="the hanging request's place given back")
