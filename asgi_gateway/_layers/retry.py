"""The retry layer: attempts, backoff with full jitter, a retry budget, the total deadline
and the per-upstream concurrency limit.

It sits on top of an upstream's stack and hands each attempt to the failover layer, which
picks the server (another one than those in `exchange.tried` when it can).
"""

from __future__ import annotations

import datetime
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import Final

import anyio

from .._config import UpstreamConfig
from .._deadline import Deadline
from .._exceptions import ConcurrencyLimitExceeded, TotalTimeout, UpstreamError
from .._loop import running_task
from .._types import IDEMPOTENT_METHODS, NULL_EVENTS, GatewayEvents, Handler, Request, Response, may_resend

__all__ = ["IDEMPOTENT_METHODS", "InFlight", "RetryBudget", "RetryLayer", "may_resend"]

logger = logging.getLogger("asgi_gateway.retry")


# A close that hangs must not hold the client past its deadline by more than this.
_CLOSE_GRACE: Final = 1.0


class RetryBudget:
    """Caps retries over a sliding window: retries <= `ratio` * requests + `min_per_second` * `window`.

    As Finagle's retry budget: the ratio keeps a failing upstream from multiplying the load on
    its neighbours, the per-second reserve lets quiet clients retry at all. Counts live in
    one-second buckets, so each call costs O(1) and the window slides by whole seconds (it
    covers the last `window - 1` to `window` seconds).
    """

    __slots__ = ("_clock", "_head", "_ratio", "_requests", "_reserve", "_retries", "_size", "_width")

    def __init__(
        self,
        ratio: float,
        min_per_second: float,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ratio < 0 or min_per_second < 0 or window <= 0:
            raise ValueError("ratio and min_per_second must be >= 0 and window > 0")
        self._ratio = ratio
        self._reserve = min_per_second * window
        self._clock = clock
        self._size = max(1, math.ceil(window))
        self._width = window / self._size
        self._requests = [0] * self._size
        self._retries = [0] * self._size
        #: Index (in bucket widths since the clock's epoch) of the newest bucket.
        self._head = math.floor(clock() / self._width)

    def _advance(self) -> int:
        now = math.floor(self._clock() / self._width)
        if now != self._head:
            # Clear the buckets that fell out of the window; at most `_size` of them.
            for tick in range(max(self._head + 1, now - self._size + 1), now + 1):
                slot = tick % self._size
                self._requests[slot] = 0
                self._retries[slot] = 0
            self._head = now
        return now % self._size

    def record_request(self) -> None:
        """Count one client request (not its retries)."""
        now = math.floor(self._clock() / self._width)
        # Within the newest bucket (nearly always): no call to move the window.
        self._requests[now % self._size if now == self._head else self._advance()] += 1

    def try_acquire_retry(self) -> bool:
        """Take one retry from the budget; False when the window has none left."""
        slot = self._advance()
        allowed = self._ratio * sum(self._requests) + self._reserve
        if sum(self._retries) + 1 > allowed:
            return False
        self._retries[slot] += 1
        return True

    @property
    def requests(self) -> int:
        """Client requests counted in the current window."""
        self._advance()
        return sum(self._requests)

    @property
    def retries(self) -> int:
        """Retries granted in the current window."""
        self._advance()
        return sum(self._retries)


class InFlight:
    """The requests of one upstream holding a `max_concurrent_requests` place.

    An object of its own so that a reload's new retry layer counts the requests still in
    flight on the one it replaces: the limit is the upstream's, not one config's.
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


def _retry_after(response: Response) -> float | None:
    """Seconds an upstream's `Retry-After` asks for (delta-seconds or HTTP-date), or None."""
    for name, value in response.headers:
        if name != b"retry-after":
            continue
        text = value.strip()
        if text.isdigit():
            return float(int(text))
        try:
            when = parsedate_to_datetime(text.decode("latin-1"))
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            # "-0000" parses naive; an HTTP-date is always GMT.
            when = when.replace(tzinfo=datetime.UTC)
        return max(0.0, when.timestamp() - time.time())
    return None


class RetryLayer(Handler):
    """Runs a request's attempts against `inner` under the upstream's retry policy.

    - At most `retry.attempts` tries, all of them (with backoff) within `timeouts.total`;
      past it `TotalTimeout` (504). The deadline ends when a response head comes back: a
      streamed body (server-sent events) then runs as long as each chunk comes within `read`.
    - A failure is retried when its condition is in `retry_on`, the method is idempotent (or
      the request never reached the upstream, or carries `Idempotency-Key`), the body can be
      sent again, the budget allows it and the backoff fits the deadline. Otherwise the
      upstream's response is returned as it is, or its error raised.
    - At most `max_concurrent_requests` at once; a request holds its place until its
      response is closed. Overflow raises `ConcurrencyLimitExceeded` (503) at once.

    `budget` may be shared with another retry layer of the upstream (its WebSocket
    handshakes', or the one a reload replaces), and so may `in_flight` (the count of
    requests holding a place); `limit_concurrency=False` leaves `max_concurrent_requests`
    out (sessions do not count against it). `sleep` and `rng` are there for tests: pass a sleep that
    returns at once to turn the backoff off.
    """

    def __init__(
        self,
        upstream: UpstreamConfig,
        inner: Handler,
        events: GatewayEvents = NULL_EVENTS,
        *,
        budget: RetryBudget | None = None,
        in_flight: InFlight | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rng: random.Random | None = None,
        limit_concurrency: bool = True,
    ) -> None:
        retry = upstream.retry
        self.upstream = upstream
        self.inner = inner
        self.events = events
        self.budget = budget or RetryBudget(retry.budget_ratio, retry.budget_min_per_second)
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._attempts = retry.attempts
        self._conditions = frozenset(c for c in retry.retry_on if isinstance(c, str))
        self._statuses = frozenset(c for c in retry.retry_on if isinstance(c, int))
        self._backoff_base = retry.backoff_base
        self._backoff_max = retry.backoff_max
        self._connect_timeout = upstream.timeouts.connect
        self._read_timeout = upstream.timeouts.read
        self._total = upstream.timeouts.total
        self._max_concurrent = upstream.max_concurrent_requests if limit_concurrency else math.inf
        #: Requests holding a concurrency slot now.
        self.slots = in_flight if in_flight is not None else InFlight()

    @property
    def in_flight(self) -> int:
        """Requests holding a concurrency slot now."""
        return self.slots.count

    async def handle_request(self, request: Request) -> Response:
        slots = self.slots
        if slots.count >= self._max_concurrent:
            raise ConcurrencyLimitExceeded(
                f"upstream {self.upstream.name!r} has {self._max_concurrent} requests in flight"
            )
        slots.count += 1
        request.connect_timeout = self._connect_timeout
        request.read_timeout = self._read_timeout
        self.budget.record_request()
        try:
            body = request.body
            exchange = request.exchange
            replayable = body.replayable
            deadline = Deadline(self._total, exchange.task or running_task(), replayable)
            with deadline:
                if not replayable:
                    # The client's own upload is not the upstream's time: as Envoy's route
                    # timeout, the deadline starts once the whole body has been received. (A
                    # body streaming up cannot be sent again, so no retry plans against it.)
                    body.on_end(deadline.start)
                # The first attempt is made here rather than in a coroutine of its own: most
                # requests make no other, and each coroutine between the relay and the socket
                # is resumed at every wake-up of the exchange.
                exchange.attempts += 1
                try:
                    response = await self.inner.handle_request(request)
                except UpstreamError as exc:
                    response = await self._retry(request, deadline.at, exc, None)
                else:
                    if response.status in self._statuses:
                        response = await self._retry(request, deadline.at, None, response)
            if deadline.expired:
                raise self._total_timeout(request)
        except BaseException:
            slots.count -= 1
            raise
        response.on_close(self._release)
        return response

    def _release(self, response: Response, error: BaseException | None) -> None:
        self.slots.count -= 1

    def _total_timeout(self, request: Request) -> TotalTimeout:
        return TotalTimeout(
            f"upstream {self.upstream.name!r} did not answer within {self._total:g} s "
            f"({request.exchange.attempts} attempt(s))"
        )

    async def _retry(
        self, request: Request, deadline: float, error: UpstreamError | None, response: Response | None
    ) -> Response:
        """After the first attempt failed (`error`, or a `response` with a retried status): the rest."""
        exchange = request.exchange
        for retry_index in range(self._attempts):
            is_last = retry_index == self._attempts - 1
            if error is not None:
                condition = error.retry_condition
                if is_last or condition is None or condition not in self._conditions:
                    raise error
                backoff = self._plan(request, condition, error.reached_upstream, None, deadline, retry_index)
                if backoff is None:
                    raise error
            else:
                assert response is not None
                if is_last or response.status not in self._statuses:
                    return response
                condition = f"status:{response.status}"
                backoff = self._plan(request, condition, True, response, deadline, retry_index)
                if backoff is None:
                    return response
                await self._close(response)
            self.events.retry(exchange, exchange.attempts + 1, condition, backoff)
            if backoff > 0:
                await self._sleep(backoff)
            exchange.attempts += 1
            error = response = None
            try:
                response = await self.inner.handle_request(request)
            except UpstreamError as exc:
                error = exc
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def _plan(
        self,
        request: Request,
        reason: str,
        reached_upstream: bool,
        response: Response | None,
        deadline: float,
        retry_index: int,
    ) -> float | None:
        """The backoff before the next attempt, or None when this failure is final."""
        exchange = request.exchange
        if exchange.committed:
            # The client has bytes of a response already; another attempt would garble it.
            return None
        if reached_upstream and not may_resend(request):
            return None
        body = request.body
        if not body.replayable and body.started:
            return None
        remaining = deadline - anyio.current_time()
        delay = _retry_after(response) if response is not None and response.status == 503 else None
        if delay is None:
            delay = self._rng.uniform(0.0, min(self._backoff_max, self._backoff_base * 2**retry_index))
        # A wait that cannot end before the deadline would only turn this failure into a 504.
        if delay >= remaining:
            return None
        if not self.budget.try_acquire_retry():
            self.events.retry_budget_exhausted(exchange, reason)
            return None
        return delay

    @staticmethod
    async def _close(response: Response) -> None:
        # Shielded so a deadline cannot leave the connection half-closed; bounded so a stuck
        # close cannot hold the client either.
        with anyio.move_on_after(_CLOSE_GRACE, shield=True):
            try:
                await response.aclose()
            except Exception:
                # The failed response is thrown away either way; its close must not end the retries.
                logger.debug("closing a response before retrying failed", exc_info=True)

    async def aclose(self) -> None:
        await self.inner.aclose()
