"""`least_connections`: fewest requests in flight per unit of weight."""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence

from ..._types import Request, Server
from .random_draws import _DRAWS, _WeightedDraws

__all__ = ["LEAST_CONNECTIONS_EXACT_LIMIT", "LeastConnectionsBalancer"]

#: `least_connections` scans every server up to this many; above, it uses power of two choices.
LEAST_CONNECTIONS_EXACT_LIMIT = 32


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
