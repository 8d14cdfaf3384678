"""End to end: every error path answers DESIGN.md's JSON error, at once, never a traceback or a hang."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from servers import (
    BrokenServer,
    RawConnection,
    RawResponse,
    UpstreamProcess,
    Upstreams,
    free_port,
    http_client,
    wait_until,
)


def config(url: str, *, route: dict[str, Any] | None = None, **upstream: Any) -> dict[str, Any]:
    upstream.setdefault("retry", {"attempts": 1})
    return {
        "routes": [{"path": "/", "upstream": "one", **(route or {})}],
        "upstreams": {"one": {"servers": [{"url": url}], **upstream}},
    }


def assert_error(
    response: httpx.Response | RawResponse, status: int, code: str, request_id: str | None = None
) -> dict[str, Any]:
    if isinstance(response, httpx.Response):
        got_status, body = response.status_code, response.content
        content_type = response.headers.get("content-type", "")
        header_id = response.headers.get("x-request-id")
    else:
        got_status, body = response.status, response.body
        content_type = (response.header("content-type") or b"").decode()
        header_id = (response.header("x-request-id") or b"").decode() or None
    assert got_status == status, body[:500]
    assert content_type.split(";")[0].strip() == "application/json"
    assert b"Traceback" not in body
    data: dict[str, Any] = json.loads(body)
    assert set(data) == {"error", "detail", "request_id"}
    assert data["error"] == code
    assert isinstance(data["detail"], str) and data["detail"]
    assert data["request_id"] and data["request_id"] == header_id
    if request_id is not None:
        assert data["request_id"] == request_id
    return data


def test_closed_port_is_502_bad_gateway_with_the_request_id(gateway_factory: Callable[..., str]) -> None:
    url = gateway_factory(config(f"http://127.0.0.1:{free_port()}"))
    with http_client(url, timeout=10) as client:
        started = time.monotonic()
        response = client.get("/x", headers={"x-request-id": "err-req-1"})
        assert time.monotonic() - started < 5
        assert_error(response, 502, "bad_gateway", "err-req-1")
        # A generated id when the client sent none.
        assert_error(client.post("/x", content=b"body"), 502, "bad_gateway")


def test_killed_upstream_is_502_and_recovers_after_restart(
    upstream_factory: Callable[..., UpstreamProcess], gateway_factory: Callable[..., str]
) -> None:
    upstream = upstream_factory("doomed")
    url = gateway_factory(config(upstream.url, retry={"attempts": 2}, outlier_detection=False))
    with http_client(url, timeout=10) as client:
        assert client.get("/echo").status_code == 200  # leaves a pooled keep-alive connection
        upstream.kill()
        assert_error(client.get("/echo"), 502, "bad_gateway")
        upstream.restart()
        response = client.get("/echo")
        assert response.status_code == 200
        assert response.json()["server"] == "doomed"


@pytest.mark.parametrize("mode", ["close", "reset", "garbage"])
def test_broken_upstream_connection_is_502(gateway_factory: Callable[..., str], mode: str) -> None:
    with BrokenServer(mode) as broken:
        url = gateway_factory(config(broken.url))
        with http_client(url, timeout=10) as client:
            assert_error(client.get("/x"), 502, "bad_gateway")
        assert broken.connections >= 1


def test_hanging_upstream_is_504_gateway_timeout(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    url = gateway_factory(config(upstreams.u1.url, timeouts={"connect": 1, "read": 0.3, "total": 10}))
    with http_client(url, timeout=10) as client:
        started = time.monotonic()
        response = client.get("/hang")
        elapsed = time.monotonic() - started
    assert_error(response, 504, "gateway_timeout")
    assert 0.25 <= elapsed < 3
    # The gateway gave up on the upstream request too.
    upstreams.u1.wait_disconnects("hang")


def test_total_timeout_is_504(upstreams: Upstreams, gateway_factory: Callable[..., str]) -> None:
    url = gateway_factory(config(upstreams.u1.url, timeouts={"connect": 1, "read": 30, "total": 0.4}))
    with http_client(url, timeout=10) as client:
        started = time.monotonic()
        response = client.get("/slow?delay=5")
        elapsed = time.monotonic() - started
    assert_error(response, 504, "gateway_timeout")
    assert elapsed < 3


def test_silent_server_is_504(gateway_factory: Callable[..., str]) -> None:
    with BrokenServer("silent") as silent:
        url = gateway_factory(config(silent.url, timeouts={"connect": 1, "read": 0.3, "total": 10}))
        with http_client(url, timeout=10) as client:
            assert_error(client.get("/x"), 504, "gateway_timeout")


def test_stopped_upstream_is_504(
    upstream_factory: Callable[..., UpstreamProcess], gateway_factory: Callable[..., str]
) -> None:
    upstream = upstream_factory("frozen")
    url = gateway_factory(config(upstream.url, timeouts={"connect": 0.5, "read": 0.3, "total": 10}))
    upstream.stop()
    try:
        with http_client(url, timeout=10) as client:
            started = time.monotonic()
            assert_error(client.get("/echo"), 504, "gateway_timeout")
            assert time.monotonic() - started < 3
    finally:
        upstream.cont()


@pytest.mark.parametrize("chunked", [False, True])
def test_upstream_dropping_mid_body_aborts_the_client_response(
    upstreams: Upstreams, gateway_factory: Callable[..., str], chunked: bool
) -> None:
    url = gateway_factory(config(upstreams.u1.url))
    target = f"/drop?size=100000&sent=5000{'&chunked=1' if chunked else ''}"
    with RawConnection.to(url) as conn:
        conn.send(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        response = conn.read_response()
    assert response.status == 200
    # Aborted: never a clean end (no final chunk, or fewer bytes than Content-Length).
    assert not response.complete, response
    assert len(response.body) < 100000
    if not chunked:
        assert response.header("content-length") == b"100000"


def test_upstream_closing_between_its_head_and_body_is_retried_not_cut_short(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    # Both servers announce a body and close before its first byte, as a server dying between
    # its head and body writes does: nothing has reached the client yet, so a GET goes to the
    # other server, and the client gets a whole answer (here a 502) instead of a cut-off 200.
    two = [{"url": upstreams.u1.url}, {"url": upstreams.u2.url}]
    url = gateway_factory(
        {
            "routes": [{"path": "/", "upstream": "two"}],
            "upstreams": {"two": {"servers": two, "retry": {"attempts": 2}, "outlier_detection": False}},
        }
    )
    with RawConnection.to(url) as conn:
        conn.send(b"GET /drop?size=567&sent=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert_error(conn.read_response(), 502, "bad_gateway")
    assert upstreams.u1.requests("drop") == upstreams.u2.requests("drop") == 1
    # A POST may not be sent twice: the same whole 502, from the one server it went to.
    with http_client(url, timeout=10) as client:
        assert_error(client.post("/drop?size=567&sent=0", content=b"x"), 502, "bad_gateway")
    assert upstreams.u1.requests("drop") + upstreams.u2.requests("drop") == 3


def test_upstream_dropping_mid_body_raises_in_httpx(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    url = gateway_factory(config(upstreams.u1.url))
    with http_client(url, timeout=10) as client:
        for target in ("/drop?size=100000&sent=5000", "/drop?size=100000&sent=5000&chunked=1"):
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                client.get(target)
        # The gateway is fine afterwards.
        assert client.get("/echo").status_code == 200


def test_content_length_over_max_body_size_is_413(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    url = gateway_factory({**config(upstreams.u1.url), "max_body_size": 1000})
    with http_client(url, timeout=10) as client:
        assert_error(client.post("/upload", content=b"x" * 5000), 413, "payload_too_large")
        assert upstreams.u1.requests("upload") == 0
        at_limit = client.post("/upload", content=b"x" * 1000)
        assert at_limit.status_code == 200
        assert at_limit.json()["length"] == 1000


def test_chunked_body_over_max_body_size_is_413(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    url = gateway_factory({**config(upstreams.u1.url), "max_body_size": 1000})
    chunk = b"y" * 500
    body = b"".join(b"1f4\r\n" + chunk + b"\r\n" for _ in range(10)) + b"0\r\n\r\n"
    with RawConnection.to(url) as conn:
        conn.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        response = conn.read_response()
    assert_error(response, 413, "payload_too_large")
    # Never passed off upstream as a complete (truncated) body.
    assert upstreams.u1.stats()["completed"].get("upload", 0) == 0
    # A chunked body within the limit goes through.
    with http_client(url, timeout=10) as client:
        ok = client.post("/upload", content=iter([chunk, chunk]))
    assert ok.status_code == 200
    assert ok.json()["length"] == 1000


def test_max_body_size_per_route(upstreams: Upstreams, gateway_factory: Callable[..., str]) -> None:
    url = gateway_factory(
        {
            "routes": [
                {"path": "/small", "upstream": "one", "max_body_size": 10},
                {"path": "/unlimited", "upstream": "one", "max_body_size": None},
                {"path": "/", "upstream": "one"},
            ],
            "upstreams": {"one": {"servers": [{"url": upstreams.u1.url}]}},
            "max_body_size": 1000,
        }
    )
    with http_client(url, timeout=10) as client:
        assert_error(client.post("/small/upload", content=b"x" * 100), 413, "payload_too_large")
        assert client.post("/small/upload", content=b"x" * 10).status_code == 200
        assert client.post("/unlimited/upload", content=b"x" * 50_000).json()["length"] == 50_000
        assert_error(client.post("/other/upload", content=b"x" * 1001), 413, "payload_too_large")


def test_concurrency_overflow_is_503_with_retry_after(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    url = gateway_factory(config(upstreams.u1.url, max_concurrent_requests=1))
    with RawConnection.to(url) as hanging:
        hanging.send(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: upstreams.u1.stats()["in_flight"].get("hang") == 1, message="the first request")
        with http_client(url, timeout=10) as client:
            started = time.monotonic()
            response = client.get("/echo")
            assert time.monotonic() - started < 2
        assert_error(response, 503, "upstream_unavailable")
        retry_after = response.headers.get("retry-after")
        assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1
        assert upstreams.u1.requests("echo") == 0
