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

import random
from typing import TYPE_CHECKING

from ._base import Balancer
from .consistent_hash import ConsistentHashBalancer, hash_key, key_function
from .least_connections import LEAST_CONNECTIONS_EXACT_LIMIT, LeastConnectionsBalancer
from .peak_ewma import PEAK_EWMA_DECAY, PEAK_EWMA_FAILURE_FLOOR, PeakEwmaBalancer
from .random_draws import RandomBalancer, WeightedRandomBalancer, alias_tables
from .round_robin import RoundRobinBalancer, smooth_cycle

if TYPE_CHECKING:
    from ..._config import UpstreamConfig

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
