"""`random` and `weighted_random`, and the O(1) weighted draws that `least_connections` and
`peak_ewma` draw their candidates with."""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence

from ..._types import Request, Server
from ._base import Balancer, _allowed

__all__ = ["RandomBalancer", "WeightedRandomBalancer", "alias_tables"]

# Random draws that hit an excluded server are retried this many times before the balancer
# lists the servers that are left, so a pick stays O(1) unless `exclude` holds most of the set.
_DRAWS = 8
# Weighted draws use a table of each server weight / gcd times up to this many entries (128 KiB),
# else alias tables: both O(1) per draw, the table a little cheaper.
_MAX_WEIGHT_TABLE = 16384


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
