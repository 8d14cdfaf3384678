"""End to end: bodies stream both ways with bounded memory, SSE chunk by chunk, raw bytes, disconnects.

The gateway runs in this process (uvicorn in a thread), so this process's RSS bounds its memory.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]
import pytest
from servers import (
    RawConnection,
    Upstreams,
    http_client,
    make_host_app,
    serve_app,
    transport_kwargs,
    wait_until,
)
from upstream_app import gzip_body, pattern_block, stream_sha256

MiB = 1024 * 1024
RSS_BOUND = 64 * MiB


def one_upstream_config(url: str, **upstream: Any) -> dict[str, Any]:
    return {
        "routes": [{"path": "/", "upstream": "one"}],
        "upstreams": {"one": {"servers": [{"url": url}], **upstream}},
        "max_body_size": None,
    }


@contextmanager
def serve_one_upstream(upstreams: Upstreams, transport_kind: str, **upstream: Any) -> Iterator[str]:
    """A gateway in front of `upstreams.u1`, with `upstream` as that upstream's settings."""
    config = one_upstream_config(upstreams.u1.url, **upstream)
    with serve_app(make_host_app(config, **transport_kwargs(transport_kind))) as url:
        yield url


def leave_an_endless_stream(url: str, upstreams: Upstreams, request: bytes) -> None:
    """Send `request` (to the endless /sse), leave after the first body byte, and wait for the
    gateway to cancel the upstream's stream."""
    with RawConnection.to(url) as conn:
        conn.send(request)
        response = conn.read_response(max_body=1)
        assert response.status == 200
    upstreams.u1.wait_disconnects("sse")


@pytest.fixture(scope="module")
def gateway(upstreams: Upstreams, transport_kind: str) -> Iterator[str]:
    with serve_one_upstream(upstreams, transport_kind) as url:
        yield url


class PeakRSS:
    def __init__(self) -> None:
        self.baseline = 0
        self.peak = 0

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


@contextmanager
def peak_rss() -> Iterator[PeakRSS]:
    """Sample this process's RSS every few milliseconds while the block runs."""
    process = psutil.Process()
    result = PeakRSS()
    result.baseline = result.peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            result.peak = max(result.peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join(5)
        result.peak = max(result.peak, process.memory_info().rss)


def test_large_download_streams_with_bounded_memory(gateway: str) -> None:
    n, size = 3200, 64 * 1024  # 200 MiB
    digest = hashlib.sha256()
    received = 0
    with peak_rss() as rss, http_client(gateway, timeout=30) as client:
        with client.stream("GET", f"/stream?n={n}&size={size}") as response:
            assert response.status_code == 200
            assert response.headers["content-length"] == str(n * size)
            for chunk in response.iter_raw():
                digest.update(chunk)
                received += len(chunk)
    assert received == n * size
    assert digest.hexdigest() == stream_sha256(n, size)
    assert rss.growth < RSS_BOUND, f"RSS grew by {rss.growth / MiB:.1f} MiB relaying {n * size / MiB:.0f} MiB"


def test_chunked_download_keeps_its_bytes(gateway: str) -> None:
    n, size = 256, 32 * 1024 + 7
    with http_client(gateway, timeout=30) as client:
        with client.stream("GET", f"/stream?n={n}&size={size}&chunked=1") as response:
            assert response.status_code == 200
            assert "content-length" not in response.headers
            body = b"".join(response.iter_raw())
    assert hashlib.sha256(body).hexdigest() == stream_sha256(n, size)


def test_large_upload_streams_with_bounded_memory(gateway: str) -> None:
    block = pattern_block(MiB)
    count = 200

    def body() -> Iterator[bytes]:
        for _ in range(count):
            yield block

    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(block)
    with peak_rss() as rss, http_client(gateway, timeout=30) as client:
        response = client.post("/upload", content=body(), headers={"content-length": str(count * MiB)})
    assert response.status_code == 200, response.text
    seen = response.json()
    assert seen["length"] == count * MiB
    assert seen["sha256"] == expected.hexdigest()
    assert rss.growth < RSS_BOUND, f"RSS grew by {rss.growth / MiB:.1f} MiB relaying {count} MiB upstream"


def test_chunked_upload_keeps_its_bytes(gateway: str) -> None:
    chunks = [pattern_block(1000 + i) for i in range(300)]
    with http_client(gateway, timeout=30) as client:
        response = client.put("/upload", content=iter(chunks))
    assert response.status_code == 200
    data = b"".join(chunks)
    assert response.json()["length"] == len(data)
    assert response.json()["sha256"] == hashlib.sha256(data).hexdigest()


def test_upload_reaches_upstream_before_the_body_ends(upstreams: Upstreams, gateway: str) -> None:
    total = 4 * MiB
    first = pattern_block(MiB)
    with RawConnection.to(gateway) as conn:
        conn.send(f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\n\r\n".encode() + first)
        # The upstream starts on this request while three quarters of the body are still unsent.
        wait_until(
            lambda: upstreams.u1.stats()["in_flight"].get("upload") == 1,
            message="the upload to start upstream",
        )
        for _ in range(3):
            conn.send(first)
        response = conn.read_response()
    assert response.status == 200
    assert response.json()["length"] == total
    assert response.json()["sha256"] == hashlib.sha256(first * 4).hexdigest()


def test_server_sent_events_arrive_one_by_one(upstreams: Upstreams, gateway: str) -> None:
    # Event i (i >= 1) is only produced once the test releases it after receiving event i-1,
    # so a gateway that buffered the response would never deliver event 0 (read timeout).
    n = 4
    received: list[str] = []
    with http_client(gateway, timeout=httpx.Timeout(10, read=5)) as client:
        with client.stream("GET", f"/sse?n={n}&gate=sse-test") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                received.append(line)
                if len(received) < n:
                    assert upstreams.u1.stats()["completed"].get("sse", 0) == 0
                    upstreams.u1.release("sse-test")
    assert received == [f"data: event {i}" for i in range(n)]


def test_gzip_body_is_relayed_untouched(gateway: str) -> None:
    expected = gzip_body(50_000)
    with RawConnection.to(gateway) as conn:
        conn.send(
            b"GET /gzip?size=50000 HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n"
        )
        response = conn.read_response()
    assert response.complete
    assert response.header("content-encoding") == b"gzip"
    assert response.header("content-length") == str(len(expected)).encode()
    assert response.header_list("content-length") == [str(len(expected)).encode()]
    assert "transfer-encoding" not in {k.decode() for k, _ in response.headers}
    assert response.body == expected


def test_gzip_body_is_relayed_untouched_without_accept_encoding(gateway: str) -> None:
    expected = gzip_body(20_000)
    with RawConnection.to(gateway) as conn:
        conn.send(b"GET /gzip HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = conn.read_response()
    assert response.header("content-encoding") == b"gzip"
    assert response.body == expected


def test_client_disconnect_mid_download_cancels_the_upstream_request(
    upstreams: Upstreams, gateway: str
) -> None:
    with RawConnection.to(gateway) as conn:
        conn.send(b"GET /stream?n=100000&size=4096&delay=0.01 HTTP/1.1\r\nHost: x\r\n\r\n")
        response = conn.read_response(max_body=8192)
        assert response.status == 200
    upstreams.u1.wait_disconnects("stream")
    # The gateway still works afterwards.
    with http_client(gateway, timeout=10) as client:
        assert client.get("/echo").status_code == 200


def test_client_disconnect_while_upstream_hangs_cancels_the_upstream_request(
    upstreams: Upstreams, gateway: str
) -> None:
    with RawConnection.to(gateway) as conn:
        conn.send(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(
            lambda: upstreams.u1.stats()["in_flight"].get("hang") == 1,
            message="the request to hang upstream",
        )
    started = time.monotonic()
    upstreams.u1.wait_disconnects("hang")
    # Well before any read timeout (30 s by default): the disconnect itself cancelled it.
    assert time.monotonic() - started < 10


def test_client_disconnect_mid_body_while_upstream_hangs(upstreams: Upstreams, gateway: str) -> None:
    with RawConnection.to(gateway) as conn:
        conn.send(b"GET /hang?head=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        response = conn.read_response(max_body=1024)
        assert response.status == 200
        assert response.body == b"x" * 1024
    upstreams.u1.wait_disconnects("hang")


def test_server_sent_events_client_disconnect_cancels_the_stream(upstreams: Upstreams, gateway: str) -> None:
    leave_an_endless_stream(gateway, upstreams, b"GET /sse?n=10&gate=never HTTP/1.1\r\nHost: x\r\n\r\n")


# -- a client that leaves after its streamed body ------------------------------------------


@pytest.fixture(scope="module")
def single_try_gateway(upstreams: Upstreams, transport_kind: str) -> Iterator[str]:
    with serve_one_upstream(upstreams, transport_kind, retry={"attempts": 1}) as url:
        yield url


def test_client_leaving_after_a_streamed_body_cancels_the_stream(upstreams: Upstreams, gateway: str) -> None:
    # 70,000 bytes are over the default buffer_limit: the body streams up, and the upstream
    # answers with an endless stream once it has read it.
    body = pattern_block(70_000)
    head = b"POST /sse?n=10&gate=never HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n"
    leave_an_endless_stream(gateway, upstreams, head + body)


def test_client_leaving_after_a_streamed_body_without_retries(
    upstreams: Upstreams, single_try_gateway: str
) -> None:
    with RawConnection.to(single_try_gateway) as conn:
        conn.send(
            b"POST /sse?n=10&gate=never HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        # The upstream has the request while its body is still unfinished: it is streamed.
        wait_until(
            lambda: upstreams.u1.stats()["in_flight"].get("sse") == 1,
            message="the request to start upstream",
        )
        conn.send(b"0\r\n\r\n")
        response = conn.read_response(max_body=1)
        assert response.status == 200
    upstreams.u1.wait_disconnects("sse")


def test_small_body_without_retries_still_notices_the_client_leaving(
    upstreams: Upstreams, single_try_gateway: str
) -> None:
    leave_an_endless_stream(
        single_try_gateway,
        upstreams,
        b"POST /sse?n=10&gate=never HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    )


# -- timeouts.total starts once the request body is in ----------------------------------------


@pytest.fixture(scope="module")
def short_total_gateway(upstreams: Upstreams, transport_kind: str) -> Iterator[str]:
    with serve_one_upstream(upstreams, transport_kind, timeouts={"total": 1.0}) as url:
        yield url


def test_total_timeout_does_not_time_the_clients_upload(short_total_gateway: str) -> None:
    # 100 KB (over buffer_limit, so streamed) sent over about 2 s to a healthy upstream.
    piece = pattern_block(10_000)
    sent = threading.Event()

    def body() -> Iterator[bytes]:
        for i in range(10):
            if i:
                sent.wait(0.2)  # pacing the upload, not waiting for anything
            yield piece

    started = time.monotonic()
    with http_client(short_total_gateway, timeout=30) as client:
        response = client.post("/upload", content=body(), headers={"content-length": "100000"})
    assert time.monotonic() - started > 1.5
    assert response.status_code == 200, response.text
    assert response.json()["length"] == 100_000


def test_total_timeout_still_bounds_the_wait_after_a_streamed_upload(short_total_gateway: str) -> None:
    started = time.monotonic()
    with http_client(short_total_gateway, timeout=30) as client:
        response = client.post("/slow?delay=10", content=pattern_block(70_000))
    assert response.status_code == 504, response.text
    assert response.json()["error"] == "gateway_timeout"
    assert time.monotonic() - started < 5
