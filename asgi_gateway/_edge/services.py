"""What the edge layers share across routes: the Redis client, the JWKS caches and their refresh."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from .jwt import JwksCache, JwtVerifier
from .ratelimit import Limiter, MemoryLimiter, RedisLimiter, RedisStore

if TYPE_CHECKING:
    from .._config import JwtConfig, RateLimitConfig, RedisConfig

__all__ = ["EdgeServices"]


class EdgeServices:
    """Builds the limiters and verifiers of the routes, and runs what they need in the background.

    Nothing is opened for a config without edge keys: `active` is then False and the
    gateway starts nothing.
    """

    def __init__(self, redis: RedisConfig | None, previous: EdgeServices | None = None) -> None:
        self._redis_config = redis
        self.redis: RedisStore | None = None
        self.jwks: list[JwksCache] = []
        self._limiters: dict[tuple[RateLimitConfig, str], Limiter] = {}
        # A reload's new services reuse the running ones' limiters (their counts), Redis
        # connection and JWKS caches (their keys) where the settings stay the same.
        self._previous = previous

    @property
    def active(self) -> bool:
        return self.redis is not None or bool(self.jwks)

    def limiter(self, config: RateLimitConfig, scope: str) -> Limiter:
        key = (config, scope)
        limiter = self._limiters.get(key)
        if limiter is not None:
            return limiter
        previous = self._previous
        if previous is not None and (config.backend == "memory" or self._same_redis(previous)):
            limiter = previous._limiters.get(key)
        if limiter is None:
            if config.backend == "memory":
                limiter = MemoryLimiter(config.rate, config.per, config.burst)
            else:
                limiter = RedisLimiter(self._store(), scope, config.rate, config.per, config.burst)
        elif config.backend == "redis":
            self._store()
        self._limiters[key] = limiter
        return limiter

    def _same_redis(self, previous: EdgeServices) -> bool:
        return previous.redis is not None and previous._redis_config == self._redis_config

    def _store(self) -> RedisStore:
        store = self.redis
        if store is None:
            previous = self._previous
            if previous is not None and previous.redis is not None and self._same_redis(previous):
                store = previous.redis
            else:
                assert self._redis_config is not None  # validated: backend redis needs the section
                store = RedisStore(self._redis_config)
            self.redis = store
        return store

    def verifier(self, config: JwtConfig, where: str) -> JwtVerifier:
        verifier = JwtVerifier(config, where)
        if verifier.jwks is not None:
            # Routes naming the same JWKS share one cache: one fetch for all of them.
            url = verifier.jwks.url
            same = next((cache for cache in self.jwks if cache.url == url), None)
            if same is None and self._previous is not None:
                same = next((cache for cache in self._previous.jwks if cache.url == url), None)
                if same is not None:
                    self.jwks.append(same)
            if same is None:
                self.jwks.append(verifier.jwks)
            else:
                verifier.jwks = verifier.keys = same
        return verifier

    def take_over(self) -> None:
        """Once the new state is in: what it shares with the previous services is its own now.

        The previous services' background work then closes only what was not taken over.
        """
        previous = self._previous
        self._previous = None
        if previous is not None and previous.redis is self.redis:
            previous.redis = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Fetch every JWKS once (each within its timeout), tell `task_status`, keep them fresh.

        Until cancelled; then the Redis connections and the JWKS client are closed.
        """
        client: Any = None
        try:
            async with anyio.create_task_group() as tg:
                if self.jwks:
                    import httpx

                    # Its own client: never the upstreams' pool, and no cookies kept.
                    client = httpx.AsyncClient(
                        timeout=httpx.Timeout(5.0, connect=2.0), follow_redirects=False
                    )
                    for cache in self.jwks:
                        await tg.start(cache.run, client, name=f"JWKS {cache.url}")
                task_status.started()
                await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                if client is not None:
                    await client.aclose()
                if self.redis is not None:
                    await self.redis.aclose()
