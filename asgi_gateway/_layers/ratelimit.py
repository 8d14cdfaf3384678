"""The rate-limit layer: 429 past a route's limit, and the `RateLimit-*` headers on its answers."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .._config import RateLimitConfig
from .._edge.ratelimit import BackendError, Decision, Limiter
from .._exceptions import GatewayError, RateLimited, UpstreamUnavailable
from .._semconv import HTTP_ROUTE
from .._types import Handler, Headers, Request, Response

if TYPE_CHECKING:
    from .._telemetry import Telemetry

__all__ = ["RateLimitLayer"]

_HEADER_NAMES: Final = frozenset({b"ratelimit-limit", b"ratelimit-remaining", b"ratelimit-reset"})
_RESULTS: Final = ("allowed", "limited", "shadow", "backend_error")
# Longer keys (header values) are hashed: bounded memory per key, in the dict and in Redis.
_MAX_KEY: Final = 128


def _bounded(key: str) -> str:
    return key if len(key) <= _MAX_KEY else "#" + hashlib.sha256(key.encode()).hexdigest()


def key_function(spec: str) -> Callable[[Request], str]:
    """How a request's bucket is named, for `rate_limit.key`.

    A request without the header or the claim counts by its client address, in a namespace
    of its own so that no header value can pose as an address.
    """
    if spec == "route":
        return lambda request: "route"
    if spec == "client_ip":
        return lambda request: "ip:" + request.exchange.client_ip
    kind, _, name = spec.partition(":")
    if kind == "header":
        wanted = name.lower().encode("latin-1")

        def by_header(request: Request) -> str:
            for header, value in request.headers:
                if header == wanted:
                    return _bounded("h:" + value.decode("latin-1"))
            return "ip:" + request.exchange.client_ip

        return by_header

    def by_claim(request: Request) -> str:
        claims = request.exchange.claims
        value = claims.get(name) if claims is not None else None
        if value is None:
            return "ip:" + request.exchange.client_ip
        return _bounded("c:" + (value if isinstance(value, str) else repr(value)))

    return by_claim


class RateLimitLayer(Handler):
    """GCRA per key through `limiter`; 429 `rate_limited` past it.

    Every answer of a limiting route carries `RateLimit-Limit`, `-Remaining` and `-Reset`:
    the upstream's answers, the 429 and the gateway's own errors. `shadow` decides and
    counts, and lets everything through without the headers. When the limiter's store
    fails, `on_error` "allow" lets the request through, "deny" answers 503.
    """

    def __init__(
        self,
        inner: Handler,
        limiter: Limiter,
        config: RateLimitConfig,
        route: str,
        telemetry: Telemetry,
        on_error: str = "allow",
    ) -> None:
        self.inner = inner
        self.limiter = limiter
        self.shadow = config.shadow
        self.deny_on_error = on_error == "deny"
        self.telemetry = telemetry
        self._key = key_function(config.key)
        # A limiter that decides without waiting (the memory one) is called without a coroutine.
        self._decide: Callable[[str], Decision] | None = getattr(limiter, "decide", None)
        # Made once: the counter's attributes for each result.
        self._attributes = {
            result: {HTTP_ROUTE: route, "gateway.rate_limit.result": result} for result in _RESULTS
        }

    def _decided(self, request: Request, result: str) -> None:
        exchange = request.exchange
        exchange.rate_limit_result = result
        span = exchange.span
        if span is not None and span.is_recording():
            span.set_attribute("gateway.rate_limit.result", result)
        counter = self.telemetry.rate_limit_decisions
        if counter is not None:
            try:
                counter.add(1, self._attributes[result])
            except Exception as exc:
                self.telemetry.report("rate limit metric", exc)

    async def handle_request(self, request: Request) -> Response:
        try:
            decide = self._decide
            if decide is not None:
                decision = decide(self._key(request))
            else:
                decision = await self.limiter.acquire(self._key(request))
        except BackendError:
            self._decided(request, "backend_error")
            if self.deny_on_error:
                raise UpstreamUnavailable("the rate limit's store is unavailable") from None
            return await self.inner.handle_request(request)
        if self.shadow:
            self._decided(request, "allowed" if decision.allowed else "shadow")
            return await self.inner.handle_request(request)
        headers = _headers(decision)
        if not decision.allowed:
            self._decided(request, "limited")
            raise RateLimited(
                "too many requests; retry later",
                retry_after=max(1, math.ceil(decision.retry_after)),
                headers=headers,
            )
        self._decided(request, "allowed")
        try:
            response = await self.inner.handle_request(request)
        except GatewayError as exc:
            exc.headers = (*exc.headers, *headers)
            raise
        # The gateway's own count replaces whatever limit an upstream reports.
        response_headers = response.headers
        for name, _ in response_headers:
            if name in _HEADER_NAMES:
                response_headers = response.headers = [
                    pair for pair in response_headers if pair[0] not in _HEADER_NAMES
                ]
                break
        response_headers.extend(headers)
        return response

    async def aclose(self) -> None:
        await self.limiter.aclose()


_NUMBERS: Final = tuple(str(n).encode() for n in range(1024))


def _number(n: int) -> bytes:
    return _NUMBERS[n] if 0 <= n < 1024 else str(n).encode()


def _headers(decision: Decision) -> Headers:
    return [
        (b"ratelimit-limit", _number(decision.limit)),
        (b"ratelimit-remaining", _number(decision.remaining)),
        (b"ratelimit-reset", _number(max(0, math.ceil(decision.reset - 1e-9)))),
    ]
