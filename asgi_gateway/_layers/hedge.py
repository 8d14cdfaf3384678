"""Hedged requests: one more try on another server when the first is slow to answer.

As in "The Tail at Scale" (Dean and Barroso, 2013): a request that has had no response head
`hedge.delay` seconds after its last try went out is sent once more, to a server it has not
tried yet, up to `hedge.max_extra` extra tries. The first response head wins; the other tries
are cancelled, which closes their connections (an upstream connection in the middle of a
request is never reused). Only requests that may reach a server twice (an idempotent method
or an `Idempotency-Key`) with a buffered body are hedged, and each extra try takes one retry
from the upstream's retry budget, so that a slow fleet is never multiplied.

The layer sits between the retry layer and the failover layer: each try is one pass through
failover (its own server, counted in flight, judged by outlier detection) and telemetry (its
own CLIENT span). A cancelled try says nothing about its server. To the retry layer a race is
one attempt: it fails only once every try has failed, with the last try's error; a response
whose status the retry layer would retry is held back while another try may still answer.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Awaitable
from typing import Final

import anyio
from anyio.abc import TaskGroup

from .._config import UpstreamConfig
from .._types import NULL_EVENTS, GatewayEvents, Handler, Request, Response, may_resend
from .failover import FailoverLayer
from .retry import RetryBudget

__all__ = ["HedgeLayer", "hedge_layer"]

logger = logging.getLogger("asgi_gateway.hedge")

# A close that hangs must not hold the client by more than this.
_CLOSE_GRACE: Final = 1.0


def hedge_layer(
    upstream: UpstreamConfig, inner: FailoverLayer, budget: RetryBudget, events: GatewayEvents = NULL_EVENTS
) -> Handler:
    """`inner` itself for an upstream without `hedge` (nothing between the layers), else a
    `HedgeLayer` over it charging its extra tries to `budget`."""
    if upstream.hedge is None:
        return inner
    return HedgeLayer(upstream, inner, budget, events)


class _Race:
    """The tries of one hedged request: how many are still waiting, and what came back."""

    __slots__ = ("answer", "error", "held", "news", "pending", "tries")

    def __init__(self) -> None:
        #: Tries sent and not yet answered or failed.
        self.pending = 0
        #: Every try's request, the first (the request itself) first.
        self.tries: list[Request] = []
        #: The winner: (index of its try, its response).
        self.answer: tuple[int, Response] | None = None
        #: Responses with a status the retry layer retries, kept while another try may answer.
        self.held: list[tuple[int, Response]] = []
        #: The last failure.
        self.error: Exception | None = None
        #: Set when a try ends; made anew once seen set.
        self.news = anyio.Event()


class HedgeLayer(Handler):
    """Races the tries of a hedged request through `inner` (the failover layer).

    `budget` is the upstream's retry budget (its retry layer's): a hedge that it refuses is
    not sent (`hedge_result` "skipped_budget"), and no other hedge is tried for that request.
    """

    def __init__(
        self,
        upstream: UpstreamConfig,
        inner: FailoverLayer,
        budget: RetryBudget,
        events: GatewayEvents = NULL_EVENTS,
    ) -> None:
        hedge = upstream.hedge
        if hedge is None:
            raise ValueError(f"upstream {upstream.name!r} has no hedge configuration")
        self.inner = inner
        self.budget = budget
        self.events = events
        self._delay = hedge.delay
        self._max_extra = hedge.max_extra
        self._statuses = frozenset(c for c in upstream.retry.retry_on if isinstance(c, int))

    def handle_request(self, request: Request) -> Awaitable[Response]:
        if request.body.replayable and may_resend(request):
            return self._race(request)
        # Not to be sent twice: the failover layer's own coroutine, nothing of this layer's.
        return self.inner.handle_request(request)

    async def _race(self, request: Request) -> Response:
        exchange = request.exchange
        race = _Race()
        delay = self._delay
        try:
            async with anyio.create_task_group() as tg:
                self._start(tg, race, request)
                extra = 0
                hedging = True
                next_at = anyio.current_time() + delay
                while True:
                    if race.answer is not None or race.pending == 0:
                        break
                    if race.news.is_set():
                        race.news = anyio.Event()
                    if not hedging or extra >= self._max_extra:
                        await race.news.wait()
                        continue
                    with anyio.CancelScope(deadline=next_at):
                        await race.news.wait()
                    if race.news.is_set():
                        continue
                    if not self.inner.untried_available(exchange):
                        # Every server has this request already: another copy would only
                        # load one of them twice.
                        hedging = False
                        continue
                    if not self.budget.try_acquire_retry():
                        self.events.hedge_result(exchange, "skipped_budget")
                        hedging = False
                        continue
                    extra += 1
                    exchange.attempts += 1
                    self.events.hedge(exchange, exchange.attempts, delay)
                    # A request of its own: each try gets its own server and traceparent.
                    again = copy.copy(request)
                    again.headers = list(request.headers)
                    self._start(tg, race, again)
                    next_at = anyio.current_time() + delay
                if race.answer is not None:
                    # Decided: the tries still waiting are the losers.
                    winner = race.answer[0]
                    for index, other in enumerate(race.tries):
                        other.superseded = index != winner
                if race.pending:
                    tg.cancel_scope.cancel()
        except BaseException:
            # Cancelled from outside (the total deadline, a client gone): nothing is returned.
            if race.answer is not None:
                race.held.append(race.answer)
                race.answer = None
            for _, response in race.held:
                await _discard(response)
            raise
        answer = race.answer
        if answer is None and race.held:
            # Every try failed or answered with a status the retry layer retries: the first of
            # those answers goes up (the retry layer may try again), the others are closed.
            answer = race.held.pop(0)
        for index, response in race.held:
            race.tries[index].superseded = True
            await _discard(response)
        if answer is None:
            assert race.error is not None, "a try ends with an answer or an error"
            raise race.error
        index, response = answer
        if len(race.tries) > 1:
            self.events.hedge_result(exchange, "won" if index > 0 else "lost")
        if response.server is not None:
            exchange.server = response.server
        return response

    def _start(self, tg: TaskGroup, race: _Race, request: Request) -> None:
        race.tries.append(request)
        race.pending += 1
        tg.start_soon(self._try, race, len(race.tries) - 1, request)

    async def _try(self, race: _Race, index: int, request: Request) -> None:
        if race.answer is not None:
            # Decided before this try began: it never goes out.
            race.pending -= 1
            return
        try:
            response = await self.inner.handle_request(request)
        except Exception as exc:
            # Kept, not raised: an error in a task group would cancel the other tries.
            race.pending -= 1
            race.error = exc
            race.news.set()
            return
        except BaseException:
            race.pending -= 1
            raise
        race.pending -= 1
        if race.answer is not None:
            # Outrun while its head was on the way.
            request.superseded = True
            await _discard(response)
            return
        if response.status in self._statuses:
            race.held.append((index, response))
        else:
            race.answer = (index, response)
        race.news.set()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _discard(response: Response) -> None:
    """Close a response that will not be relayed: its connection, its body unread, is closed."""
    # Shielded: the race may be over because of a cancellation, and the close must still run.
    with anyio.move_on_after(_CLOSE_GRACE, shield=True):
        try:
            await response.aclose()
        except Exception:
            logger.debug("closing an outrun hedged response failed", exc_info=True)
