"""GCRA limiters: the memory one and the Redis one (a real redis-server) pass the same tests."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import anyio
import pytest
from edge.redis_server import RedisServer

from asgi_gateway._config import RedisConfig
from asgi_gateway._edge.ratelimit import BackendError, Limiter, MemoryLimiter, RedisLimiter, RedisStore, gcra

pytestmark = pytest.mark.anyio

LimiterFactory = Callable[..., Limiter]


@pytest.fixture(params=["memory", "redis"])
async def make_limiter(request: pytest.FixtureRequest) -> AsyncIterator[LimiterFactory]:
    stores: list[RedisStore] = []
    server: RedisServer | None = None
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")

    def factory(rate: float, per: float = 1.0, burst: int | None = None, scope: str = "/r") -> Limiter:
        if server is None:
            return MemoryLimiter(rate, per, burst)
        store = RedisStore(RedisConfig(url=server.url, timeout=0.5))
        stores.append(store)
        return RedisLimiter(store, scope, rate, per, burst)

    try:
        yield factory
    finally:
        for store in stores:
            await store.aclose()


def test_gcra_arithmetic() -> None:
    # interval 1, burst 3 (tolerance 2): three at once, then one per interval.
    tat = 0.0
    results = []
    for _ in range(4):
        allowed, new_tat, wait = gcra(tat, 10.0, 1.0, 2.0)
        results.append((allowed, wait))
        if allowed:
            tat = new_tat
    assert results == [(True, 0.0), (True, 0.0), (True, 0.0), (False, 1.0)]
    assert gcra(tat, 11.0, 1.0, 2.0)[0] is True


def test_memory_limiter_on_a_given_clock() -> None:
    now = [100.0]
    limiter = MemoryLimiter(2, 1.0, 4, clock=lambda: now[0])  # one per 0.5 s, 4 at once
    decisions = [limiter.decide("k") for _ in range(5)]
    assert [d.allowed for d in decisions] == [True, True, True, True, False]
    assert [d.remaining for d in decisions[:4]] == [3, 2, 1, 0]
    assert decisions[4].retry_after == pytest.approx(0.5)
    assert decisions[0].limit == 4 and decisions[3].reset == pytest.approx(2.0)
    now[0] += 0.49
    assert not limiter.decide("k").allowed
    now[0] += 0.02
    assert limiter.decide("k").allowed
    assert not limiter.decide("k").allowed
    assert limiter.decide("other").allowed  # keys are independent
    now[0] += 10
    assert [limiter.decide("k").allowed for _ in range(5)] == [True] * 4 + [False]


def test_memory_limiter_forgets_idle_keys() -> None:
    now = [0.0]
    limiter = MemoryLimiter(1000, 1.0, 1, clock=lambda: now[0])
    for i in range(10000):
        limiter.decide(f"key-{i}")
        now[0] += 0.01
    # Every TAT but the last few has passed: they were swept out.
    assert len(limiter._tats) < 5000


async def test_a_burst_passes_and_the_next_is_refused(make_limiter: LimiterFactory) -> None:
    limiter = make_limiter(rate=1, per=10.0, burst=5)
    decisions = [await limiter.acquire("client") for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert all(d.limit == 5 for d in decisions)
    refused = decisions[5]
    assert 9.0 < refused.retry_after <= 10.0
    assert 49.0 < refused.reset <= 50.0
    assert (await limiter.acquire("another client")).allowed


async def test_burst_defaults_to_rate(make_limiter: LimiterFactory) -> None:
    limiter = make_limiter(rate=3, per=60.0)
    assert [(await limiter.acquire("k")).allowed for _ in range(4)] == [True, True, True, False]


async def test_refill_over_time_follows_gcra(make_limiter: LimiterFactory) -> None:
    # 20 per second, 5 at once: over ~1.5 s of constant pressure, 5 + 20 * elapsed are allowed.
    limiter = make_limiter(rate=20, per=1.0, burst=5)
    start = time.monotonic()
    allowed = 0
    while time.monotonic() - start < 1.5:
        if (await limiter.acquire("k")).allowed:
            allowed += 1
        await anyio.sleep(0.002)
    elapsed = time.monotonic() - start
    expected = 5 + 20 * elapsed
    assert abs(allowed - expected) <= 2, (allowed, expected)


async def test_two_routes_never_share_a_bucket(make_limiter: LimiterFactory) -> None:
    first = make_limiter(rate=1, per=60.0, burst=1, scope="/a")
    second = make_limiter(rate=1, per=60.0, burst=1, scope="/b")
    assert (await first.acquire("k")).allowed
    assert (await second.acquire("k")).allowed
    assert not (await first.acquire("k")).allowed


async def test_limiters_on_one_redis_share_the_limit(redis_server: RedisServer) -> None:
    stores = [RedisStore(RedisConfig(url=redis_server.url, timeout=0.5)) for _ in range(3)]
    try:
        limiters = [RedisLimiter(store, "/shared", 1, 60.0, 6) for store in stores]
        results = [(await limiters[i % 3].acquire("k")).allowed for i in range(9)]
        assert results == [True] * 6 + [False] * 3
        # Stored with an expiry, under the documented prefix.
        ttl = int(redis_server.command("PTTL", "asgi_gateway:rl:/shared:k")[1:].strip())
        assert 0 < ttl <= 360_001
    finally:
        for store in stores:
            await store.aclose()


async def test_redis_killed_fails_fast_and_restarted_resumes(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore(RedisConfig(url=redis_server.url, timeout=0.2))
    try:
        limiter = RedisLimiter(store, "/r", 1, 60.0, 2)
        assert (await limiter.acquire("k")).allowed
        redis_server.kill()
        for _ in range(5):
            start = time.monotonic()
            with pytest.raises(BackendError):
                await limiter.acquire("k")
            assert time.monotonic() - start < 1.0
        assert store.failures == 5
        warnings = [r for r in caplog.records if "Redis at" in r.getMessage()]
        assert len(warnings) == 1  # logged once, not once per request
        redis_server.start()  # same port; its script cache is empty: NOSCRIPT, then loaded again
        decisions = [await limiter.acquire("k") for _ in range(3)]
        assert [d.allowed for d in decisions] == [True, True, False]
    finally:
        await store.aclose()


async def test_a_redis_that_hangs_is_bounded_by_the_timeout(redis_server: RedisServer) -> None:
    import os
    import signal

    store = RedisStore(RedisConfig(url=redis_server.url, timeout=0.1))
    assert redis_server.process is not None
    try:
        limiter = RedisLimiter(store, "/r", 1, 60.0, 2)
        assert (await limiter.acquire("k")).allowed
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(BackendError):
                await limiter.acquire("k")
            assert time.monotonic() - start < 0.5
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
    finally:
        await store.aclose()
