"""End to end, through uvicorn and the gateway: the upstream answers the HTTP/1.1 client must not trust.

Each upstream is a `ScriptedServer` writing exact bytes (and resets) at exact points; the
client is a raw socket, so what reaches it (a final chunk or not, a 502, a closed connection)
is seen as it is on the wire.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from servers import (
    RawConnection,
    ScriptedServer,
    answer_each,
    http_client,
    read_head,
    reset_close,
    wait_until,
)

STATUS = "/-/status"


def config(url: str, **upstream: Any) -> dict[str, Any]:
    upstream.setdefault("retry", {"attempts": 1})
    return {
        "routes": [{"path": "/", "upstream": "up"}],
        "upstreams": {"up": {"servers": [{"url": url}], **upstream}},
        "status_path": STATUS,
    }


def server_status(gateway: str) -> dict[str, Any]:
    with http_client(gateway) as client:
        status: dict[str, Any] = client.get(STATUS).json()["upstreams"]["up"]["servers"][0]
    return status


def read_until(sock: socket.socket, done: Callable[[bytes], bool], data: bytes = b"") -> tuple[bytes, bool]:
    """Read until `done(data)` holds or the peer closes (or resets) the connection.

    Returns the bytes and whether the connection was closed. A socket timeout fails the test.
    """
    while not done(data):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def one_response(url: str, request: bytes) -> tuple[int, bytes]:
    with RawConnection.to(url) as conn:
        conn.send(request)
        response = conn.read_response()
    return response.status, response.body


# -- a close-delimited body ends only with a clean close ------------------------------------


@pytest.mark.parametrize("transport_kind", ["pool", "httpx"], indirect=True)
def test_close_delimited_body_cut_by_a_reset_aborts_the_response(gateway_factory: Callable[..., str]) -> None:
    first_relayed = threading.Event()

    def script(conn: socket.socket, n: int) -> None:
        read_head(conn)
        # Neither Content-Length nor chunked: the body runs to the end of the connection.
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part")
        first_relayed.wait(10)
        reset_close(conn)

    with ScriptedServer(script) as upstream:
        gateway = gateway_factory(config(upstream.url))
        with RawConnection.to(gateway, timeout=5) as client:
            client.send(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            response = client.read_response(max_body=len(b"first part"))
            assert response.status == 200
            assert response.body == b"first part"
            assert response.header("transfer-encoding") == b"chunked"
            first_relayed.set()
            rest, closed = read_until(client.sock, lambda data: b"0\r\n\r\n" in data)
        # Cut off: the client's connection is closed with no final chunk.
        assert closed
        assert b"0\r\n\r\n" not in rest
        # And outlier detection counts it as the failure it is.
        status = wait_until(lambda: (s := server_status(gateway))["consecutive_failures"] == 1 and s)
        assert status["last_failure"] == "body reset"


@pytest.mark.parametrize("transport_kind", ["pool", "httpx"], indirect=True)
def test_close_delimited_body_ended_by_a_clean_close_is_complete(gateway_factory: Callable[..., str]) -> None:
    def script(conn: socket.socket, n: int) -> None:
        read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        conn.shutdown(socket.SHUT_WR)  # a FIN
        while conn.recv(65536):
            pass

    with ScriptedServer(script) as upstream:
        gateway = gateway_factory(config(upstream.url))
        with RawConnection.to(gateway, timeout=5) as client:
            client.send(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            response = client.read_response()
        assert (response.status, response.body, response.complete) == (200, b"all of it", True)
        assert server_status(gateway)["last_failure"] is None


# -- an early answer while the client still uploads ---------------------------------------------


@pytest.mark.parametrize(
    "upstream_settings",
    [{"retry": {"attempts": 1}}, {"retry": {"attempts": 3, "buffer_limit": 65536}}],
    ids=["single-try", "over-buffer-limit"],
)
def test_early_answer_reaches_the_client_before_its_next_body_chunk(
    gateway_factory: Callable[..., str], upstream_settings: dict[str, Any]
) -> None:
    length = 100_000  # over buffer_limit: the body streams up in either case
    head_relayed = threading.Event()

    def script(conn: socket.socket, n: int) -> None:
        read_head(conn)
        # Refused on its head alone, as an auth check in front of an upload does.
        conn.sendall(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic\r\nConnection: close\r\n"
            b"Content-Length: 6\r\n\r\nden"
        )
        head_relayed.wait(10)
        conn.sendall(b"ied")
        while conn.recv(65536):
            pass

    with ScriptedServer(script) as upstream:
        gateway = gateway_factory(config(upstream.url, **upstream_settings))
        # The client sends its next chunk only once it has the answer: waiting for that chunk
        # before relaying the answer would run into this deadline.
        with RawConnection.to(gateway, timeout=3) as client:
            client.send(
                b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length + b"x" * 1000
            )
            started = time.monotonic()
            data, _ = read_until(client.sock, lambda data: b"\r\n\r\nden" in data)
            assert data.startswith(b"HTTP/1.1 401 "), data
            assert time.monotonic() - started < 2
            assert b"\r\nwww-authenticate: Basic\r\n" in data
            # The answer's body still streams to the client after its head.
            head_relayed.set()
            data, _ = read_until(client.sock, lambda data: data.endswith(b"denied"), data)
            assert data.endswith(b"\r\n\r\ndenied")
        assert upstream.connections == 1
        assert not upstream.errors


# -- responses the gateway refuses ------------------------------------------------------------


@pytest.mark.parametrize("transport_kind", ["pool", "httpx"], indirect=True)
@pytest.mark.parametrize(
    "response",
    [
        # The bytes stay gzip-coded: relayed without the header that says so, they would be garbage.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        # The gateway never asked to switch protocols.
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\nraw bytes",
    ],
    ids=["gzip", "gzip-chunked", "two-headers", "switching-protocols"],
)
def test_response_that_cannot_be_relayed_is_502(gateway_factory: Callable[..., str], response: bytes) -> None:
    with ScriptedServer(answer_each(response)) as upstream:
        gateway = gateway_factory(config(upstream.url))
        status, body = one_response(gateway, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 502, body
        assert b'"bad_gateway"' in body


@pytest.mark.parametrize("transport_kind", ["pool", "httpx"], indirect=True)
def test_interim_answers_are_skipped(gateway_factory: Callable[..., str]) -> None:
    response = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone"
    )
    with ScriptedServer(answer_each(response)) as upstream:
        gateway = gateway_factory(config(upstream.url))
        with RawConnection.to(gateway, timeout=5) as client:
            for _ in range(2):
                client.send(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
                response_read = client.read_response()
                assert (response_read.status, response_read.body) == (201, b"done")
                assert response_read.header("link") is None
        # Still one upstream connection: an interim answer does not spoil it.
        assert upstream.connections == 1


@pytest.mark.parametrize("transport_kind", ["pool", "httpx"], indirect=True)
def test_response_head_over_64_kib_is_502(gateway_factory: Callable[..., str]) -> None:
    response = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\nContent-Length: 2\r\n\r\nok"
    with ScriptedServer(answer_each(response)) as upstream:
        gateway = gateway_factory(config(upstream.url))
        status, body = one_response(gateway, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 502, body


# -- bodiless answers keep the connection ---------------------------------------------------------


@pytest.mark.parametrize("transport_kind", ["pool", "httpx"], indirect=True)
def test_head_answer_without_content_length_keeps_the_connection(gateway_factory: Callable[..., str]) -> None:
    # RFC 9112 6.3: an answer to HEAD has no body whatever its headers say.
    response = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
    with ScriptedServer(answer_each(response)) as upstream:
        gateway = gateway_factory(config(upstream.url))
        with RawConnection.to(gateway, timeout=5) as client:
            for _ in range(3):
                client.send(b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n")
                head = client.read_response()
                assert (head.status, head.body) == (200, b"")
        assert upstream.connections == 1
