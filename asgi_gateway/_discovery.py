"""DNS discovery: an upstream's servers are the addresses its host names resolve to.

With `discovery: {type: dns}` each server entry's host name is looked up (A and AAAA, at
once) and every address becomes a `Server` of its own, with the entry's weight and backup
flag, as Envoy's STRICT_DNS does. Connections go to the address; the Host header and TLS
SNI stay the name. One background loop per upstream looks the names up again every
`interval` seconds, or when the shortest TTL of the answer runs out if that is sooner
(`respect_ttl`, never more often than `TTL_FLOOR`), a little early by a random share
(`JITTER`) so that a fleet of gateways does not ask in step.

A lookup that fails (timeout, SERVFAIL, a refused query) or finds nothing (NXDOMAIN, no
records) changes nothing: the name keeps the addresses it last had, and the upstream shows
`"stale": true` in the status view until a lookup succeeds again. (Envoy empties the
cluster on NXDOMAIN; a DNS outage should not become an outage of every upstream.)

A change goes to the failover layer (`FailoverLayer.set_servers`): addresses that stay
keep their `Server` object and all its state, new ones join at once, removed ones take no
new requests and drain; their pooled connections close as their last requests end
(`retire`, the transport's). The health checker follows the same set.

The first lookups run before the gateway serves, each bounded by `LOOKUP_TIMEOUT`. A name
that cannot be resolved then stays the one server its entry names, reached through the
system's resolver at each connect as without discovery, until a lookup succeeds.

dnspython (`pip install 'asgi-gateway[dns]'`) does the lookups, on the event loop without
blocking; it is imported only when an upstream has `discovery`.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc

from ._config import UpstreamConfig
from ._config.validation_upstream import nameserver_address
from ._exceptions import ConfigError
from ._types import Server

if TYPE_CHECKING:
    from ._health import HealthChecker
    from ._layers.failover import FailoverLayer

__all__ = ["Discovery", "run_discovery"]

logger = logging.getLogger("asgi_gateway.discovery")

#: The soonest a TTL may bring the next lookup: a TTL of 0 must not become a busy loop.
TTL_FLOOR: Final = 1.0
#: Each wait is interval (or TTL) * uniform(1 - JITTER, 1): early, never late.
JITTER: Final = 0.1
#: How long one name's lookup may take in all (every nameserver and retry included).
LOOKUP_TIMEOUT: Final = 3.0
#: How long one query to one nameserver may take before the next is tried.
QUERY_TIMEOUT: Final = 1.5
#: How soon a name whose lookup failed is tried again, at most.
RETRY_AFTER_FAILURE: Final = 5.0

_FAMILIES: Final = ("A", "AAAA")


@dataclass(slots=True)
class _Entry:
    """One server entry of the upstream: its `Server` as configured, and the name to resolve."""

    index: int
    base: Server
    #: The host name to look up; None for an IP literal, which stays the one server.
    name: str | None


@dataclass(slots=True)
class _Name:
    """What is known of one host name."""

    #: The last addresses found, per family; None until a lookup of it succeeded.
    addresses: dict[str, list[str]] | None = None
    stale: bool = False
    last_error: str | None = None
    resolved_at: float | None = None
    ttl: float | None = None
    #: Monotonic time of the next lookup.
    due: float = 0.0


class Discovery:
    """Keeps one upstream's servers equal to what its host names resolve to.

    `servers` is the stack's own list (`UpstreamStack.servers`): it is updated in place
    with every change, so it always holds the servers the failover layer has. Changes go
    to `failover.set_servers` and `checker.set_servers`; the servers removed go to
    `retire` (the transport's `retire`) at once, whose connections then close as their
    last requests end. Run `run()` in the gateway's task group: `await tg.start(d.run)`
    returns once the first lookups are done (or `LOOKUP_TIMEOUT` has passed).

    Raises `ConfigError` when dnspython is not installed, or the system's resolver
    configuration cannot be read and no `nameservers` are given.
    """

    def __init__(
        self,
        upstream: UpstreamConfig,
        servers: list[Server],
        failover: FailoverLayer,
        checker: HealthChecker | None = None,
        retire: Callable[[Iterable[Server]], None] | None = None,
    ) -> None:
        config = upstream.discovery
        if config is None:
            raise ValueError(f"upstream {upstream.name!r} has no discovery")
        self._upstream = upstream
        self._config = config
        self._where = f"upstreams.{upstream.name}.discovery"
        self._servers = servers
        self._failover = failover
        self._checker = checker
        self._retire = retire
        self._resolver = self._make_resolver()
        # The system's search list applies as it does to getaddrinfo; names given to the
        # gateway's own nameservers are taken as absolute.
        self._search = not config.nameservers
        self._random = random.Random()
        self._entries = [_Entry(index, server, _name_of(server)) for index, server in enumerate(servers)]
        self._names: dict[str, _Name] = {entry.name: _Name() for entry in self._entries if entry.name}
        #: The servers made for addresses, by (entry index, address); only the current ones.
        self._known: dict[tuple[int, str], Server] = {}
        #: Whether the first lookups are done (or a previous Discovery's state was taken over).
        self._ready = False

    def _make_resolver(self) -> Any:
        try:
            import dns.asyncresolver
            import dns.nameserver
            import dns.resolver
        except ImportError:
            raise ConfigError(
                self._where, "needs dnspython: install the 'dns' extra: pip install 'asgi-gateway[dns]'"
            ) from None
        nameservers = self._config.nameservers
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            addresses = [nameserver_address(spec) for spec in nameservers]
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(ip, port) for ip, port in filter(None, addresses)
            ]
        else:
            try:
                # Reads /etc/resolv.conf: once, here, while the config is being built.
                resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration as exc:
                raise ConfigError(
                    self._where,
                    f"the system's resolver configuration cannot be read ({exc}): set nameservers",
                ) from None
        resolver.timeout = QUERY_TIMEOUT
        resolver.lifetime = LOOKUP_TIMEOUT
        # No cache: each lookup asks, and the TTL decides when the next one does.
        resolver.cache = None
        return resolver

    # -- background ------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Look the names up, then again whenever one is due, until cancelled.

        Tells `task_status` once the first lookups are done, or at once after `take_over`.
        """
        await self.first_lookup()
        task_status.started()
        if not self._names:
            return
        while True:
            await anyio.sleep(max(0.0, min(known.due for known in self._names.values()) - time.monotonic()))
            await self.resolve_once(due_only=True)

    async def first_lookup(self) -> None:
        """The lookups before serving (`run` makes them unless done already), within `LOOKUP_TIMEOUT`.

        A name that cannot be resolved stays its entry's one server, reached by name.
        """
        if self._ready:
            return
        self._ready = True
        await self.resolve_once()
        for name, known in self._names.items():
            if known.addresses is None:
                logger.warning(
                    "upstream %r: cannot resolve %s at start (%s); connecting to it by name through "
                    "the system's resolver until a lookup succeeds",
                    self._upstream.name,
                    name,
                    known.last_error,
                    extra={"upstream": self._upstream.name, "server": name, "reason": "discovery-failed"},
                )

    async def resolve_once(self, *, due_only: bool = False) -> None:
        """Look up every name (or those due, with `due_only`) at once, and apply what changed."""
        now = time.monotonic()
        names = [name for name, known in self._names.items() if not due_only or known.due <= now]
        try:
            async with anyio.create_task_group() as tg:
                for name in names:
                    tg.start_soon(self._lookup, name)
            self._apply()
        except Exception:
            # The gateway's background must outlive a bug here: log it and go on.
            logger.exception(
                "upstream %r: DNS discovery failed",
                self._upstream.name,
                extra={"upstream": self._upstream.name},
            )
            for name in names:
                known = self._names[name]
                known.due = max(known.due, time.monotonic() + min(self._config.interval, RETRY_AFTER_FAILURE))

    async def _lookup(self, name: str) -> None:
        import dns.exception
        import dns.resolver

        known = self._names[name]
        results: dict[str, tuple[list[str], float] | None] = {}
        errors: list[str] = []

        async def query(family: str) -> None:
            try:
                with anyio.fail_after(LOOKUP_TIMEOUT + 1.0):
                    answer = await self._resolver.resolve(name, family, search=self._search)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                results[family] = ([], float("inf"))
            except (dns.exception.DNSException, TimeoutError, OSError) as exc:
                errors.append(f"{family}: {_describe(exc)}")
                results[family] = None
            else:
                rrset = answer.rrset
                addresses = sorted({str(record.address) for record in rrset}) if rrset is not None else []
                results[family] = (addresses, float(rrset.ttl) if rrset is not None else float("inf"))

        async with anyio.create_task_group() as tg:
            for family in _FAMILIES:
                tg.start_soon(query, family)

        now = time.monotonic()
        found = {family: result for family, result in results.items() if result is not None and result[0]}
        if not found:
            # Failed or empty: keep the last known addresses.
            known.stale = True
            known.last_error = "; ".join(errors) or "no A or AAAA records"
            delay = min(self._config.interval, RETRY_AFTER_FAILURE)
        else:
            previous = known.addresses or {}
            addresses: dict[str, list[str]] = {}
            for family in _FAMILIES:
                result = results.get(family)
                # A family that failed while the other answered keeps what it had.
                addresses[family] = result[0] if result is not None else previous.get(family, [])
            known.addresses = addresses
            known.stale = bool(errors)
            known.last_error = "; ".join(errors) or None
            known.resolved_at = time.time()
            ttl = min(result[1] for result in found.values())
            known.ttl = ttl
            delay = self._config.interval
            if self._config.respect_ttl and ttl < delay:
                delay = max(TTL_FLOOR, ttl)
        known.due = now + delay * self._random.uniform(1 - JITTER, 1)

    def _build(self) -> list[Server]:
        """The server list for what is known now, reusing the `Server` of each address that stays."""
        servers: list[Server] = []
        known: dict[tuple[int, str], Server] = {}
        for entry in self._entries:
            addresses = self._names[entry.name].addresses if entry.name is not None else None
            if addresses is None:
                servers.append(entry.base)
                continue
            for family in _FAMILIES:
                for ip in addresses[family]:
                    server = self._known.get((entry.index, ip)) or _server_at(entry.base, ip)
                    known[(entry.index, ip)] = server
                    servers.append(server)
        self._known = known
        return servers

    def _apply(self) -> None:
        servers = self._build()
        current = self._failover.servers
        if len(servers) == len(current) and all(a is b for a, b in zip(servers, current, strict=True)):
            return
        removed = self._failover.set_servers(servers)
        if self._checker is not None:
            self._checker.set_servers(servers)
        self._servers[:] = servers
        kept = set(current)
        added = [server for server in servers if server not in kept]
        logger.info(
            "upstream %r: %d server(s) found in DNS (%d new, %d removed)%s%s",
            self._upstream.name,
            len(servers),
            len(added),
            len(removed),
            "; added " + ", ".join(server.address for server in added) if added else "",
            "; removed " + ", ".join(server.address for server in removed) if removed else "",
            extra={"upstream": self._upstream.name, "server": None, "reason": "discovery"},
        )
        if removed and self._retire is not None:
            self._retire(removed)

    # -- reload ------------------------------------------------------------------------

    def take_over(self, previous: Discovery) -> None:
        """Start from what `previous` (the same upstream's, under the config being replaced)
        knows, for a reload.

        Names still configured keep their addresses, schedule and `Server` objects (an entry
        with the same URL; they take its weight and backup flag), which the failover layer and health
        checker given at construction then have, with their state taken over; `run()` then
        waits for no first lookup. `previous` serves on until the swap, unchanged but for
        the weight and backup flag of the servers both share (as `make_servers` does).
        Call it before the new failover layer's own `take_over`, or instead of it: it
        calls `failover.take_over(previous failover)` itself.
        """
        by_url = {entry.base.url: entry for entry in previous._entries}
        for entry in self._entries:
            old = by_url.get(entry.base.url)
            if old is None or entry.name is None:
                continue
            old_name = previous._names.get(entry.name)
            if old_name is not None:
                self._names[entry.name] = replace(old_name)
            for (index, ip), server in previous._known.items():
                if index == old.index:
                    # As a reload does for any server that stays: the entry's settings now.
                    server.weight = entry.base.weight
                    server.backup = entry.base.backup
                    server.index = entry.index
                    self._known[(entry.index, ip)] = server
        self._ready = True
        servers = self._build()
        self._failover.set_servers(servers)
        self._failover.take_over(previous._failover)
        if self._checker is not None:
            self._checker.set_servers(servers)
            if previous._checker is not None:
                self._checker.take_over(previous._checker)
        self._servers[:] = servers

    # -- status ------------------------------------------------------------------------

    @property
    def upstream(self) -> str:
        """The upstream's name."""
        return self._upstream.name

    @property
    def stale(self) -> bool:
        """Whether the last lookup of some name failed or found nothing."""
        return any(known.stale for known in self._names.values())

    def status(self) -> dict[str, Any]:
        """`stale`, and what each name resolved to: for the upstream's status view."""
        now = time.monotonic()
        return {
            "stale": self.stale,
            "discovery": {
                "type": self._config.type,
                "names": {
                    name: {
                        "addresses": (
                            [ip for family in _FAMILIES for ip in known.addresses[family]]
                            if known.addresses is not None
                            else None
                        ),
                        "stale": known.stale,
                        "last_error": known.last_error,
                        "resolved_at": (
                            datetime.fromtimestamp(known.resolved_at, UTC).isoformat(timespec="milliseconds")
                            if known.resolved_at is not None
                            else None
                        ),
                        "ttl": known.ttl if known.ttl is not None and known.ttl != float("inf") else None,
                        "next_lookup_in": round(max(0.0, known.due - now), 3),
                    }
                    for name, known in self._names.items()
                },
            },
        }


async def run_discovery(
    discoveries: Sequence[Discovery], *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Run every upstream's discovery; tells `task_status` once all first lookups are done.

    The first lookups run side by side, so that start-up waits `LOOKUP_TIMEOUT` at most,
    however many upstreams there are.
    """
    async with anyio.create_task_group() as first:
        for discovery in discoveries:
            first.start_soon(discovery.first_lookup)
    task_status.started()
    async with anyio.create_task_group() as tg:
        for discovery in discoveries:
            tg.start_soon(discovery.run, name=f"discovery {discovery.upstream}")


def _name_of(server: Server) -> str | None:
    """The host name to look up for `server`; None for an IP literal."""
    try:
        ipaddress.ip_address(server.host)
    except ValueError:
        return server.host.rstrip(".") or None
    return None


def _server_at(base: Server, ip: str) -> Server:
    """A server for address `ip` of `base`'s host name."""
    return Server(
        url=base.url,
        scheme=base.scheme,
        host=base.host,
        port=base.port,
        weight=base.weight,
        backup=base.backup,
        index=base.index,
        upstream=base.upstream,
        host_header=base.host_header,
        ip=ip,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {LOOKUP_TIMEOUT:g}s"
    return str(exc) or type(exc).__name__
