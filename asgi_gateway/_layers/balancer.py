"""Load balancers: which of the available servers an attempt goes to.

The failover layer owns health and priority groups. It hands its balancer the servers
available right now through `Balancer.set_servers` (once at start, then whenever that set
changes) and asks `Balancer.pick` for a server on every attempt, passing the servers the
request already tried as `exclude`.

A pick costs O(1) (expected) time whatever the number of servers, as long as `exclude` does
not hold most of the set: the work that depends on the set is done in `set_servers` (O(n), rare).
The exceptions are round robin's fallback for cycles too long to precompute, O(log n), and
least connections' exact scan of up to `LEAST_CONNECTIONS_EXACT_LIMIT` servers.

* `round_robin`: NGINX's smooth weighted round robin. The whole cycle is computed once per
  set (`set_servers`) and a pick reads the next entry. Sets whose cycle would be too long
  to compute cheaply fall back to an earliest-deadline-first heap (Envoy's scheme), O(log n).
* `random`: uniform. `weighted_random`: proportional to weight, from a table that holds each
  server weight / gcd(weights) times, or Vose's alias tables when that table would be long.
* `least_connections`: fewest requests in flight per unit of weight; an exact scan up to
  `LEAST_CONNECTIONS_EXACT_LIMIT` servers, power of two choices (drawn as `weighted_random`
  draws) above.
* `peak_ewma`: power of two choices (drawn as `weighted_random` draws) over latency estimate
  * (in flight + 1) per unit of weight; the failover layer reports each attempt's time to
  its response head through `Balancer.observe`.
* `consistent_hash`: a hash ring with weight-proportional virtual nodes, built once over
  every configured server; a key whose server is unavailable walks on to the next
  available one, and comes back when its server does. A bucket index over the ring (2 to 4
  points per bucket, by the top bits of the hash) finds a key's place without bisecting.

Concurrency: `pick` and `set_servers` never await. Under anyio both asyncio and trio run
one task at a time per event loop, so they can never interleave and the balancers need no
lock. A balancer belongs to one event loop; it is not meant to be shared across threads.
"""

from __future__ import annotations

import abc
import array
import collections
import hashlib
import heapq
import itertools
import math
import operator
import random
import struct
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import urlsplit

from .._types import Request, Server

if TYPE_CHECKING:
    from .._config import ServerConfig, UpstreamConfig

__all__ = [
    "LEAST_CONNECTIONS_EXACT_LIMIT",
    "PEAK_EWMA_DECAY",
    "PEAK_EWMA_FAILURE_FLOOR",
    "Balancer",
    "ConsistentHashBalancer",
    "LeastConnectionsBalancer",
    "PeakEwmaBalancer",
    "RandomBalancer",
    "RoundRobinBalancer",
    "WeightedRandomBalancer",
    "alias_tables",
    "hash_key",
    "key_function",
    "make_balancer",
    "smooth_cycle",
]

#: `least_connections` scans every server up to this many; above, it uses power of two choices.
LEAST_CONNECTIONS_EXACT_LIMIT = 32
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

# Smooth round robin precomputes its cycle when it is at most this long (in picks) and costs at
# most _MAX_CYCLE_WORK steps to compute (a step per pick per distinct weight): a few milliseconds.
_MAX_CYCLE = 8192
_MAX_CYCLE_WORK = 65536

# Random draws that hit an excluded server are retried this many times before the balancer
# lists the servers that are left, so a pick stays O(1) unless `exclude` holds most of the set.
_DRAWS = 8
# Weighted draws use a table of each server weight / gcd times up to this many entries (128 KiB),
# else alias tables: both O(1) per draw, the table a little cheaper.
_MAX_WEIGHT_TABLE = 16384
# Round robin looks this far ahead in its cycle for a server not excluded, then scans the set.
_LOOKAHEAD = 32

# Virtual nodes on the hash ring per unit of weight (about 8% spread of load between servers),
# fewer when the configured weights add up to more than _MAX_RING_POINTS / _VNODES_PER_WEIGHT.
_VNODES_PER_WEIGHT = 160
_MAX_RING_POINTS = 131072
# Ends the live ring: no hash is above it, so a walk along the ring stops there at the latest.
_RING_END = (1 << 64) - 1


class Balancer(abc.ABC):
    """Chooses the server for each attempt among the servers currently available."""

    __slots__ = ()

    #: Whether the failover layer reports each attempt's time to its response head to
    #: `observe`; only balancers that set it pay for the measurement.
    measures_latency: ClassVar[bool] = False

    @abc.abstractmethod
    def set_servers(self, servers: Sequence[Server]) -> None:
        """Make `servers` the set to pick from, in configuration order.

        Called once at start and whenever the available set changes; cheap enough to be
        called on every health change: O(n), about ten milliseconds at worst (consistent_hash
        with 1,000 servers refilters its ring of 131,072 points on the next pick).
        """

    @abc.abstractmethod
    def pick(self, request: Request, exclude: Collection[Server] = ()) -> Server | None:
        """A server of the current set for `request`.

        One not in `exclude` when there is one, else any server of the set (a retry prefers
        a different server but may reuse one); None only when the set is empty.
        """

    def observe(self, server: Server, seconds: float, failed: bool = False) -> None:  # noqa: B027 - most ignore it
        """An attempt on `server` got its response head, or `failed`, `seconds` after it was sent.

        Called by the failover layer only when `measures_latency` is true.
        """

    def take_over(self, previous: Balancer, servers: Collection[Server]) -> None:  # noqa: B027 - most keep nothing
        """Carry over what `previous` (the balancer a reload replaces) learned about `servers`.

        Only what a balancer learns from traffic is worth it (`peak_ewma`'s estimates); a
        balancer of another kind leaves `previous`'s state alone.
        """


def _allowed(servers: Sequence[Server], exclude: Collection[Server]) -> list[Server]:
    excluded = set(exclude)
    return [server for server in servers if server not in excluded]


# -- round robin ---------------------------------------------------------------------------


def smooth_cycle(weights: Sequence[int]) -> list[int] | None:
    """One full cycle of NGINX's smooth weighted round robin, as indices into `weights`.

    Each pick adds every server's weight to its current weight, takes the server with the
    highest current weight (the first one on a tie) and takes the total weight off it.
    The cycle holds each server exactly `weight / gcd(weights)` times, spread out.
    Returns None when the cycle is too long or too costly to compute here.

    Servers of equal weight take their turns in list order, so the computation runs one lane
    per distinct weight instead of one per server: O(cycle length * distinct weights).
    """
    if not weights:
        return []
    divisor = math.gcd(*weights)
    period = sum(weights) // divisor
    lanes: dict[int, list[int]] = {}
    for index, weight in enumerate(weights):
        lanes.setdefault(weight // divisor, []).append(index)
    if len(lanes) == 1:
        return list(range(len(weights)))
    if period > _MAX_CYCLE or period * len(lanes) > _MAX_CYCLE_WORK:
        return None
    lane_weight = list(lanes)
    members = [lanes[w] for w in lane_weight]
    sizes = [len(m) for m in members]
    taken = [0] * len(lane_weight)
    # A lane's current weight is its best member's: the member whose turn is next.
    current = [0] * len(lane_weight)
    order: list[int] = []
    lane_range = range(len(lane_weight))
    for _ in range(period):
        best = -1
        best_current = 0
        best_index = 0
        for lane in lane_range:
            value = current[lane] + lane_weight[lane]
            current[lane] = value
            if best < 0 or value > best_current:
                best, best_current = lane, value
                best_index = members[lane][taken[lane] % sizes[lane]]
            elif value == best_current:
                index = members[lane][taken[lane] % sizes[lane]]
                if index < best_index:
                    best, best_index = lane, index
        order.append(best_index)
        taken[best] += 1
        if taken[best] % sizes[best] == 0:
            current[best] -= period
    return order


class RoundRobinBalancer(Balancer):
    """NGINX's smooth weighted round robin.

    With weights 1:2:3 (servers a, b, c) every 6 consecutive picks hold a once, b twice and
    c three times, interleaved: c b a c b c. A change of the set keeps the position in the
    cycle, so repeated health flaps do not keep sending the next pick to the same server.
    Sets whose cycle is too long to precompute (sum of weights over 8,192 after dividing by
    their gcd, or too many distinct weights) use earliest deadline first: server i's k-th
    turn is due at virtual time k / weight_i; still exact per cycle, O(log n) per pick.
    """

    __slots__ = ("_deadlines", "_heap", "_position", "_sequence", "_servers", "_turn", "_vtime", "_weights")

    def __init__(self) -> None:
        self._servers: tuple[Server, ...] = ()
        self._weights: tuple[int, ...] = ()
        self._sequence: list[Server] = []
        self._position = 0
        # Earliest-deadline-first fallback: heap of (deadline, index, server).
        self._heap: list[tuple[float, int, Server]] | None = None
        self._deadlines: dict[Server, float] = {}
        self._vtime = 0.0
        # Rotates the rare picks that look past _LOOKAHEAD turns without finding a server.
        self._turn = 0

    def set_servers(self, servers: Sequence[Server]) -> None:
        weights = tuple(server.weight for server in servers)
        if len(servers) == len(self._servers) and weights == self._weights:
            if all(a is b for a, b in zip(servers, self._servers, strict=True)):
                return
        self._servers = tuple(servers)
        self._weights = weights
        cycle = smooth_cycle(weights)
        if cycle is not None:
            self._heap = None
            self._deadlines = {}
            self._sequence = [self._servers[i] for i in cycle]
            self._position = self._position % len(cycle) if cycle else 0
            return
        self._sequence = []
        old = self._deadlines
        vtime = self._vtime
        heap = [
            (old.get(server, vtime + 1.0 / server.weight), index, server)
            for index, server in enumerate(servers)
        ]
        heapq.heapify(heap)
        self._heap = heap
        self._deadlines = {server: deadline for deadline, _, server in heap}

    def _next_edf(self) -> Server:
        assert self._heap is not None
        deadline, index, server = self._heap[0]
        self._vtime = deadline
        deadline += 1.0 / server.weight
        heapq.heapreplace(self._heap, (deadline, index, server))
        self._deadlines[server] = deadline
        return server

    def pick(self, request: Request, exclude: Collection[Server] = ()) -> Server | None:
        sequence = self._sequence
        if sequence:
            position = self._position
            server = sequence[position]
            self._position = position + 1 if position + 1 < len(sequence) else 0
            if not exclude or server not in exclude:
                return server
            return self._pick_excluding(server, exclude)
        if self._heap is None:
            return None
        server = self._next_edf()
        if not exclude or server not in exclude:
            return server
        return self._pick_excluding(server, exclude)

    def _pick_excluding(self, first: Server, exclude: Collection[Server]) -> Server:
        # The turns of excluded servers (those that just failed this request) go to the next
        # servers in the cycle, as if the excluded ones were out of the set for a moment.
        for _ in range(min(_LOOKAHEAD, len(self._sequence) or _LOOKAHEAD)):
            if self._heap is not None:
                server = self._next_edf()
            else:
                server = self._sequence[self._position]
                self._position = (self._position + 1) % len(self._sequence)
            if server not in exclude:
                return server
        allowed = _allowed(self._servers, exclude)
        if not allowed:
            return first
        self._turn += 1
        return allowed[self._turn % len(allowed)]


# -- random --------------------------------------------------------------------------------


class RandomBalancer(Balancer):
    """Uniformly random, ignoring weights."""

    __slots__ = ("_random", "_rng", "_servers")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._random = rng.random
        self._servers: list[Server] = []

    def set_servers(self, servers: Sequence[Server]) -> None:
        self._servers = list(servers)

    def _draw(self) -> Server:
        servers = self._servers
        return servers[int(self._random() * len(servers))]

    def pick(self, request: Request, exclude: Collection[Server] = ()) -> Server | None:
        servers = self._servers
        if not servers:
            return None
        server = servers[int(self._random() * len(servers))]
        if not exclude or server not in exclude:
            return server
        for _ in range(_DRAWS):
            other = self._draw()
            if other not in exclude:
                return other
        allowed = _allowed(self._servers, exclude)
        return self._rng.choice(allowed) if allowed else server


def alias_tables(weights: Sequence[int]) -> tuple[list[float], list[int]]:
    """Vose's alias tables for drawing index i with probability weights[i] / sum(weights).

    A draw takes a column c uniformly, then c itself with probability `probability[c]`, else
    `alias[c]`. Built in O(n) with integers (column heights weight * n against a bar of
    sum(weights)), so the tables are exact but for the final division into floats.
    """
    count = len(weights)
    total = sum(weights)
    height = [weight * count for weight in weights]
    small = [i for i, h in enumerate(height) if h < total]
    large = [i for i, h in enumerate(height) if h >= total]
    probability = [1.0] * count
    alias = list(range(count))
    while small and large:
        less = small.pop()
        more = large[-1]
        probability[less] = height[less] / total
        alias[less] = more
        # `more` fills the rest of column `less`; it joins the small ones once below the bar.
        height[more] -= total - height[less]
        if height[more] < total:
            large.pop()
            small.append(more)
    # Heights are integers that always add up to the bar times the columns left, so the columns
    # left over are exactly full (probability 1.0).
    return probability, alias


class _WeightedDraws(Balancer):
    """Draws servers in proportion to their weights in O(1); shared by the balancers that need it.

    The table holds each server weight / gcd(weights) times, in order, so a draw is one index
    into it, as cheap as a uniform draw; when that table would be longer than
    `_MAX_WEIGHT_TABLE`, Vose's alias tables (n entries) take over: one index and one
    comparison.
    """

    __slots__ = ("_aliases", "_probability", "_random", "_rng", "_servers", "_table")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._random = rng.random
        self._servers: list[Server] = []
        self._table: list[Server] = []
        self._probability: list[float] = []
        self._aliases: list[Server] = []

    def set_servers(self, servers: Sequence[Server]) -> None:
        self._servers = list(servers)
        self._table = []
        self._probability = []
        self._aliases = []
        if not servers:
            return
        weights = [server.weight for server in servers]
        divisor = math.gcd(*weights)
        if sum(weights) // divisor <= _MAX_WEIGHT_TABLE:
            self._table = [
                server
                for server, weight in zip(servers, weights, strict=True)
                for _ in range(weight // divisor)
            ]
            return
        self._probability, alias = alias_tables(weights)
        self._aliases = [self._servers[column] for column in alias]

    def draw(self) -> Server:
        """A server by weight; the set must not be empty."""
        table = self._table
        if table:
            return table[int(self._random() * len(table))]
        servers = self._servers
        # One random number gives both the column (integer part) and the coin (fraction).
        point = self._random() * len(servers)
        column = int(point)
        return servers[column] if point - column < self._probability[column] else self._aliases[column]

    @property
    def servers(self) -> list[Server]:
        return self._servers


class WeightedRandomBalancer(_WeightedDraws):
    """Random, each server with probability weight / total weight, in O(1) (see `_WeightedDraws`)."""

    __slots__ = ()

    def pick(self, request: Request, exclude: Collection[Server] = ()) -> Server | None:
        table = self._table
        if table and not exclude:
            return table[int(self._random() * len(table))]
        if not self._servers:
            return None
        server = self.draw()
        if not exclude or server not in exclude:
            return server
        for _ in range(_DRAWS):
            other = self.draw()
            if other not in exclude:
                return other
        allowed = _allowed(self._servers, exclude)
        if not allowed:
            return server
        return self._rng.choices(allowed, weights=[s.weight for s in allowed])[0]


# -- least connections ---------------------------------------------------------------------


class LeastConnectionsBalancer(_WeightedDraws):
    """Fewest requests in flight per unit of weight.

    The failover layer counts `Server.in_flight`; this only reads it. Ties go to a random
    server among the tied, drawn by weight, so that at low concurrency (everyone at zero)
    traffic still follows the weights. Up to `LEAST_CONNECTIONS_EXACT_LIMIT` servers every
    pick scans them all. Above, it takes the better of two servers drawn by weight (power of
    two choices, as Envoy and HAProxy do for large sets): O(1) with the weighted draws of
    `weighted_random`, and the most loaded server is almost never chosen, while requests do
    not all pile onto the one server that happens to be least loaded at the moment.
    """

    __slots__ = ("_exact",)

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._exact = True

    def set_servers(self, servers: Sequence[Server]) -> None:
        super().set_servers(servers)
        self._exact = len(servers) <= LEAST_CONNECTIONS_EXACT_LIMIT

    def pick(self, request: Request, exclude: Collection[Server] = ()) -> Server | None:
        servers = self._servers
        if not servers:
            return None
        if self._exact:
            return self._scan(servers, exclude) or self._scan(servers, ())
        table = self._table
        if table and not exclude:
            # The common case, `draw` inlined.
            random = self._random
            size = len(table)
            first = table[int(random() * size)]
            second = table[int(random() * size)]
            if second is first:
                second = table[int(random() * size)]
        else:
            draw = self.draw
            first = draw()
            if exclude and first in exclude:
                for _ in range(_DRAWS):
                    first = draw()
                    if first not in exclude:
                        break
                else:
                    return self._scan(servers, exclude) or first
            second = draw()
            if second is first or (exclude and second in exclude):
                second = draw()
                if exclude and second in exclude:
                    return first
        if second.in_flight * first.weight < first.in_flight * second.weight:
            return second
        return first

    def _scan(self, servers: Sequence[Server], exclude: Collection[Server]) -> Server | None:
        best: list[Server] = []
        best_score = math.inf
        for server in servers:
            if exclude and server in exclude:
                continue
            score = server.in_flight / server.weight
            if score < best_score:
                best_score = score
                best = [server]
            elif score == best_score:
                best.append(server)
        if len(best) <= 1:
            return best[0] if best else None
        total = sum(server.weight for server in best)
        if total == len(best):
            return best[int(self._rng.random() * len(best))]
        point = self._rng.random() * total
        for server in best:
            point -= server.weight
            if point < 0:
                return server
        return best[-1]


# -- peak EWMA -----------------------------------------------------------------------------


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


# -- consistent hashing --------------------------------------------------------------------


def hash_key(key: bytes) -> int:
    """The 64-bit point of `key` on the ring: BLAKE2b, the same in every process and version."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def _node_name(scheme: str, host: str, port: int | None) -> str:
    host = host.strip("[]").lower()
    if port is None:
        port = 443 if scheme.lower() == "https" else 80
    return f"{scheme.lower()}://{host}:{port}"


def _config_node_name(url: str) -> str:
    parts = urlsplit(url)
    return _node_name(parts.scheme, parts.hostname or "", parts.port)


_POINTS_PER_DIGEST = struct.Struct(">8Q")


def _vnode_points(name: str, count: int) -> list[int]:
    # One 64-byte BLAKE2b digest gives 8 points (as ketama takes 4 from each MD5).
    points: list[int] = []
    for block in range((count + 7) // 8):
        digest = hashlib.blake2b(f"{name}#{block}".encode(), digest_size=64).digest()
        points.extend(_POINTS_PER_DIGEST.unpack(digest))
    return points[:count]


KeyFunction = Callable[[Request], bytes | None]


def key_function(hash_on: str) -> KeyFunction:
    """The function that reads the hash key described by `hash_on` from a request.

    `header:NAME` (case-insensitive name), `cookie:NAME`, `client_ip` or `path`. An absent
    or empty key is None (the request then goes round robin, as in NGINX).
    """
    kind, _, name = hash_on.partition(":")
    if kind == "header" and name:
        header = name.lower().encode("latin-1")

        def from_header(request: Request) -> bytes | None:
            for key, value in request.headers:
                if key == header:
                    return value or None
            return None

        return from_header
    if kind == "cookie" and name:
        cookie = name.encode("latin-1")

        def from_cookie(request: Request) -> bytes | None:
            for key, value in request.headers:
                if key == b"cookie":
                    for pair in value.split(b";"):
                        pair_name, sep, pair_value = pair.partition(b"=")
                        if sep and pair_name.strip() == cookie:
                            return pair_value.strip() or None
            return None

        return from_cookie
    if hash_on == "client_ip":
        return lambda request: request.exchange.client_ip.encode("latin-1", "replace") or None
    if hash_on == "path":
        return lambda request: request.exchange.path.encode("utf-8", "surrogatepass") or None
    raise ValueError(f"hash_on {hash_on!r} is not header:NAME, cookie:NAME, client_ip or path")


class ConsistentHashBalancer(Balancer):
    """A hash ring keyed by a part of the request, with weight-proportional virtual nodes.

    The ring holds every configured server, available or not, each named by its normalised
    URL, so every gateway process maps a key to the same server. A key goes to the first
    available server at or after its point; when a server leaves, only its own keys move
    (about 1/N of them), each to the next server on the ring, and they return when it does.
    `exclude` walks further along the ring. Requests without the key go round robin.
    """

    __slots__ = (
        "_available",
        "_available_count",
        "_bound",
        "_bucket_starts",
        "_by_name",
        "_fallback",
        "_key",
        "_live_owners",
        "_live_points",
        "_live_starts",
        "_mask",
        "_names",
        "_owners",
        "_points",
        "_shift",
        "_slot_of",
        "_slot_server",
        "_stale",
        "_weights",
    )

    def __init__(self, servers: Sequence[ServerConfig], key: KeyFunction) -> None:
        self._key = key
        self._fallback = RoundRobinBalancer()
        # Per ring slot (one per configured server): name, weight, availability, the Server bound
        # to it, and that Server when it is in the current set.
        self._names: list[str] = []
        self._weights: list[int] = []
        self._available: list[bool] = []
        self._available_count = 0
        self._bound: list[Server | None] = []
        self._slot_server: list[Server | None] = []
        self._by_name: dict[str, list[int]] = {}
        self._slot_of: dict[Server, int] = {}
        for config in servers:
            self._add_slot(_config_node_name(config.url), config.weight)
        self._points: list[int] = []
        self._owners: list[int] = []
        self._mask: Callable[[list[bool]], tuple[bool, ...]] = lambda available: ()
        self._shift = 63
        self._bucket_starts = array.array("I")
        self._live_points = array.array("Q")
        self._live_owners: list[int] = []
        self._live_starts = array.array("I")
        self._stale = True
        self._build_ring()

    def _add_slot(self, name: str, weight: int) -> int:
        slot = len(self._names)
        same = self._by_name.setdefault(name, [])
        # The same URL configured twice gets two distinct places on the ring.
        self._names.append(f"{name}#{len(same) + 1}" if same else name)
        same.append(slot)
        self._weights.append(weight)
        self._available.append(False)
        self._bound.append(None)
        self._slot_server.append(None)
        return slot

    def _build_ring(self) -> None:
        per_weight = min(_VNODES_PER_WEIGHT, _MAX_RING_POINTS / max(1, sum(self._weights)))
        ring: list[tuple[int, int]] = []
        for slot, (name, weight) in enumerate(zip(self._names, self._weights, strict=True)):
            ring.extend((point, slot) for point in _vnode_points(name, max(1, round(weight * per_weight))))
        ring.sort()
        self._points = [point for point, _ in ring]
        self._owners = [slot for _, slot in ring]
        if len(self._owners) == 1:
            only = self._owners[0]
            self._mask = lambda available: (available[only],)
        else:
            self._mask = operator.itemgetter(*self._owners)
        # The bucket index: bucket b holds the hashes whose top `bits` bits are b, with 2 to 4 ring
        # points on average. Its start is the index of the first point at or after the bucket's
        # lowest hash (at C speed: count the points per bucket, accumulate the counts).
        bits = max(0, len(self._points).bit_length() - 2)
        buckets = 1 << bits
        self._shift = 64 - bits
        per_bucket = collections.Counter(map(operator.rshift, self._points, itertools.repeat(self._shift)))
        starts = itertools.accumulate(map(per_bucket.get, range(buckets), itertools.repeat(0)), initial=0)
        self._bucket_starts = array.array("I", itertools.islice(starts, buckets))
        self._stale = True

    def _slot(self, server: Server) -> int:
        slot = self._slot_of.get(server)
        if slot is not None:
            return slot
        # A server found by DNS discovery is placed by its address: the same place in every
        # process, whatever order the addresses arrived in.
        name = _node_name(server.scheme, server.ip or server.host, server.port)
        free = [i for i in self._by_name.get(name, ()) if self._bound[i] is None]
        if server.index in free:
            slot = server.index
        elif free:
            slot = free[0]
        else:
            # A server that is not in the configuration (built by hand): it gets its own place.
            slot = self._add_slot(name, server.weight)
            self._build_ring()
        self._bound[slot] = server
        self._slot_of[server] = slot
        return slot

    def set_servers(self, servers: Sequence[Server]) -> None:
        self._fallback.set_servers(servers)
        slots = [self._slot(server) for server in servers]
        available = [False] * len(self._names)
        slot_server: list[Server | None] = [None] * len(self._names)
        for slot, server in zip(slots, servers, strict=True):
            available[slot] = True
            slot_server[slot] = server
        self._available_count = len(set(slots))
        if available != self._available or slot_server != self._slot_server:
            self._available = available
            self._slot_server = slot_server
            self._stale = True

    def _refresh(self) -> None:
        # Filtering the full ring (C speed: itemgetter and compress) gives exactly the points
        # of available servers in ring order. A bucket's start in the live ring is the number of
        # live points before its start in the full ring: a prefix sum of the mask, read at the
        # full ring's bucket starts. Arrays of machine integers rather than lists of int objects:
        # the bucket starts take 4 bytes each instead of 36, and with many distinct keys a lookup
        # touches fewer cache lines (about 20% faster at 1,000 servers and 20,000 keys).
        mask = self._mask(self._available)
        self._live_points = array.array("Q", itertools.compress(self._points, mask))
        self._live_points.append(_RING_END)
        self._live_owners = list(itertools.compress(self._owners, mask))
        live_before = list(itertools.accumulate(mask, initial=0))
        self._live_starts = array.array("I", map(live_before.__getitem__, self._bucket_starts))
        self._stale = False

    def pick(self, request: Request, exclude: Collection[Server] = ()) -> Server | None:
        key = self._key(request)
        if key is None:
            return self._fallback.pick(request, exclude)
        return self.pick_key(key, exclude)

    def pick_key(self, key: bytes, exclude: Collection[Server] = ()) -> Server | None:
        """The server for hash key `key` (what `pick` does once it has the key)."""
        if self._stale:
            self._refresh()
        owners = self._live_owners
        if not owners:
            return None
        # The first live point at or after the key's (what bisect_left would find, in O(1) expected:
        # a bucket holds 2 to 4 points on average): from the bucket's first, walk past smaller ones.
        point = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")  # hash_key(key)
        points = self._live_points
        index = self._live_starts[point >> self._shift]
        while points[index] < point:
            index += 1
        if index == len(owners):
            index = 0
        slot_server = self._slot_server
        server = slot_server[owners[index]]
        assert server is not None
        if not exclude or server not in exclude:
            return server
        available = self._available
        excluded = {slot for slot in map(self._slot_of.get, exclude) if slot is not None and available[slot]}
        if len(excluded) >= self._available_count:
            return server
        # Some available server is not excluded, so the walk ends within one turn of the ring.
        size = len(owners)
        while True:
            index = index + 1 if index + 1 < size else 0
            if owners[index] not in excluded:
                found = slot_server[owners[index]]
                assert found is not None
                return found


# -- factory -------------------------------------------------------------------------------


def make_balancer(upstream: UpstreamConfig, rng: random.Random | None = None) -> Balancer:
    """The balancer `upstream.balancer` names, keyed by `upstream.hash_on` for consistent_hash.

    `rng` makes the random kinds reproducible (tests); by default each balancer has its own
    `random.Random` seeded from the OS.
    """
    rng = rng if rng is not None else random.Random()
    kind = upstream.balancer
    if kind == "round_robin":
        return RoundRobinBalancer()
    if kind == "random":
        return RandomBalancer(rng)
    if kind == "weighted_random":
        return WeightedRandomBalancer(rng)
    if kind == "least_connections":
        return LeastConnectionsBalancer(rng)
    if kind == "peak_ewma":
        return PeakEwmaBalancer(rng)
    if kind == "consistent_hash":
        if upstream.hash_on is None:
            raise ValueError(f"upstream {upstream.name!r}: consistent_hash needs hash_on")
        return ConsistentHashBalancer(upstream.servers, key_function(upstream.hash_on))
    raise ValueError(f"upstream {upstream.name!r}: unknown balancer {kind!r}")
