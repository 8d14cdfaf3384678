"""DNS discovery against a real DNS server and real upstreams, all on 127.0.0.1.

A `dnslib` server on a free UDP port answers for `users.test` from records the test changes
(or answers SERVFAIL, or is stopped). The upstreams are `tests/upstream_app.py` processes on
127.0.0.1 to 127.0.0.4, all on the same port, so each A record is a different upstream. A
gateway (`Gateway` under uvicorn in a thread) resolves through that DNS server.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSServer
from servers import UPSTREAM_APP, UpstreamProcess, free_port, wait_until

from asgi_gateway import Gateway
from asgi_gateway._config import (
    DiscoveryConfig,
    GatewayConfig,
    RouteConfig,
    ServerConfig,
    UpstreamConfig,
    load_config,
)
from asgi_gateway._exceptions import ConfigError
from asgi_gateway._transports.pool import PoolTransport
from asgi_gateway._types import Server

NAME = "users.test"
ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")
STATUS = "/-/status"


class Records(BaseResolver):  # type: ignore[misc]
    """Answers A queries from `records`; SERVFAIL while `servfail`; NXDOMAIN for unknown names."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[str, list[str]] = {}
        self.servfail = False
        self.ttl = 1
        self.queries = 0

    def set(self, name: str, *addresses: str) -> None:
        with self.lock:
            if addresses:
                self.records[name] = list(addresses)
            else:
                self.records.pop(name, None)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        with self.lock:
            self.queries += 1
            if self.servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            name = str(request.q.qname).rstrip(".").lower()
            addresses = self.records.get(name)
            if addresses is None:
                reply.header.rcode = RCODE.NXDOMAIN
                return reply
            if request.q.qtype == QTYPE.A:
                for address in addresses:
                    reply.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=self.ttl))
        return reply


class _QuietLogger:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class Dns:
    """A `dnslib` DNS server on 127.0.0.1 (UDP, free port) in a thread; `stop()` silences it."""

    def __init__(self) -> None:
        self.records = Records()
        self.server = DNSServer(self.records, address="127.0.0.1", port=0, logger=_QuietLogger())
        self.port: int = self.server.server.server_address[1]
        self.server.start_thread()
        self.running = True

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.server.stop()
            self.server.server.server_close()


class AddressedUpstream(UpstreamProcess):
    """The test upstream on a given 127.x address."""

    def __init__(self, name: str, host: str, port: int) -> None:
        super().__init__(name, port)
        self.host = host

    def _spawn(self) -> None:
        env = {**os.environ, "UPSTREAM_NAME": self.name, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(UPSTREAM_APP), "--host", self.host, "--port", str(self.port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            cwd=str(UPSTREAM_APP.parent),
        )
        self._stopped = False


def _port_free_everywhere() -> int:
    for _ in range(50):
        port = free_port()
        try:
            for address in ADDRESSES:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((address, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on every test address")


@pytest.fixture(scope="module")
def addressed_upstreams() -> Iterator[dict[str, AddressedUpstream]]:
    """One upstream per address, all on one port: `{address: upstream}`; its name is the address."""
    port = _port_free_everywhere()
    processes = {address: AddressedUpstream(address, address, port) for address in ADDRESSES}
    try:
        for process in processes.values():
            process.start(wait=False)
        for process in processes.values():
            process.wait_ready()
        yield processes
    finally:
        for process in processes.values():
            process.close()


@pytest.fixture
def fleet(addressed_upstreams: dict[str, AddressedUpstream]) -> dict[str, AddressedUpstream]:
    for upstream in addressed_upstreams.values():
        upstream.ensure_running()
        upstream.reset()
    return addressed_upstreams


@pytest.fixture
def dns() -> Iterator[Dns]:
    server = Dns()
    try:
        yield server
    finally:
        server.stop()


def config(port: int, dns: Dns, *, name: str = NAME, **upstream: Any) -> dict[str, Any]:
    discovery = {"type": "dns", "interval": 0.2, "nameservers": [dns.nameserver]}
    discovery.update(upstream.pop("discovery", {}))
    return {
        "routes": [{"path": "/", "upstream": "users"}],
        "upstreams": {
            "users": {
                "servers": [{"url": f"http://{name}:{port}"}],
                "discovery": discovery,
                **upstream,
            }
        },
        "status_path": STATUS,
    }


@pytest.fixture
def gateway(serve: Callable[..., str]) -> Iterator[Callable[[dict[str, Any]], tuple[Gateway, httpx.Client]]]:
    """`gateway(config) -> (Gateway, client of it)`, served by uvicorn until the test ends."""
    with contextlib.ExitStack() as stack:

        def start(config: dict[str, Any]) -> tuple[Gateway, httpx.Client]:
            app = Gateway(config)
            url = serve(app)
            return app, stack.enter_context(httpx.Client(base_url=url, timeout=10.0))

        yield start


def servers_of(client: httpx.Client) -> list[dict[str, Any]]:
    servers: list[dict[str, Any]] = client.get(STATUS).json()["upstreams"]["users"]["servers"]
    return servers


def addresses_of(client: httpx.Client, state: str | None = None) -> list[str]:
    return sorted(
        server["address"].rsplit(":", 1)[0]
        for server in servers_of(client)
        if state is None or server["state"] == state
    )


def wait_addresses(client: httpx.Client, *expected: str, state: str = "healthy") -> None:
    wait_until(
        lambda: addresses_of(client, state) == sorted(expected),
        timeout=10.0,
        message=f"{state} servers {sorted(expected)}",
    )


def hits(client: httpx.Client, count: int) -> set[str]:
    """Which upstreams `count` requests reached."""
    reached = set()
    for _ in range(count):
        response = client.get("/echo")
        assert response.status_code == 200, response.text
        reached.add(response.json()["server"])
    return reached


def pool_of(app: Gateway) -> PoolTransport:
    pool = app._transport._inner
    assert isinstance(pool, PoolTransport)
    return pool


def stack_server(app: Gateway, address: str) -> Server:
    [server] = [server for server in app.stacks["users"].servers if server.ip == address]
    return server


def test_every_address_is_a_server_under_the_name(
    fleet: dict[str, AddressedUpstream], dns: Dns, gateway: Any
) -> None:
    port = fleet["127.0.0.2"].port
    dns.records.set(NAME, "127.0.0.2")
    _, client = gateway(config(port, dns, health_check={"path": "/healthz", "interval": 0.2, "timeout": 1.0}))

    # Resolved before serving: the first request already goes to the address.
    [server] = servers_of(client)
    assert server["url"] == f"http://{NAME}:{port}"
    assert server["address"] == f"127.0.0.2:{port}"
    response = client.get("/echo")
    assert response.json()["server"] == "127.0.0.2"
    assert dict(response.json()["headers"])["host"] == f"{NAME}:{port}"
    status = client.get(STATUS).json()["upstreams"]["users"]
    assert status["stale"] is False
    assert status["discovery"]["names"][NAME]["addresses"] == ["127.0.0.2"]

    # A record added: the new server joins, takes requests and is health-checked.
    dns.records.set(NAME, "127.0.0.2", "127.0.0.3")
    wait_addresses(client, "127.0.0.2", "127.0.0.3")
    assert hits(client, 10) == {"127.0.0.2", "127.0.0.3"}
    wait_until(lambda: fleet["127.0.0.3"].requests("healthz") > 0, message="a check of the new server")
    assert {server["url"] for server in servers_of(client)} == {f"http://{NAME}:{port}"}


def test_removed_address_drains(fleet: dict[str, AddressedUpstream], dns: Dns, gateway: Any) -> None:
    port = fleet["127.0.0.3"].port
    leaving = fleet["127.0.0.3"]
    dns.records.set(NAME, "127.0.0.3")
    app, client = gateway(config(port, dns))
    pool = pool_of(app)
    server = stack_server(app, "127.0.0.3")

    # One request in flight on it (answered after 3 s: the removal below takes well under
    # one), and one idle pooled connection.
    slow: list[httpx.Response] = []
    in_flight = threading.Thread(target=lambda: slow.append(client.get("/slow?delay=3")))
    in_flight.start()
    try:
        wait_until(lambda: leaving.stats()["in_flight"].get("slow") == 1, message="the slow request")
        assert hits(client, 1) == {"127.0.0.3"}
        assert pool.connection_count(server) == 2

        dns.records.set(NAME, "127.0.0.2")
        wait_addresses(client, "127.0.0.2")
        assert addresses_of(client, "draining") == ["127.0.0.3"]
        assert leaving.stats()["in_flight"].get("slow") == 1
        # Its idle connection closed at once; no new request reaches it.
        wait_until(lambda: pool.connection_count(server) == 1, timeout=2.0, message="the idle one closed")
        assert hits(client, 10) == {"127.0.0.2"}
    finally:
        in_flight.join(10.0)
    # The request in flight finished, on the removed server.
    [response] = slow
    assert response.status_code == 200 and response.json()["server"] == "127.0.0.3"
    # Then its last connection closed, and it is gone from the status view.
    # (Well within uvicorn's 5 s keep-alive timeout, after which the upstream would close it.)
    wait_until(lambda: pool.connection_count(server) == 0, timeout=2.0, message="the busy connection closed")
    assert addresses_of(client) == ["127.0.0.2"]
    before = leaving.stats()["total"]
    assert hits(client, 10) == {"127.0.0.2"}
    assert leaving.stats()["total"] == before


def test_failed_or_empty_lookup_keeps_the_last_set(
    fleet: dict[str, AddressedUpstream], dns: Dns, gateway: Any
) -> None:
    port = fleet["127.0.0.2"].port
    dns.records.set(NAME, "127.0.0.2", "127.0.0.3")
    _, client = gateway(config(port, dns))
    wait_addresses(client, "127.0.0.2", "127.0.0.3")

    def stale() -> bool:
        return bool(client.get(STATUS).json()["upstreams"]["users"]["stale"])

    # SERVFAIL.
    dns.records.servfail = True
    wait_until(stale, message="stale after SERVFAIL")
    assert addresses_of(client) == ["127.0.0.2", "127.0.0.3"]
    assert hits(client, 10) == {"127.0.0.2", "127.0.0.3"}
    # NXDOMAIN (the record is gone): still the last set.
    dns.records.servfail = False
    dns.records.set(NAME, "127.0.0.4")
    wait_addresses(client, "127.0.0.4")
    assert not stale()
    dns.records.set(NAME)
    wait_until(stale, message="stale after NXDOMAIN")
    assert addresses_of(client) == ["127.0.0.4"]
    # No DNS server at all.
    dns.stop()
    queries = dns.records.queries
    wait_until(
        lambda: (
            "A:"
            in (
                client.get(STATUS).json()["upstreams"]["users"]["discovery"]["names"][NAME]["last_error"]
                or ""
            )
            and dns.records.queries == queries
        ),
        message="a lookup that found no server",
    )
    assert stale()
    assert hits(client, 5) == {"127.0.0.4"}


def test_ttl_brings_the_next_lookup_sooner_than_the_interval(
    fleet: dict[str, AddressedUpstream], dns: Dns, gateway: Any
) -> None:
    port = fleet["127.0.0.2"].port
    dns.records.set(NAME, "127.0.0.2")
    _, client = gateway(config(port, dns, discovery={"interval": 300.0}))
    assert addresses_of(client) == ["127.0.0.2"]
    dns.records.set(NAME, "127.0.0.3")
    # The record's TTL is 1 s: the change is seen within a few seconds, not in 300.
    wait_addresses(client, "127.0.0.3")


def test_a_name_unresolvable_at_start_is_reached_through_the_system_resolver(
    fleet: dict[str, AddressedUpstream], dns: Dns, gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    port = fleet["127.0.0.1"].port
    dns.records.servfail = True
    _, client = gateway(config(port, dns, name="localhost"))
    [server] = servers_of(client)
    assert server["address"] == f"localhost:{port}"
    assert client.get(STATUS).json()["upstreams"]["users"]["stale"] is True
    assert "cannot resolve localhost at start" in caplog.text
    assert hits(client, 3) == {"127.0.0.1"}
    # Once DNS answers, its addresses take over.
    dns.records.set("localhost", "127.0.0.2")
    dns.records.servfail = False
    wait_addresses(client, "127.0.0.2")
    assert hits(client, 3) == {"127.0.0.2"}


def test_discovery_without_dnspython_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dns.asyncresolver", None)
    with pytest.raises(ConfigError) as info:
        Gateway(
            {
                "routes": [{"path": "/", "upstream": "users"}],
                "upstreams": {"users": {"servers": ["http://users.test:80"], "discovery": {"type": "dns"}}},
            }
        )
    assert info.value.path == "upstreams.users.discovery"
    assert "asgi-gateway[dns]" in str(info.value)


def test_dnspython_is_not_imported_without_discovery() -> None:
    code = (
        "import sys; from asgi_gateway import Gateway;"
        "Gateway({'routes': [{'path': '/', 'upstream': 'u'}], 'upstreams': {'u': {'servers': ['http://a.test']}}});"
        "print('dns' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# -- config ----------------------------------------------------------------------------------


def _upstream(discovery: Any) -> dict[str, Any]:
    return {
        "routes": [{"path": "/", "upstream": "users"}],
        "upstreams": {"users": {"servers": ["http://users.test:8000"], "discovery": discovery}},
    }


def test_discovery_config_is_read() -> None:
    loaded = load_config(
        _upstream(
            {"type": "dns", "interval": 2, "respect_ttl": False, "nameservers": ["10.0.0.10", "[::1]:5353"]}
        )
    )
    assert loaded.upstreams["users"].discovery == DiscoveryConfig(
        type="dns", interval=2.0, respect_ttl=False, nameservers=("10.0.0.10", "[::1]:5353")
    )
    assert load_config(_upstream({})).upstreams["users"].discovery == DiscoveryConfig()
    assert load_config(_upstream(None)).upstreams["users"].discovery is None


@pytest.mark.parametrize(
    ("discovery", "path", "words"),
    [
        ({"type": "srv"}, "upstreams.users.discovery.type", "is not dns"),
        ({"interval": 0}, "upstreams.users.discovery.interval", "greater than 0"),
        ({"interval": "5"}, "upstreams.users.discovery.interval", "not a number"),
        ({"respect_ttl": "yes"}, "upstreams.users.discovery.respect_ttl", "not true or false"),
        ({"nameservers": "127.0.0.1"}, "upstreams.users.discovery.nameservers", "not a list"),
        ({"nameservers": ["dns.internal"]}, "upstreams.users.discovery.nameservers[0]", "not an ip[:port]"),
        (
            {"nameservers": ["127.0.0.1", "127.0.0.1:0"]},
            "upstreams.users.discovery.nameservers[1]",
            "ip[:port]",
        ),
        ({"nameservers": ["[::1]:99999"]}, "upstreams.users.discovery.nameservers[0]", "ip[:port]"),
        ({"ttl": 5}, "upstreams.users.discovery.ttl", "unknown key"),
    ],
)
def test_discovery_config_errors_name_the_key(discovery: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_upstream(discovery))
    assert info.value.path == path
    assert words in str(info.value)


def test_discovery_checked_in_a_config_built_in_python() -> None:
    upstream = UpstreamConfig(
        name="users",
        servers=(ServerConfig(url="http://users.test:8000"),),
        discovery=DiscoveryConfig(type="srv", interval=-1.0, nameservers=("nope",)),  # type: ignore[arg-type]
    )
    with pytest.raises(ConfigError) as info:
        GatewayConfig(routes=(RouteConfig(path="/", upstream="users"),), upstreams={"users": upstream})
    assert [path for path, _ in info.value.errors] == [
        "upstreams.users.discovery.type",
        "upstreams.users.discovery.interval",
        "upstreams.users.discovery.nameservers[0]",
    ]


@pytest.mark.anyio
async def test_a_reload_takes_over_the_discovered_servers(dns: Dns) -> None:
    from asgi_gateway._stack import build_stacks
    from asgi_gateway._telemetry import Telemetry
    from asgi_gateway._transports.auto import AutoTransport

    dns.records.set(NAME, "127.0.0.2", "127.0.0.3")
    transport, telemetry = AutoTransport(None), Telemetry()
    old = build_stacks(load_config(config(8000, dns)), transport, telemetry)["users"]
    assert old.discovery is not None
    await old.discovery.first_lookup()
    found = list(old.servers)
    assert sorted(server.address for server in found) == ["127.0.0.2:8000", "127.0.0.3:8000"]
    found[0].ejected_until, found[0].ejections = time.monotonic() + 60.0, 1
    old.failover._ejected.add(found[0])

    reloaded = config(8000, dns)
    reloaded["upstreams"]["users"]["servers"][0]["weight"] = 3
    new = build_stacks(load_config(reloaded), transport, telemetry, previous={"users": old})["users"]

    # The same Server objects, with the new weight, the ejection carried over; no lookup needed.
    assert new.servers == found and all(a is b for a, b in zip(new.servers, found, strict=True))
    assert new.failover.servers == tuple(found)
    assert [server.weight for server in new.servers] == [3, 3]
    assert found[0] in new.failover._ejected
    queries = dns.records.queries
    assert new.discovery is not None
    await new.discovery.first_lookup()
    assert dns.records.queries == queries
    assert new.status()["stale"] is False
