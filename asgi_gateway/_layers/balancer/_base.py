"""The interface every balancer implements, and what they share."""

from __future__ import annotations

import abc
from collections.abc import Collection, Sequence
from typing import ClassVar

from ..._types import Request, Server

__all__ = ["Balancer"]


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
