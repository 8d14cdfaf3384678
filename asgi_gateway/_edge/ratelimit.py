"""Rate limits: GCRA with one stored time per key, in this process or in Redis.

GCRA (the generic cell rate algorithm) keeps one number per key, the theoretical arrival
time (TAT) of the next request. With `interval = per / rate` and `tolerance = (burst - 1) *
interval`, a request at `now` is allowed when `now >= max(TAT, now) - tolerance`, and then
moves TAT to `max(TAT, now) + interval`. An idle key may so send `burst` requests at once,
and one more every `interval` after: exact, with no window edges.

Both limiters answer the same `Decision`; `MemoryLimiter` keeps the TATs in a dict,
`RedisLimiter` in Redis, by one script per request that reads the server's own clock, so
that every gateway process sharing the Redis enforces one limit.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

    from .._config import RedisConfig

__all__ = ["BackendError", "Decision", "Limiter", "MemoryLimiter", "RedisLimiter", "RedisStore", "gcra"]

logger = logging.getLogger("asgi_gateway")

#: Keys of Redis: `asgi_gateway:rl:{route}:{key}`.
KEY_PREFIX: Final = "asgi_gateway:rl:"


@dataclass(slots=True)
class Decision:
    """One rate-limit decision.

    `limit` is the burst, `remaining` the requests the key may still send at once, `reset`
    the seconds until the key's bucket is full again, `retry_after` (refused only) the
    seconds until the next request would be allowed.
    """

    allowed: bool
    limit: int
    remaining: int
    reset: float
    retry_after: float = 0.0


class BackendError(Exception):
    """The store behind a limiter failed or was too slow: no decision."""


class Limiter(Protocol):
    """Decides, per key, whether one more request is allowed now."""

    async def acquire(self, key: str) -> Decision:
        """Count one request of `key` if allowed. Raises `BackendError` when it cannot tell."""
        ...

    async def aclose(self) -> None: ...


def gcra(tat: float, now: float, interval: float, tolerance: float) -> tuple[bool, float, float]:
    """(allowed, the new TAT, the delay): the delay is until the next allowed request if refused.

    All in the same unit as `now`.
    """
    base = tat if tat > now else now
    allow_at = base - tolerance
    if now < allow_at:
        return False, tat, allow_at - now
    return True, base + interval, 0.0


class _Shape:
    """A limit's numbers, and the decision built from what a store answered."""

    __slots__ = ("burst", "interval", "tolerance")

    def __init__(self, rate: float, per: float, burst: int | None) -> None:
        self.burst = burst if burst is not None else max(1, math.ceil(rate))
        self.interval = per / rate
        self.tolerance = (self.burst - 1) * self.interval

    def allowed(self, ahead: float) -> Decision:
        """Allowed, with the key's TAT now `ahead` seconds in the future."""
        remaining = int((self.tolerance + self.interval - ahead) / self.interval + 1e-9)
        return Decision(True, self.burst, max(0, min(self.burst, remaining)), ahead)

    def refused(self, wait: float, ahead: float) -> Decision:
        return Decision(False, self.burst, 0, ahead, wait)


class MemoryLimiter:
    """The TATs in a dict of this process.

    Entries whose TAT has passed are worth nothing (the key is as good as new), so they are
    swept out now and then: the dict holds at most the keys seen in the last `burst *
    interval` seconds.
    """

    _SWEEP_EVERY: Final = 4096

    def __init__(self, rate: float, per: float, burst: int | None, *, clock: Any = time.monotonic) -> None:
        self.shape = _Shape(rate, per, burst)
        self._tats: dict[str, float] = {}
        self._clock = clock
        self._until_sweep = self._SWEEP_EVERY

    def decide(self, key: str) -> Decision:
        """The same as `acquire`, without awaiting: nothing here waits."""
        # `gcra()` written out: this runs on every request of a limited route.
        shape = self.shape
        now = self._clock()
        tats = self._tats
        tat = tats.get(key, now)
        base = tat if tat > now else now
        self._until_sweep -= 1
        if self._until_sweep <= 0:
            self._sweep(now)
        if now < base - shape.tolerance:
            return Decision(False, shape.burst, 0, tat - now, base - shape.tolerance - now)
        tat = tats[key] = base + shape.interval
        return shape.allowed(tat - now)

    async def acquire(self, key: str) -> Decision:
        return self.decide(key)

    def _sweep(self, now: float) -> None:
        self._until_sweep = max(self._SWEEP_EVERY, len(self._tats))
        self._tats = {key: tat for key, tat in self._tats.items() if tat > now}

    async def aclose(self) -> None:
        self._tats.clear()


# One round trip: the TAT is read, checked and written by the server, on its own clock, so
# no two processes can both take the last slot, whatever their clocks say. Times in
# microseconds (exact in a Lua number until the year 2255). The key expires once its TAT has
# passed, when it would be worth nothing anyway.
_SCRIPT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local allow_at = tat - tolerance
if now < allow_at then
  return {0, allow_at - now, tat - now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0, new_tat - now}
"""


class RedisStore:
    """One Redis client (connection pool) and the loaded script, shared by the routes using it.

    Each call is bounded by `redis.timeout`, connecting included; a failure is counted by
    the caller and logged here at most once a minute.
    """

    _LOG_INTERVAL: Final = 60.0
    #: Connections to Redis at most; requests beyond them wait for one, within the timeout.
    _MAX_CONNECTIONS: Final = 64

    def __init__(self, config: RedisConfig) -> None:
        try:
            from redis.asyncio import BlockingConnectionPool, Redis
        except ImportError:  # pragma: no cover - depends on the environment
            from .._exceptions import ConfigError

            raise ConfigError(
                "redis",
                "rate_limit.backend: redis needs the 'redis' extra: pip install 'asgi-gateway[redis]'",
            ) from None
        self.config = config
        self.timeout = config.timeout
        pool = BlockingConnectionPool.from_url(
            config.url,
            max_connections=self._MAX_CONNECTIONS,
            timeout=config.timeout,
            socket_timeout=config.timeout,
            socket_connect_timeout=config.timeout,
        )
        # The client owns the pool: closing it closes the connections.
        self.client: Redis = Redis.from_pool(pool)
        # EVALSHA, and EVAL once more (which loads it) on NOSCRIPT: after a Redis restart too.
        self.script: AsyncScript = self.client.register_script(_SCRIPT)
        self._logged_at: float | None = None
        self.failures = 0

    async def run(self, key: str, interval_us: int, tolerance_us: int) -> list[int]:
        try:
            with anyio.fail_after(self.timeout):
                result: list[int] = await self.script(keys=[key], args=[interval_us, tolerance_us])
            return result
        except Exception as exc:
            self.failed(exc)
            raise BackendError(str(exc) or type(exc).__name__) from exc

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        now = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < self._LOG_INTERVAL:
            return
        self._logged_at = now
        what = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc!r}"
        logger.warning(
            "rate limit: Redis at %s %s; requests follow redis.on_error=%s (%d failure(s) so far; "
            "the next are not logged for %gs)",
            _safe_url(self.config.url),
            what,
            self.config.on_error,
            self.failures,
            self._LOG_INTERVAL,
        )

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.client.aclose()


def _safe_url(url: str) -> str:
    """The URL without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"***@{netloc}").geturl()


class RedisLimiter:
    """The TATs in Redis, shared by every gateway process using it: one script call per request.

    `scope` names the route, so that two routes never share a bucket by accident.
    """

    def __init__(self, store: RedisStore, scope: str, rate: float, per: float, burst: int | None) -> None:
        self.store = store
        self.shape = _Shape(rate, per, burst)
        self.prefix = f"{KEY_PREFIX}{scope}:"
        self._interval_us = max(1, round(self.shape.interval * 1e6))
        self._tolerance_us = round(self.shape.tolerance * 1e6)

    async def acquire(self, key: str) -> Decision:
        allowed, wait, ahead = await self.store.run(self.prefix + key, self._interval_us, self._tolerance_us)
        if allowed:
            return self.shape.allowed(ahead / 1e6)
        return self.shape.refused(wait / 1e6, ahead / 1e6)

    async def aclose(self) -> None:
        pass  # the store is shared; the gateway closes it
