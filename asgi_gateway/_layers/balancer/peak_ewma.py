"""`peak_ewma`: power of two choices over latency estimate * (in flight + 1) per unit of weight."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Sequence

from ..._types import Request, Server
from ._base import Balancer, _allowed
from .random_draws import _DRAWS, _WeightedDraws

__all__ = ["PEAK_EWMA_DECAY", "PEAK_EWMA_FAILURE_FLOOR", "PeakEwmaBalancer"]

#: `peak_ewma`'s time constant in seconds: a latency sample counts for about this long, and
#: a server's estimate decays towards zero at this rate while it gets no answers.
PEAK_EWMA_DECAY = 10.0
#: A failed attempt counts for `peak_ewma` as at least this many seconds (and at least twice
#: the server's estimate, up to `_MAX_FAILURE_SAMPLE`), so a server that fails fast is not cheap.
PEAK_EWMA_FAILURE_FLOOR = 0.1
_MAX_FAILURE_SAMPLE = 10.0
# The cost of a server not measured yet while it has a request in flight: above any measured
# cost, so it gets one probe at a time until its first answer (Finagle's rule).
_UNMEASURED_PENALTY = 1e9


class _Latency:
    """One server's latency estimate for `peak_ewma`: seconds, as of `stamp` (0.0: not measured)."""

    __slots__ = ("estimate", "stamp")

    def __init__(self, estimate: float = 0.0, stamp: float = 0.0) -> None:
        self.estimate = estimate
        self.stamp = stamp


class PeakEwmaBalancer(_WeightedDraws):
    """Power of two choices over cost = latency estimate * (requests in flight + 1), as Finagle
    and Linkerd do.

    The estimate is a peak EWMA of the time from sending an attempt to its response head
    (`observe`, fed by the failover layer): a sample above the estimate replaces it at once,
    a lower one is blended in with weight `1 - exp(-elapsed / decay)`, `elapsed` being the
    time since the server's previous sample. While a server gets no answers its estimate
    decays towards zero at the same rate, so a server that was avoided for being slow is
    tried again after a while and its traffic comes back once it answers quickly.

    A failed attempt (connect failure, reset, read timeout, 502/503/504) counts as at least
    twice the server's estimate and at least `PEAK_EWMA_FAILURE_FLOOR`, so a server that fails
    fast does not look cheap. A server not measured yet has cost 0 while it has nothing in
    flight and a penalty above any measured cost while it has: it gets one probe at a time
    until its first answer. A server that joins the set again (readmitted after an ejection,
    healthy again) starts at no worse than the median estimate of the servers already in it.

    Weights count as in `least_connections`: both candidates are drawn by weight (O(1) with
    the weighted draws of `weighted_random`) and their costs are compared per unit of weight.
    """

    __slots__ = ("_clock", "_decay", "_latency", "_members")

    measures_latency = True

    def __init__(
        self,
        rng: random.Random,
        decay: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(rng)
        self._clock = clock
        # Read at construction (not import) so tests can shorten it for the whole gateway.
        self._decay = decay if decay is not None else PEAK_EWMA_DECAY
        # Every server ever in the set keeps its estimate: one that leaves and comes back
        # (ejected, unhealthy) is judged on what it last did, capped at the median.
        self._latency: dict[Server, _Latency] = {}
        self._members: frozenset[Server] = frozenset()

    def set_servers(self, servers: Sequence[Server]) -> None:
        super().set_servers(servers)
        latency = self._latency
        members = frozenset(servers)
        joining = [server for server in servers if server not in self._members]
        self._members = members
        returning = [server for server in joining if server in latency and latency[server].estimate]
        for server in joining:
            if server not in latency:
                latency[server] = _Latency()
        if not returning:
            return
        now = self._clock()
        joined = set(joining)
        others = sorted(self.estimate(server, now) for server in servers if server not in joined)
        if not others:
            return
        middle = len(others) // 2
        median = others[middle] if len(others) % 2 else (others[middle - 1] + others[middle]) / 2
        for server in returning:
            state = latency[server]
            state.estimate = min(self.estimate(server, now), median)
            state.stamp = now

    def take_over(self, previous: Balancer, servers: Collection[Server]) -> None:
        if not isinstance(previous, PeakEwmaBalancer):
            return
        latency = previous._latency
        for server in servers:
            state = latency.get(server)
            if state is not None:
                # The same object: the answers still coming back to the replaced config's
                # requests go on feeding the estimate.
                self._latency[server] = state

    def estimate(self, server: Server, now: float | None = None) -> float:
        """`server`'s latency estimate in seconds at `now` (0.0: not measured)."""
        state = self._latency.get(server)
        if state is None or not state.estimate:
            return 0.0
        if now is None:
            now = self._clock()
        return state.estimate * math.exp(min(0.0, state.stamp - now) / self._decay)

    def observe(self, server: Server, seconds: float, failed: bool = False) -> None:
        now = self._clock()
        state = self._latency.get(server)
        if state is None:
            state = self._latency[server] = _Latency()
        # A sample is never 0.0, which means "not measured" (a coarse clock can read no time).
        sample = max(seconds, 1e-6)
        if state.estimate:
            weight = math.exp(min(0.0, state.stamp - now) / self._decay)
            decayed = state.estimate * weight
        else:
            weight = decayed = 0.0
        if failed:
            sample = max(sample, min(max(2.0 * decayed, PEAK_EWMA_FAILURE_FLOOR), _MAX_FAILURE_SAMPLE))
        # The peak rule: a sample above the estimate replaces it, a lower one is blended in.
        state.estimate = sample if sample >= state.estimate else decayed + sample * (1.0 - weight)
        state.stamp = now

    def _cheaper(self, first: Server, second: Server) -> Server:
        # Costs per unit of weight, cross-multiplied. Both estimates decay by the same factor from
        # the later stamp to now, so only the older one needs decaying to the later stamp: no clock
        # read, one exp (of a negative number: no overflow however long a server was idle).
        latency = self._latency
        one = latency[first]
        other = latency[second]
        cost_first = one.estimate
        cost_second = other.estimate
        if cost_first and cost_second:
            if one.stamp >= other.stamp:
                cost_second *= math.exp((other.stamp - one.stamp) / self._decay)
            else:
                cost_first *= math.exp((one.stamp - other.stamp) / self._decay)
            cost_first *= (first.in_flight + 1) * second.weight
            cost_second *= (second.in_flight + 1) * first.weight
        else:
            # A server not measured yet costs nothing while idle and more than any measured
            # server while its probe is out; any measured cost lies in between.
            if not cost_first:
                cost_first = _UNMEASURED_PENALTY + first.in_flight if first.in_flight > 0 else 0.0
            if not cost_second:
                cost_second = _UNMEASURED_PENALTY + second.in_flight if second.in_flight > 0 else 0.0
        return second if cost_second < cost_first else first

    def pick(self, request: Request, exclude: Collection[Server] = ()) -> Server | None:
        table = self._table
        if table and not exclude:
            # The common case, `draw` inlined; two distinct candidates whenever the weights allow.
            random = self._random
            size = len(table)
            first = table[int(random() * size)]
            second = table[int(random() * size)]
            if second is first:
                for _ in range(_DRAWS):
                    second = table[int(random() * size)]
                    if second is not first:
                        break
                else:
                    return first
        else:
            servers = self._servers
            if not servers:
                return None
            draw = self.draw
            first = draw()
            if exclude and first in exclude:
                for _ in range(_DRAWS):
                    first = draw()
                    if first not in exclude:
                        break
                else:
                    return self._pick_among(_allowed(servers, exclude)) or first
            for _ in range(_DRAWS):
                second = draw()
                if second is not first and not (exclude and second in exclude):
                    break
            else:
                if not exclude:
                    return first
                return self._pick_among(_allowed(servers, exclude)) or first
        return self._cheaper(first, second)

    def _pick_among(self, allowed: Sequence[Server]) -> Server | None:
        # The rare pick after `exclude` has rejected every draw: two of what is left, unweighted.
        if len(allowed) <= 1:
            return allowed[0] if allowed else None
        first, second = self._rng.sample(allowed, 2)
        return self._cheaper(first, second)
