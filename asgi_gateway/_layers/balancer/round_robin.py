"""`round_robin`: NGINX's smooth weighted round robin, with Envoy's earliest-deadline-first
heap for the sets whose cycle is too long to precompute."""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Sequence

from ..._types import Request, Server
from ._base import Balancer, _allowed

__all__ = ["RoundRobinBalancer", "smooth_cycle"]

# Smooth round robin precomputes its cycle when it is at most this long (in picks) and costs at
# most _MAX_CYCLE_WORK steps to compute (a step per pick per distinct weight): a few milliseconds.
_MAX_CYCLE = 8192
_MAX_CYCLE_WORK = 65536
# Round robin looks this far ahead in its cycle for a server not excluded, then scans the set.
_LOOKAHEAD = 32


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
