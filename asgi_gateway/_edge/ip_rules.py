"""Client-address rules of a route (`allow_ips`, `deny_ips`), parsed once."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["AddressSet", "IpRules"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressSet:
    """Addresses and networks, parsed once; `address in addresses` answers fast.

    Single addresses are kept as strings in a set, so the usual rule (a few hosts) costs one
    lookup; only networks need the address parsed.
    """

    __slots__ = ("hosts", "networks")

    def __init__(self, specs: Iterable[str]) -> None:
        self.hosts: set[str] = set()
        self.networks: list[_Network] = []
        for spec in specs:
            network = ipaddress.ip_network(spec, strict=False)
            if network.num_addresses == 1:
                self.hosts.add(str(network.network_address))
            else:
                self.networks.append(network)

    def __bool__(self) -> bool:
        return bool(self.hosts) or bool(self.networks)

    def __contains__(self, host: str) -> bool:
        if host in self.hosts:
            return True
        address = _parse(host)
        return address is not None and self.holds(address)

    def holds(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if self.hosts and str(address) in self.hosts:
            return True
        return any(address in network for network in self.networks)


def _parse(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    # An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d; the rules name a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class IpRules:
    """A route's `allow_ips` (None: everyone) and `deny_ips`; deny wins.

    An address that is not an IP address at all (a Unix socket's peer, none) is allowed only
    when there is no allow list: it cannot be shown to be on it. Parsing an address costs
    more than the rest of the check, and clients come back: the answers for the last few
    thousand addresses are kept.
    """

    __slots__ = ("_seen", "allow", "deny")

    _SEEN_MAX = 4096

    def __init__(self, allow: Iterable[str] | None, deny: Iterable[str]) -> None:
        self.allow = AddressSet(allow) if allow is not None else None
        self.deny = AddressSet(deny)
        self._seen: dict[str, bool] = {}

    def allows(self, host: str) -> bool:
        answer = self._seen.get(host)
        if answer is None:
            answer = self._decide(host)
            if len(self._seen) >= self._SEEN_MAX:
                self._seen.clear()
            self._seen[host] = answer
        return answer

    def _decide(self, host: str) -> bool:
        address = _parse(host)
        if address is None:
            return self.allow is None
        if self.deny and self.deny.holds(address):
            return False
        return self.allow is None or self.allow.holds(address)
