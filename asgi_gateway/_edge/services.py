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

    def __init__(self, redis: RedisConfig | None) -> None:
        self._redis_config = redis
        self.redis: RedisStore | None = None
        self.jwks: list[JwksCache] = []

    @property
    def active(self) -> bool:
        return self.redis is not None or bool(self.jwks)

    def limiter(self, config: RateLimitConfig, scope: str) -> Limiter:
        if config.backend == "memory":
            return MemoryLimiter(config.rate, config.per, config.burst)
        if self.redis is None:
            assert self._redis_config is not None  # validated: backend redis needs the section
            self.redis = RedisStore(self._redis_config)
        return RedisLimiter(self.redis, scope, config.rate, config.per, config.burst)

    def verifier(self, config: JwtConfig, where: str) -> JwtVerifier:
        verifier = JwtVerifier(config, where)
        if verifier.jwks is not None:
            # Routes naming the same JWKS share one cache: one fetch for all of them.
            same = next((cache for cache in self.jwks if cache.url == verifier.jwks.url), None)
            if same is None:
                self.jwks.append(verifier.jwks)
            else:
                verifier.jwks = verifier.keys = same
        return verifier

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
