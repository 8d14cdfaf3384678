"""WebSocket proxying end to end: a real client, the gateway under uvicorn, real uvicorn upstreams.

The upstream is the small ASGI app at the bottom of this module, run as a subprocess
(``python tests/test_websocket.py --port N``) by `WsUpstream`, so a test can SIGKILL it.
Every session names itself with ``?id=...``; the upstream records what it saw of each
session (handshake headers, close code and reason) for ``/__admin/events?id=...``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
import pytest
from servers import TESTS_DIR, BrokenServer, UpstreamProcess, free_port, make_host_app, raw_request, serve_app

MiB = 1024 * 1024
ROUTE = "/ws"


# -- the upstream ------------------------------------------------------------------------------


class WsUpstream(UpstreamProcess):
    """This module's WebSocket upstream app under uvicorn, in a subprocess."""

    def _spawn(self) -> None:
        env = {**os.environ, "UPSTREAM_NAME": self.name, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--port", str(self.port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            cwd=str(TESTS_DIR),
        )
        self._stopped = False

    def events(self, session: str) -> list[dict[str, Any]]:
        return list(self.admin("events", id=session)["events"])

    def handshakes(self) -> int:
        return int(self.admin("stats")["handshakes"])

    def progress(self, session: str) -> int:
        return int(self.admin("progress", id=session)["sent"])


@pytest.fixture(scope="module")
def ws_upstreams() -> Iterator[tuple[WsUpstream, WsUpstream]]:
    a, b = WsUpstream("wa"), WsUpstream("wb")
    try:
        a.start(wait=False)
        b.start(wait=False)
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def wa(ws_upstreams: tuple[WsUpstream, WsUpstream]) -> WsUpstream:
    ws_upstreams[0].ensure_running()
    ws_upstreams[0].admin("reset")
    return ws_upstreams[0]


@pytest.fixture
def wb(ws_upstreams: tuple[WsUpstream, WsUpstream]) -> WsUpstream:
    ws_upstreams[1].ensure_running()
    ws_upstreams[1].admin("reset")
    return ws_upstreams[1]


# -- helpers -----------------------------------------------------------------------------------


_DEFAULT: Any = object()


def config(
    *urls: str,
    max_message_size: int | None = _DEFAULT,
    preserve_host: bool = False,
    **upstream: Any,
) -> dict[str, Any]:
    """A gateway config with one WebSocket route; messages up to 16 MiB unless `max_message_size` says."""
    spec: dict[str, Any] = {
        "servers": [{"url": url} for url in urls],
        "retry": {"backoff_base": 0.001, "backoff_max": 0.002},
        "timeouts": {"connect": 2.0, "read": 5.0, "total": 10.0},
    }
    spec.update(upstream)
    route: dict[str, Any] = {"path": ROUTE, "upstream": "ws", "preserve_host": preserve_host}
    route["max_message_size"] = 16 * MiB if max_message_size is _DEFAULT else max_message_size
    return {"routes": [route], "upstreams": {"ws": spec}, "status_path": "/-/status"}


@contextlib.contextmanager
def gateway(cfg: dict[str, Any], *, server: dict[str, Any] | None = None, **kwargs: Any) -> Iterator[str]:
    """The test host app behind `GatewayMiddleware(config=cfg)` under uvicorn; yields its ws:// base URL.

    `server` holds options for the uvicorn server in front (`ws_max_size`, ...).
    """
    with serve_app(make_host_app(cfg, **kwargs), **(server or {})) as url:
        yield "ws" + url[len("http") :]


def session_id() -> str:
    return uuid.uuid4().hex[:12]


@contextlib.asynccontextmanager
async def ws(url: str, **kwargs: Any) -> AsyncIterator[Any]:
    from websockets.asyncio.client import connect

    kwargs.setdefault("proxy", None)
    kwargs.setdefault("open_timeout", 10)
    kwargs.setdefault("max_size", None)
    async with connect(url, **kwargs) as connection:
        yield connection


async def ask(connection: Any, command: str) -> Any:
    await connection.send(command)
    with anyio.fail_after(10):
        return await connection.recv()


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0, message: str = "condition") -> Any:
    """Poll `predicate` (a quick blocking call) until it is truthy; fail at the deadline."""
    try:
        with anyio.fail_after(timeout):
            while not (value := predicate()):
                await anyio.sleep(0.02)
            return value
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {message}") from None


def close_event(upstream: WsUpstream, session: str) -> Callable[[], dict[str, Any] | None]:
    def find() -> dict[str, Any] | None:
        return next((e for e in upstream.events(session) if e["kind"] == "disconnect"), None)

    return find


def header(info: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in info["headers"] if key == name]


pytestmark = pytest.mark.anyio


# -- messages ----------------------------------------------------------------------------------


async def test_text_binary_and_fragmented_messages_are_echoed(wa: WsUpstream) -> None:
    with gateway(config(wa.url)) as base:
        async with ws(f"{base}{ROUTE}/echo?id={session_id()}") as connection:
            assert await ask(connection, "hello") == "hello"
            assert await ask(connection, "héllo wörld ✓") == "héllo wörld ✓"
            await connection.send(b"\x00\x01binary\xff")
            assert await connection.recv() == b"\x00\x01binary\xff"
            # A message in three fragments reaches the upstream, and comes back, whole.
            await connection.send([b"frag", b"ment", b"ed"])
            assert await connection.recv() == b"fragmented"
            await connection.send(["te", "xt"])
            assert await connection.recv() == "text"
            assert await ask(connection, "") == ""
            # Pings are answered (by the gateway's server, as the library does).
            with anyio.fail_after(5):
                await (await connection.ping())


async def test_16_mib_messages_both_ways(wa: WsUpstream) -> None:
    binary = hashlib.sha256(b"seed").digest() * (16 * MiB // 32)
    text = ("0123456789abcdef" * (MiB // 16)) * 16
    assert len(binary) == len(text) == 16 * MiB
    with gateway(config(wa.url)) as base:
        async with ws(f"{base}{ROUTE}/echo?id={session_id()}") as connection:
            with anyio.fail_after(60):
                await connection.send(binary)
                echoed = await connection.recv()
                assert (
                    isinstance(echoed, bytes)
                    and hashlib.sha256(echoed).digest() == hashlib.sha256(binary).digest()
                )
                await connection.send(text)
                echoed = await connection.recv()
                assert isinstance(echoed, str) and echoed == text


async def test_messages_over_the_route_limit_close_with_1009(wa: WsUpstream) -> None:
    from websockets.exceptions import ConnectionClosed

    with gateway(config(wa.url, max_message_size=4096)) as base:
        session = session_id()
        async with ws(f"{base}{ROUTE}/echo?id={session}") as connection:
            assert await ask(connection, "x" * 4096) == "x" * 4096
            await connection.send(b"x" * 4097)
            with anyio.fail_after(10), pytest.raises(ConnectionClosed) as caught:
                await connection.recv()
        assert caught.value.rcvd is not None and caught.value.rcvd.code == 1009
        closed = await eventually(close_event(wa, session), message="the upstream's close")
        assert closed["code"] == 1001

        # An upstream message over the limit: the gateway's client refuses it.
        async with ws(f"{base}{ROUTE}/echo?id={session_id()}") as connection:
            await connection.send("cmd:big:5000")
            with anyio.fail_after(10), pytest.raises(ConnectionClosed) as caught:
                await connection.recv()
        assert caught.value.rcvd is not None and caught.value.rcvd.code == 1009


async def test_max_message_size_not_max_body_size_limits_messages(wa: WsUpstream) -> None:
    from websockets.exceptions import ConnectionClosed

    async def limit_is(base: str, limit: int) -> None:
        async with ws(f"{base}{ROUTE}/echo?id={session_id()}", compression=None) as connection:
            assert await ask(connection, b"x" * limit) == b"x" * limit
            await connection.send(b"x" * (limit + 1))
            with anyio.fail_after(10), pytest.raises(ConnectionClosed) as caught:
                await connection.recv()
        assert caught.value.rcvd is not None
        assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (
            1009,
            f"message over the limit of {limit} bytes",
        )

    # The default: 1 MiB, whatever the HTTP body limit.
    cfg = config(wa.url)
    del cfg["routes"][0]["max_message_size"]
    cfg["max_body_size"] = 16 * MiB
    with gateway(cfg) as base:
        await limit_is(base, MiB)
    # The gateway-wide key, inherited by the route; a route's own value wins over it.
    cfg["max_message_size"] = 4096
    with gateway(cfg) as base:
        await limit_is(base, 4096)
    cfg["routes"][0]["max_message_size"] = 8192
    with gateway(cfg) as base:
        await limit_is(base, 8192)


async def test_the_message_limit_counts_utf8_bytes_of_text_both_ways(wa: WsUpstream) -> None:
    from websockets.exceptions import ConnectionClosed

    with gateway(config(wa.url, max_message_size=20)) as base:
        session = session_id()
        async with ws(f"{base}{ROUTE}/echo?id={session}") as connection:
            # 10 characters of 2 bytes each: exactly at the limit.
            assert await ask(connection, "é" * 10) == "é" * 10
            assert await ask(connection, "x" * 20) == "x" * 20
            # 20 characters, 40 bytes: refused before it reaches the upstream.
            await connection.send("é" * 20)
            with anyio.fail_after(10), pytest.raises(ConnectionClosed) as caught:
                await connection.recv()
        assert caught.value.rcvd is not None
        assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (
            1009,
            "message over the limit of 20 bytes",
        )
        closed = await eventually(close_event(wa, session), message="the upstream's close")
        assert closed["code"] == 1001

        # From the upstream: 11 characters of 2 bytes each (22 bytes) are over the limit.
        async with ws(f"{base}{ROUTE}/echo?id={session_id()}") as connection:
            assert await ask(connection, "cmd:say:10:é") == "é" * 10
            assert await ask(connection, "cmd:say:5:✓") == "✓" * 5  # 15 bytes
            await connection.send("cmd:say:11:é")
            with anyio.fail_after(10), pytest.raises(ConnectionClosed) as caught:
                await connection.recv()
        assert caught.value.rcvd is not None and caught.value.rcvd.code == 1009


async def test_a_message_over_the_front_servers_limit_closes_the_client_with_1009(wa: WsUpstream) -> None:
    from websockets.exceptions import ConnectionClosed

    with gateway(config(wa.url), server={"ws_max_size": 64 * 1024}) as base:
        session = session_id()
        async with ws(f"{base}{ROUTE}/echo?id={session}", compression=None) as connection:
            assert await ask(connection, "x" * 1000) == "x" * 1000
            await connection.send(b"x" * (64 * 1024 + 1))
            with anyio.fail_after(10), pytest.raises(ConnectionClosed) as caught:
                await connection.recv()
        assert caught.value.rcvd is not None and caught.value.rcvd.code == 1009
        # uvicorn's own close code and reason go on to the upstream.
        closed = await eventually(close_event(wa, session), message="the upstream's close")
        assert (closed["code"], closed["reason"]) == (1009, caught.value.rcvd.reason)


async def test_the_front_server_failing_the_connection_mid_relay_is_no_gateway_error(
    wa: WsUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    from asgi_gateway._websocket import CLOSE_TIMEOUT

    # uvicorn fails the connection (message over its limit) while the gateway is relaying the
    # upstream's messages: its send() raises RuntimeError, not OSError, until the socket is gone.
    caplog.set_level(logging.INFO, logger="asgi_gateway")
    with gateway(config(wa.url), server={"ws_max_size": 64 * 1024}) as base:
        session = session_id()
        async with ws(f"{base}{ROUTE}/echo?id={session}", compression=None) as connection:
            await connection.send("cmd:burst:4000:16384")
            with anyio.fail_after(10):
                assert len(await connection.recv()) == 16384
            with contextlib.suppress(ConnectionError):
                await connection.send(b"x" * (64 * 1024 + 1))
            with anyio.fail_after(20):
                with contextlib.suppress(Exception):
                    while True:
                        await connection.recv()
        closed = await eventually(close_event(wa, session), message="the upstream's close")

        def access_record() -> Any:
            return next((r for r in caplog.records if r.name == "asgi_gateway.access"), None)

        # The session ends at once: the messages the upstream had sent already are dropped
        # so that its close frame, behind them, gets through before the close timeout.
        record = await eventually(access_record, timeout=CLOSE_TIMEOUT - 2, message="the access record")
    assert closed["code"] == 1009
    assert record.__dict__["websocket_closed_by"] == "client"
    assert record.__dict__["websocket_close_code"] == 1009
    assert record.__dict__["error"] is None
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors


async def test_back_pressure_holds_the_upstream_when_the_client_does_not_read(wa: WsUpstream) -> None:
    session = session_id()
    count, size = 200, MiB
    with gateway(config(wa.url)) as base:
        # No compression: a compressed stream of these messages would fit in the socket buffers.
        async with ws(f"{base}{ROUTE}/echo?id={session}", max_queue=1, compression=None) as connection:
            await connection.send(f"cmd:burst:{count}:{size}")
            # The upstream's sends stall once the buffers on the way are full: they never
            # hold more than a bounded number of messages while the client reads nothing.
            seen: list[int] = []

            def stalled() -> bool:
                seen.append(wa.progress(session))
                return len(seen) > 25 and seen[-1] == seen[-26] > 0

            await eventually(stalled, timeout=30, message="the upstream's sends to stall")
            assert seen[-1] < count // 2, f"{seen[-1]} of {count} messages of 1 MiB went out unread"
            with anyio.fail_after(60):
                for index in range(count):
                    message = await connection.recv()
                    assert len(message) == size and message[:4] == index.to_bytes(4, "big")
        assert wa.progress(session) == count


# -- handshake ---------------------------------------------------------------------------------


async def test_subprotocol_negotiation_passes_through(wa: WsUpstream) -> None:
    with gateway(config(wa.url)) as base:
        async with ws(
            f"{base}{ROUTE}/echo?id={session_id()}", subprotocols=["chat.v1", "chat.v2"]
        ) as connection:
            # The upstream prefers the newest version it knows; the client gets its choice.
            assert connection.subprotocol == "chat.v2"
            info = json.loads(await ask(connection, "cmd:info"))
            assert info["offered"] == ["chat.v1", "chat.v2"]
            assert info["subprotocol"] == "chat.v2"
        async with ws(f"{base}{ROUTE}/echo?id={session_id()}", subprotocols=["other"]) as connection:
            assert connection.subprotocol is None
            info = json.loads(await ask(connection, "cmd:info"))
            assert info["offered"] == ["other"]
        async with ws(f"{base}{ROUTE}/echo?id={session_id()}") as connection:
            assert connection.subprotocol is None
            assert json.loads(await ask(connection, "cmd:info"))["offered"] == []


async def test_request_headers_follow_the_gateway_rules(wa: WsUpstream) -> None:
    with gateway(config(wa.url)) as base:
        url = f"{base}{ROUTE}/room;v=1/a%20b?id={session_id()}&a=1&a=2&flag"
        headers = {
            "Cookie": "session=abc; theme=dark",
            "Authorization": "Bearer token-1",
            "X-Request-Id": "client-id-42",
            "X-Forwarded-For": "203.0.113.9",
            "X-Custom": "kept",
            "User-Agent": "test-client/1",
        }
        async with ws(url, additional_headers=headers, origin="http://app.example") as connection:
            assert connection.response.headers["x-request-id"] == "client-id-42"
            # Headers of the upstream's 101 answer reach the client with the accept.
            assert connection.response.headers["set-cookie"] == "upstream=wa"
            assert connection.response.headers.get_all("server") == ["uvicorn"]
            info = json.loads(await ask(connection, "cmd:info"))
    assert info["raw_path"] == f"{ROUTE}/room;v=1/a%20b"
    assert info["query_string"].endswith("&a=1&a=2&flag")
    assert header(info, "host") == [f"127.0.0.1:{wa.port}"]
    assert header(info, "cookie") == ["session=abc; theme=dark"]
    assert header(info, "authorization") == ["Bearer token-1"]
    assert header(info, "x-request-id") == ["client-id-42"]
    # The client is not a trusted proxy: its X-Forwarded-For is replaced.
    assert header(info, "x-forwarded-for") == ["127.0.0.1"]
    assert header(info, "x-forwarded-proto") == ["http"]
    assert header(info, "x-forwarded-host") == [base.split("//")[1]]
    assert header(info, "x-custom") == ["kept"]
    assert header(info, "user-agent") == ["test-client/1"]
    assert header(info, "origin") == ["http://app.example"]
    # The handshake's own headers are the gateway's client's, once each; no compression offered.
    assert header(info, "upgrade") == ["websocket"]
    assert len(header(info, "sec-websocket-key")) == 1
    assert header(info, "sec-websocket-version") == ["13"]
    assert header(info, "sec-websocket-extensions") == []
    names = [name for name, _ in info["headers"]]
    assert len(names) == len(set(names)), names


async def test_preserve_host_sends_the_clients_host(wa: WsUpstream) -> None:
    with gateway(config(wa.url, preserve_host=True)) as base:
        # The client names another host in the URL (so in Host) but connects to the gateway.
        port = int(base.rsplit(":", 1)[1])
        async with ws(
            f"ws://chat.example:8443{ROUTE}/echo?id={session_id()}", host="127.0.0.1", port=port
        ) as connection:
            info = json.loads(await ask(connection, "cmd:info"))
    assert header(info, "host") == ["chat.example:8443"]
    assert header(info, "x-forwarded-host") == ["chat.example:8443"]


async def test_an_upstream_refusal_reaches_the_client_without_retries(wa: WsUpstream, wb: WsUpstream) -> None:
    from websockets.exceptions import InvalidStatus

    with gateway(config(wa.url, wb.url)) as base:
        with pytest.raises(InvalidStatus) as caught:
            async with ws(f"{base}{ROUTE}/echo?id={session_id()}&refuse=403"):
                pass
    response = caught.value.response
    assert response.status_code == 403
    assert response.body.startswith(b"refused by w")
    assert response.headers["x-refused-by"] in ("wa", "wb")
    assert "x-request-id" in response.headers
    assert wa.handshakes() + wb.handshakes() == 1


# -- close codes -------------------------------------------------------------------------------


async def test_an_upstream_redirect_reaches_the_client_unfollowed(wa: WsUpstream) -> None:
    handshake = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    with gateway(config(wa.url)) as base:
        # A raw handshake: a WebSocket client library would follow the redirect itself.
        response = raw_request(
            "http" + base[2:], target=f"{ROUTE}/echo?id={session_id()}&refuse=307", headers=handshake
        )
    assert response.status == 307
    assert response.header("location") == b"ws://elsewhere.example/ws"
    assert response.body == b"refused by wa"
    assert wa.handshakes() == 1


async def test_upstream_close_code_and_reason_reach_the_client(wa: WsUpstream) -> None:
    from websockets.exceptions import ConnectionClosed

    with gateway(config(wa.url)) as base:
        for code, reason in [(4001, "bye from upstream"), (1000, ""), (1008, "policy")]:
            async with ws(f"{base}{ROUTE}/echo?id={session_id()}") as connection:
                await connection.send(f"cmd:close:{code}:{reason}")
                with anyio.fail_after(10), pytest.raises(ConnectionClosed) as caught:
                    await connection.recv()
                assert caught.value.rcvd is not None
                assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (code, reason)


async def test_client_close_code_and_reason_reach_the_upstream(wa: WsUpstream) -> None:
    with gateway(config(wa.url)) as base:
        for code, reason in [(4002, "bye from client"), (1000, "done")]:
            session = session_id()
            async with ws(f"{base}{ROUTE}/echo?id={session}") as connection:
                assert await ask(connection, "ping") == "ping"
                await connection.close(code, reason)
            closed = await eventually(close_event(wa, session), message="the upstream's close")
            assert (closed["code"], closed["reason"]) == (code, reason)


async def test_a_client_that_vanishes_closes_the_upstream_socket(wa: WsUpstream) -> None:
    with gateway(config(wa.url)) as base:
        session = session_id()
        async with ws(f"{base}{ROUTE}/echo?id={session}") as connection:
            assert await ask(connection, "ping") == "ping"
            connection.transport.abort()
        closed = await eventually(close_event(wa, session), message="the upstream's close")
        assert closed["code"] == 1001


async def test_an_upstream_killed_mid_session_closes_the_client_with_1011(wa: WsUpstream) -> None:
    from websockets.exceptions import ConnectionClosed

    with gateway(config(wa.url)) as base:
        async with ws(f"{base}{ROUTE}/echo?id={session_id()}") as connection:
            assert await ask(connection, "ping") == "ping"
            wa.kill()
            with anyio.fail_after(10), pytest.raises(ConnectionClosed) as caught:
                await connection.recv()
        assert caught.value.rcvd is not None and caught.value.rcvd.code == 1011


async def test_a_gateway_shutting_down_closes_both_ends(wa: WsUpstream) -> None:
    from websockets.exceptions import ConnectionClosed

    session = session_id()
    async with contextlib.AsyncExitStack() as stack:
        with gateway(config(wa.url)) as base:
            connection = await stack.enter_async_context(ws(f"{base}{ROUTE}/echo?id={session}"))
            assert await ask(connection, "ping") == "ping"
        # uvicorn's shutdown tells the client 1012 (service restart); the gateway passes it upstream.
        with anyio.fail_after(10), pytest.raises(ConnectionClosed) as caught:
            await connection.recv()
    assert caught.value.rcvd is not None and caught.value.rcvd.code == 1012
    closed = await eventually(close_event(wa, session), message="the upstream's close")
    assert closed["code"] == 1012


# -- failover ----------------------------------------------------------------------------------


async def test_handshake_fails_over_from_a_closed_port_and_outlier_detection_counts_it(
    wa: WsUpstream,
) -> None:
    import httpx

    dead = f"http://127.0.0.1:{free_port()}"
    cfg = config(dead, wa.url, outlier_detection={"consecutive_failures": 2, "base_ejection_time": 60})
    with gateway(cfg) as base:
        for _ in range(4):
            async with ws(f"{base}{ROUTE}/echo?id={session_id()}") as connection:
                assert await ask(connection, "cmd:whoami") == "wa"
        status = httpx.get("http" + base[2:] + "/-/status").json()
    servers = {server["url"]: server for server in status["upstreams"]["ws"]["servers"]}
    assert servers[dead]["ejected"] is True
    assert servers[dead]["last_failure"] == "connect-failure"
    assert servers[wa.url]["ejected"] is False


async def test_handshake_fails_over_past_broken_servers_of_every_kind(wa: WsUpstream, wb: WsUpstream) -> None:
    wb.admin("refuse", status=503)
    with contextlib.ExitStack() as stack:
        broken = [stack.enter_context(BrokenServer(mode)) for mode in ("garbage", "silent", "close", "reset")]
        cfg = config(
            *(server.url for server in broken),
            wb.url,
            wa.url,
            retry={"attempts": 6, "backoff_base": 0.001, "backoff_max": 0.002},
            timeouts={"connect": 2.0, "read": 0.5, "total": 10.0},
        )
        with gateway(cfg) as base:
            for _ in range(2):
                async with ws(f"{base}{ROUTE}/echo?id={session_id()}") as connection:
                    assert await ask(connection, "cmd:whoami") == "wa"


async def test_all_servers_down_refuses_the_handshake_with_502(wa: WsUpstream) -> None:
    from websockets.exceptions import InvalidStatus

    cfg = config(f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}")
    with gateway(cfg) as base:
        with pytest.raises(InvalidStatus) as caught:
            async with ws(f"{base}{ROUTE}/echo?id={session_id()}"):
                pass
    response = caught.value.response
    assert response.status_code == 502
    body = json.loads(response.body)
    assert body["error"] == "bad_gateway"
    assert body["request_id"] == response.headers["x-request-id"]


async def test_refusals_by_every_server_end_with_the_last_one(wa: WsUpstream, wb: WsUpstream) -> None:
    from websockets.exceptions import InvalidStatus

    wa.admin("refuse", status=503)
    wb.admin("refuse", status=503)
    with gateway(config(wa.url, wb.url)) as base:
        with pytest.raises(InvalidStatus) as caught:
            async with ws(f"{base}{ROUTE}/echo?id={session_id()}"):
                pass
    assert caught.value.response.status_code == 503
    assert wa.handshakes() + wb.handshakes() == 3  # retry.attempts


# -- balancing ---------------------------------------------------------------------------------


async def test_consistent_hash_keeps_a_users_sockets_on_one_server(wa: WsUpstream, wb: WsUpstream) -> None:
    cfg = config(wa.url, wb.url, balancer="consistent_hash", hash_on="header:x-user-id")
    placement: dict[str, set[str]] = {}
    with gateway(cfg) as base:
        for user in [f"user-{n}" for n in range(12)]:
            for _ in range(3):
                async with ws(
                    f"{base}{ROUTE}/echo?id={session_id()}", additional_headers={"X-User-Id": user}
                ) as connection:
                    placement.setdefault(user, set()).add(await ask(connection, "cmd:whoami"))
    assert all(len(servers) == 1 for servers in placement.values()), placement
    assert set().union(*placement.values()) == {"wa", "wb"}


async def test_least_connections_counts_open_sessions(wa: WsUpstream, wb: WsUpstream) -> None:
    with gateway(config(wa.url, wb.url, balancer="least_connections")) as base:
        async with contextlib.AsyncExitStack() as stack:
            names = []
            for _ in range(4):
                connection = await stack.enter_async_context(ws(f"{base}{ROUTE}/echo?id={session_id()}"))
                names.append(await ask(connection, "cmd:whoami"))
    assert sorted(names) == ["wa", "wa", "wb", "wb"]


# -- telemetry ---------------------------------------------------------------------------------


async def test_a_span_per_session_with_message_counts_and_an_open_sessions_metric(
    wa: WsUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])

    def open_sessions() -> int | None:
        data = reader.get_metrics_data()
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "gateway.websocket.sessions":
                        return sum(point.value for point in metric.data.data_points)
        return None

    caplog.set_level(logging.INFO, logger="asgi_gateway.access")
    with gateway(config(wa.url), tracer_provider=tracer_provider, meter_provider=meter_provider) as base:
        async with ws(f"{base}{ROUTE}/echo?id={session_id()}") as connection:
            for text in ("one", "two"):
                assert await ask(connection, text) == text
            info = json.loads(await ask(connection, "cmd:info"))
            assert open_sessions() == 1
            await connection.close(4000, "done")

        def session_span() -> Any:
            return next((s for s in exporter.get_finished_spans() if s.name == f"WebSocket {ROUTE}"), None)

        span = await eventually(session_span, message="the session span")
        await eventually(lambda: open_sessions() == 0, message="the sessions metric back to 0")
    attributes = dict(span.attributes)
    assert span.kind is SpanKind.SERVER
    assert attributes["gateway.websocket.messages.client_to_upstream"] == 3
    assert attributes["gateway.websocket.messages.upstream_to_client"] == 3
    assert attributes["gateway.websocket.close.code"] == 4000
    assert attributes["gateway.websocket.closed_by"] == "client"
    assert attributes["http.response.status_code"] == 101
    assert attributes["http.route"] == ROUTE
    assert attributes["gateway.upstream"] == "ws"
    clients = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert len(clients) == 1 and clients[0].parent is not None
    assert clients[0].parent.span_id == span.context.span_id
    assert clients[0].attributes is not None and clients[0].attributes["http.response.status_code"] == 101
    # The upstream's handshake carries the CLIENT span as its parent.
    (traceparent,) = header(info, "traceparent")
    assert traceparent.split("-")[2] == f"{clients[0].context.span_id:016x}"
    (record,) = [r for r in caplog.records if r.name == "asgi_gateway.access"]
    assert record.__dict__["status"] == 101 and record.__dict__["websocket_close_code"] == 4000
    assert record.__dict__["server"] == wa.url and record.__dict__["attempts"] == 1


async def test_a_broken_propagator_costs_a_session_its_parent_not_its_span(
    wa: WsUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    # Sessions and requests share the span's set-up: a propagator that raises is reported
    # once, and the session is still traced (without the client's parent).
    from opentelemetry import propagate
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    class Raising(TextMapPropagator):
        def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
            raise RuntimeError("extract")

        def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
            raise RuntimeError("inject")

        @property
        def fields(self) -> set[str]:
            return {"traceparent"}

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(Raising())
    try:
        with caplog.at_level(logging.WARNING, logger="asgi_gateway.telemetry"):
            with gateway(config(wa.url), tracer_provider=tracer_provider) as base:
                async with ws(f"{base}{ROUTE}/echo?id={session_id()}") as connection:
                    assert await ask(connection, "one") == "one"

                def session_span() -> Any:
                    return next(
                        (s for s in exporter.get_finished_spans() if s.name == f"WebSocket {ROUTE}"), None
                    )

                span = await eventually(session_span, message="the session span")
    finally:
        propagate.set_global_textmap(previous)
    assert span.parent is None
    assert (
        span.attributes is not None and span.attributes["gateway.websocket.messages.client_to_upstream"] == 1
    )
    places = [
        r.args[0] for r in caplog.records if r.name == "asgi_gateway.telemetry" and isinstance(r.args, tuple)
    ]
    assert "trace context extraction" in places


# -- without asyncio or without the library --------------------------------------------------


class _FakeClient:
    """An ASGI websocket client in-process: only the handshake matters here."""

    def __init__(self, extensions: dict[str, Any] | None = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.scope: dict[str, Any] = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "scheme": "ws",
            "path": f"{ROUTE}/echo",
            "raw_path": f"{ROUTE}/echo".encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"gateway.test")],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 80),
            "subprotocols": [],
        }
        if extensions is not None:
            self.scope["extensions"] = extensions

    async def receive(self) -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_under_trio_the_handshake_is_refused_with_a_clear_error(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    from asgi_gateway import Gateway

    gw = Gateway(config("http://127.0.0.1:9"))
    client = _FakeClient()
    with caplog.at_level(logging.ERROR, logger="asgi_gateway"):
        await gw(client.scope, client.receive, client.send)
    assert client.sent == [{"type": "websocket.close", "code": 1011}]
    assert any("runs on asyncio only, not on trio" in record.getMessage() for record in caplog.records)


async def test_without_the_library_the_handshake_is_refused_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from asgi_gateway import Gateway
    from asgi_gateway._websocket import warn_if_unavailable

    gw = Gateway(config("http://127.0.0.1:9"))
    monkeypatch.setitem(sys.modules, "websockets.asyncio.client", None)
    with caplog.at_level(logging.INFO, logger="asgi_gateway"):
        assert warn_if_unavailable() is True
        client = _FakeClient({"websocket.http.response": {}})
        await gw(client.scope, client.receive, client.send)
    start, body = client.sent
    assert start["type"] == "websocket.http.response.start" and start["status"] == 500
    assert "asgi-gateway[websockets]" in json.loads(body["body"])["detail"]
    messages = [record.getMessage() for record in caplog.records]
    assert any("will be refused" in m and "asgi-gateway[websockets]" in m for m in messages)
    assert any("refused a WebSocket handshake" in m and "asgi-gateway[websockets]" in m for m in messages)


async def test_without_the_http_response_extension_a_refusal_is_a_close_with_1014() -> None:
    from asgi_gateway import Gateway

    gw = Gateway(config(f"http://127.0.0.1:{free_port()}"))
    client = _FakeClient()
    await gw(client.scope, client.receive, client.send)
    assert client.sent == [{"type": "websocket.close", "code": 1014}]


async def test_without_the_http_response_extension_an_edge_refusal_is_a_close_with_1008() -> None:
    from asgi_gateway import Gateway

    cfg = config(f"http://127.0.0.1:{free_port()}")
    cfg["routes"][0]["deny_ips"] = ["127.0.0.0/8"]
    gw = Gateway(cfg)
    client = _FakeClient()
    await gw(client.scope, client.receive, client.send)
    assert client.sent == [{"type": "websocket.close", "code": 1008}]


@pytest.mark.parametrize(("status", "code"), [(403, 1008), (307, 1008), (500, 1011), (503, 1013)])
async def test_without_the_http_response_extension_an_upstreams_refusal_closes_by_the_one_rule(
    wa: WsUpstream, status: int, code: int
) -> None:
    from asgi_gateway import Gateway

    # Retries only on 502/503/504, so the 503 is the last of three: the upstream's refusal each time.
    gw = Gateway(config(wa.url))
    client = _FakeClient()
    client.scope["query_string"] = f"id={session_id()}&refuse={status}".encode()
    await gw(client.scope, client.receive, client.send)
    assert client.sent == [{"type": "websocket.close", "code": code}]
    assert wa.handshakes() == (3 if status == 503 else 1)


async def test_without_the_http_response_extension_nothing_available_closes_with_1013() -> None:
    from asgi_gateway import Gateway

    dead = f"http://127.0.0.1:{free_port()}"
    gw = Gateway(config(dead, retry={"attempts": 1}, outlier_detection={"consecutive_failures": 1}))
    codes = []
    for _ in range(2):
        client = _FakeClient()
        await gw(client.scope, client.receive, client.send)
        codes.append(client.sent)
    # The connect failure ejects the only server (502: bad gateway); then nothing is available
    # (503 upstream_unavailable, with Retry-After: try again later).
    assert codes == [[{"type": "websocket.close", "code": 1014}], [{"type": "websocket.close", "code": 1013}]]


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [("/elsewhere", 404, "not_found"), ("no-slash", 400, "bad_request")],
)
async def test_a_mounted_gateway_refuses_unroutable_handshakes_as_it_refuses_requests(
    path: str, status: int, error: str
) -> None:
    from asgi_gateway import Gateway

    gw = Gateway(config(f"http://127.0.0.1:{free_port()}"))
    for extensions in ({"websocket.http.response": {}}, None):
        client = _FakeClient(extensions)
        client.scope["path"] = path
        client.scope["raw_path"] = path.encode()
        await gw(client.scope, client.receive, client.send)
        if extensions is None:
            assert client.sent == [{"type": "websocket.close", "code": 1008}]
        else:
            start, body = client.sent
            assert start["status"] == status
            assert json.loads(body["body"])["error"] == error


async def test_with_the_library_nothing_is_logged_at_start_up(caplog: pytest.LogCaptureFixture) -> None:
    from asgi_gateway._websocket import warn_if_unavailable

    with caplog.at_level(logging.INFO, logger="asgi_gateway"):
        assert warn_if_unavailable() is False
    assert not caplog.records


# -- the upstream app (run as a subprocess) ----------------------------------------------------

NAME = os.environ.get("UPSTREAM_NAME", "ws")
EVENTS: dict[str, list[dict[str, Any]]] = {}
PROGRESS: dict[str, int] = {}
STATE: dict[str, int] = {"handshakes": 0, "refuse": 0}


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await _admin(scope, send)
    elif scope["type"] == "websocket":
        await _websocket(scope, receive, send)


async def _admin(scope: dict[str, Any], send: Any) -> None:
    query = {key: values[-1] for key, values in parse_qs(scope["query_string"].decode()).items()}
    op = scope["path"].rsplit("/", 1)[-1]
    result: Any
    if op == "ping":
        result = "pong"
    elif op == "reset":
        STATE.update(handshakes=0, refuse=0)
        result = {"ok": True}
    elif op == "refuse":
        STATE["refuse"] = int(query.get("status", "0"))
        result = {"ok": True}
    elif op == "stats":
        result = STATE
    elif op == "events":
        result = {"events": EVENTS.get(query.get("id", ""), [])}
    elif op == "progress":
        result = {"sent": PROGRESS.get(query.get("id", ""), 0)}
    else:
        result = {"error": "unknown"}
    body = result.encode() if isinstance(result, str) else json.dumps(result).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})


async def _websocket(scope: dict[str, Any], receive: Any, send: Any) -> None:
    STATE["handshakes"] += 1
    query = {key: values[-1] for key, values in parse_qs(scope["query_string"].decode()).items()}
    session = query.get("id", "-")
    events = EVENTS.setdefault(session, [])
    await receive()  # websocket.connect
    refuse = STATE["refuse"] or int(query.get("refuse", "0"))
    if refuse:
        events.append({"kind": "refused", "status": refuse})
        headers = [(b"content-type", b"text/plain"), (b"x-refused-by", NAME.encode())]
        if 300 <= refuse < 400:
            headers.append((b"location", b"ws://elsewhere.example/ws"))
        await send({"type": "websocket.http.response.start", "status": refuse, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": f"refused by {NAME}".encode()})
        return
    offered: list[str] = list(scope.get("subprotocols") or [])
    chosen = next((name for name in reversed(offered) if name.startswith("chat.")), None)
    await send(
        {
            "type": "websocket.accept",
            "subprotocol": chosen,
            "headers": [(b"set-cookie", b"upstream=" + NAME.encode())],
        }
    )
    events.append({"kind": "accepted"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            events.append(
                {"kind": "disconnect", "code": message.get("code"), "reason": message.get("reason") or ""}
            )
            return
        text = message.get("text")
        if text is None or not text.startswith("cmd:"):
            await send({"type": "websocket.send", "text": text, "bytes": message.get("bytes")})
            continue
        command, _, argument = text[4:].partition(":")
        if command == "whoami":
            await send({"type": "websocket.send", "text": NAME})
        elif command == "info":
            info = {
                "server": NAME,
                "raw_path": scope["raw_path"].decode("latin-1"),
                "query_string": scope["query_string"].decode("latin-1"),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
                "offered": offered,
                "subprotocol": chosen,
            }
            await send({"type": "websocket.send", "text": json.dumps(info)})
        elif command == "close":
            code, _, reason = argument.partition(":")
            await send({"type": "websocket.close", "code": int(code), "reason": reason})
            events.append({"kind": "closed", "code": int(code)})
            return
        elif command == "big":
            await send({"type": "websocket.send", "bytes": b"b" * int(argument)})
        elif command == "say":
            count, _, unit = argument.partition(":")
            await send({"type": "websocket.send", "text": unit * int(count)})
        elif command == "burst":
            count, size = (int(part) for part in argument.split(":"))
            try:
                for index in range(count):
                    await send(
                        {"type": "websocket.send", "bytes": index.to_bytes(4, "big") + bytes(size - 4)}
                    )
                    PROGRESS[session] = index + 1
            except OSError:
                # Closed mid-burst: the disconnect, with the gateway's close code, is queued.
                continue


if __name__ == "__main__":
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    arguments = parser.parse_args()
    uvicorn.run(
        upstream_app,
        host="127.0.0.1",
        port=arguments.port,
        log_level="warning",
        lifespan="off",
        ws_max_size=64 * MiB,
        ws_per_message_deflate=False,
    )
