"""End to end: routing, pass-through to the host app, the standalone Gateway, basic relaying.

Every test goes through a real gateway (uvicorn in a thread) to real upstream processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from servers import (
    RawConnection,
    ScriptedServer,
    Upstreams,
    answer_each,
    http_client,
    make_host_app,
    raw_request,
    serve_app,
    transport_kwargs,
)


def routing_config(upstreams: Upstreams) -> dict[str, Any]:
    return {
        "routes": [
            {"path": "/api/users", "upstream": "users"},
            # Shadowed by the route above: first match wins.
            {"path": "/api/users/special", "upstream": "orders"},
            {"path": "/api/stripped", "upstream": "orders", "strip_prefix": True},
            {"path": "/api/only-get", "upstream": "orders", "methods": ["GET"]},
            {"path": "/api/hosted", "upstream": "users", "host": "api.example.com"},
            {"path": "/api/hosted", "upstream": "orders"},
            {"path": "/api", "upstream": "misc"},
        ],
        "upstreams": {
            "users": {"servers": [{"url": upstreams.u1.url}]},
            "orders": {"servers": [{"url": upstreams.u2.url}]},
            "misc": {"servers": [{"url": upstreams.u3.url}]},
        },
    }


@pytest.fixture(scope="module")
def routing_gateway(upstreams: Upstreams, transport_kind: str) -> Iterator[str]:
    with serve_app(make_host_app(routing_config(upstreams), **transport_kwargs(transport_kind))) as url:
        yield url


def where(response: httpx.Response | Any) -> str:
    """Which server answered: an upstream's name, "host" (the catch-all) or "local"."""
    if isinstance(response, httpx.Response):
        body = response.content
        content_type = response.headers.get("content-type", "")
    else:
        body = response.body
        content_type = (response.header("content-type") or b"").decode()
    if body == b"local":
        return "local"
    assert content_type.startswith("application/json"), (content_type, body[:300])
    data = response.json()
    if data.get("host_app"):
        return "host"
    return str(data["server"])


@pytest.mark.parametrize(
    ("method", "path", "expected", "upstream_path"),
    [
        ("GET", "/api/users", "u1", "/api/users"),
        ("GET", "/api/users/", "u1", "/api/users/"),
        ("GET", "/api/users/7", "u1", "/api/users/7"),
        ("POST", "/api/users/7/echo", "u1", "/api/users/7/echo"),
        ("DELETE", "/api/users/7", "u1", "/api/users/7"),
        # Whole segments only: /api/usersX is not under /api/users (it falls to /api).
        ("GET", "/api/usersX", "u3", "/api/usersX"),
        ("GET", "/api/users-x/1", "u3", "/api/users-x/1"),
        # First match wins: /api/users shadows the later /api/users/special.
        ("GET", "/api/users/special", "u1", "/api/users/special"),
        ("GET", "/api", "u3", "/api"),
        ("GET", "/api/other/thing", "u3", "/api/other/thing"),
        # strip_prefix.
        ("GET", "/api/stripped/7", "u2", "/7"),
        ("GET", "/api/stripped/a/b/echo", "u2", "/a/b/echo"),
        # Methods: GET matches, others fall through to the next route.
        ("GET", "/api/only-get/x", "u2", "/api/only-get/x"),
        ("POST", "/api/only-get/x", "u3", "/api/only-get/x"),
        ("PUT", "/api/only-get/x", "u3", "/api/only-get/x"),
        # Unmatched: the host app's own routes.
        ("GET", "/apix", "host", None),
        ("GET", "/other/thing", "host", None),
        ("POST", "/other/thing", "host", None),
        ("GET", "/", "host", None),
        ("GET", "/local", "local", None),
    ],
)
def test_routing_matrix(
    routing_gateway: str, method: str, path: str, expected: str, upstream_path: str | None
) -> None:
    with http_client(routing_gateway, timeout=10) as client:
        response = client.request(method, path)
    assert response.status_code == 200, response.text
    assert where(response) == expected
    if upstream_path is not None:
        assert response.json()["raw_path"] == upstream_path
        assert response.json()["method"] == method


def test_strip_prefix_of_the_bare_prefix_sends_root(routing_gateway: str) -> None:
    with http_client(routing_gateway, timeout=10) as client:
        response = client.get("/api/stripped", params={"q": "1"})
    assert where(response) == "u2"
    assert response.json()["raw_path"] == "/"
    assert response.json()["query_string"] == "q=1"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.com", "u1"),
        ("api.example.com:8443", "u1"),  # matched without the port
        ("other.example.com", "u2"),
        ("api.example.com.evil", "u2"),
    ],
)
def test_host_matching(routing_gateway: str, host: str, expected: str) -> None:
    with http_client(routing_gateway, timeout=10) as client:
        response = client.get("/api/hosted/1", headers={"host": host})
    assert response.status_code == 200
    assert where(response) == expected


def test_unmatched_request_reaches_host_app_untouched(routing_gateway: str) -> None:
    raw = (
        b"POST /elsewhere/a%2Fb/c?x=1&x=2&flag&e=%C3%A9 HTTP/1.1\r\n"
        b"Host: myhost.test:8080\r\n"
        b"X-Forwarded-For: 9.9.9.9\r\n"
        b"X-Custom: one\r\n"
        b"X-Custom: two\r\n"
        b"Content-Length: 5\r\n"
        b"Connection: close\r\n\r\nhello"
    )
    with RawConnection.to(routing_gateway) as conn:
        conn.send(raw)
        response = conn.read_response()
    assert response.status == 200
    seen = response.json()
    assert seen["host_app"] is True
    assert seen["raw_path"] == "/elsewhere/a%2Fb/c"
    assert seen["query_string"] == "x=1&x=2&flag&e=%C3%A9"
    assert seen["method"] == "POST"
    assert seen["body_length"] == 5
    # Exactly what the client sent: no X-Forwarded-*, no X-Request-Id added, nothing removed.
    assert seen["headers"] == [
        ["host", "myhost.test:8080"],
        ["x-forwarded-for", "9.9.9.9"],
        ["x-custom", "one"],
        ["x-custom", "two"],
        ["content-length", "5"],
        ["connection", "close"],
    ]


def test_standalone_gateway_answers_404_when_nothing_matches(
    upstreams: Upstreams, standalone_gateway_factory: Callable[..., str]
) -> None:
    url = standalone_gateway_factory(
        {
            "routes": [{"path": "/api", "upstream": "a"}],
            "upstreams": {"a": {"servers": [{"url": upstreams.u1.url}]}},
        }
    )
    with http_client(url, timeout=10) as client:
        assert where(client.get("/api/x")) == "u1"
        missing = client.get("/nothing/here")
        assert missing.status_code == 404
        assert client.get("/apix").status_code == 404
    assert upstreams.u1.requests("echo") == 1


def test_the_standalone_gateways_404_is_a_gateway_error_with_the_request_id(
    upstreams: Upstreams, standalone_gateway_factory: Callable[..., str]
) -> None:
    url = standalone_gateway_factory(
        {
            "routes": [{"path": "/api", "upstream": "a"}],
            "upstreams": {"a": {"servers": [{"url": upstreams.u1.url}]}},
        }
    )
    with http_client(url, timeout=10) as client:
        mine = client.get("/nothing", headers={"x-request-id": "req-404"})
        generated = client.get("/nothing")
    assert mine.status_code == 404
    assert mine.headers["content-type"] == "application/json"
    assert mine.json() == {
        "error": "not_found",
        "detail": "no route matches this request",
        "request_id": "req-404",
    }
    assert mine.headers["x-request-id"] == "req-404"
    assert generated.json()["request_id"] == generated.headers["x-request-id"] != ""


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # Resolved before matching: cannot escape /api/users into another route...
        (b"/api/users/../admin", "u3"),
        (b"/api/users/../../local", "host-or-local"),
        # ...and cannot sneak into one either.
        (b"/api/other/../users/7", "u1"),
        (b"/api/users/./7", "u1"),
        (b"/api/stripped/./x/../y", "u2"),
    ],
)
def test_dot_segments_are_resolved_before_matching(
    routing_gateway: str, target: bytes, expected: str
) -> None:
    response = raw_request(routing_gateway, target=target)
    assert response.status == 200, response.body
    got = where(response)
    if expected == "host-or-local":
        assert got in ("host", "local")
    else:
        assert got == expected


def test_dot_segments_resolved_for_the_upstream_path(routing_gateway: str) -> None:
    response = raw_request(routing_gateway, target=b"/api/stripped/./x/../y")
    assert where(response) == "u2"
    assert response.json()["raw_path"] == "/y"


@pytest.mark.parametrize(
    "target",
    [
        b"/api/users/%2e%2e/admin",
        b"/api/users/%2E%2E/admin",
        b"/api/users/.%2e/admin",
        b"/api%2Fusers/7",
        b"/api/users%2F7",
    ],
)
def test_encoded_dot_segments_or_slashes_that_change_the_match_are_rejected(
    routing_gateway: str, upstreams: Upstreams, target: bytes
) -> None:
    response = raw_request(routing_gateway, target=target)
    assert response.status == 400, response.body
    body = response.json()
    assert body["error"] == "bad_request"
    assert set(body) == {"error", "detail", "request_id"}
    assert sum(upstream.stats()["total"] for upstream in upstreams) == 0


def test_encoded_slash_that_does_not_change_the_match_is_forwarded_raw(routing_gateway: str) -> None:
    response = raw_request(routing_gateway, target=b"/api/users/a%2Fb/c")
    assert response.status == 200
    assert where(response) == "u1"
    assert response.json()["raw_path"] == "/api/users/a%2Fb/c"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_methods_and_bodies_are_relayed(routing_gateway: str, method: str) -> None:
    body = b"" if method in ("GET", "OPTIONS") else bytes(range(256)) * 40
    with http_client(routing_gateway, timeout=10) as client:
        response = client.request(method, "/api/users/echo", content=body)
    assert response.status_code == 200
    seen = response.json()
    assert seen["method"] == method
    assert seen["body_length"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_head_request_gets_head_only(routing_gateway: str) -> None:
    with http_client(routing_gateway, timeout=10) as client:
        response = client.head("/api/users/stream?n=2&size=1000")
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == "2000"


@pytest.mark.parametrize("code", [201, 204, 301, 304, 404, 418, 500, 503])
def test_upstream_status_codes_are_relayed(routing_gateway: str, code: int) -> None:
    with http_client(routing_gateway, timeout=10, follow_redirects=False) as client:
        response = client.get(f"/api/users/status?code={code}")
    assert response.status_code == code
    assert response.headers["x-upstream-name"] == "u1"


def test_keep_alive_client_reuses_its_connection(routing_gateway: str) -> None:
    with RawConnection.to(routing_gateway) as conn:
        for i in range(3):
            conn.send(f"GET /api/users/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            response = conn.read_response()
            assert response.complete
            assert response.json()["raw_path"] == f"/api/users/{i}"


def test_round_robin_over_servers(upstreams: Upstreams, gateway_factory: Callable[..., str]) -> None:
    url = gateway_factory(
        {
            "routes": [{"path": "/", "upstream": "all"}],
            "upstreams": {"all": {"servers": [{"url": u.url} for u in upstreams]}},
        }
    )
    with http_client(url, timeout=10) as client:
        names = [where(client.get("/x")) for _ in range(6)]
    assert sorted(names) == ["u1", "u1", "u2", "u2", "u3", "u3"]


def test_cookies_never_cross_clients(upstreams: Upstreams, gateway_factory: Callable[..., str]) -> None:
    url = gateway_factory(
        {
            "routes": [{"path": "/", "upstream": "one"}],
            "upstreams": {"one": {"servers": [{"url": upstreams.u1.url}]}},
        }
    )
    with http_client(url, timeout=10) as alice, http_client(url, timeout=10) as bob:
        set_response = alice.get("/set-cookie?value=alice-secret")
        assert set_response.headers.get_list("set-cookie") == ["session=alice-secret; Path=/"]
        # Alice's own cookie goes with Alice's requests...
        assert alice.get("/cookies").json()["cookie"] == "session=alice-secret"
        # ...and never with Bob's, though both share the gateway's client and connections.
        for _ in range(3):
            assert bob.get("/cookies").json()["cookies"] == []
        assert bob.get("/cookies", headers={"cookie": "mine=1"}).json()["cookies"] == ["mine=1"]


# -- answers that have no body ------------------------------------------------------------


def raw_upstream_gateway(serve: Callable[..., str], transport_kind: str, upstream: str) -> str:
    config = {
        "routes": [{"path": "/", "upstream": "raw"}],
        "upstreams": {"raw": {"servers": [{"url": upstream}]}},
    }
    return serve(make_host_app(config, **transport_kwargs(transport_kind)))


@pytest.mark.parametrize(
    "answer",
    [
        # RFC 9110 8.6: a 304 may carry the Content-Length of the body it stands for.
        b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n',
        b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["304-with-length", "204-with-length", "204-chunked"],
)
def test_bodiless_answers_keep_the_client_connection(
    serve: Callable[..., str], transport_kind: str, answer: bytes
) -> None:
    status = int(answer.split(b" ")[1])
    with ScriptedServer(answer_each(answer)) as upstream:
        gateway = raw_upstream_gateway(serve, transport_kind, upstream.url)
        with RawConnection.to(gateway) as conn:
            for _ in range(2):
                conn.send(b'GET /thing HTTP/1.1\r\nHost: x\r\nIf-None-Match: "v1"\r\n\r\n')
                response = conn.read_response()
                assert response.status == status
                assert response.complete
                assert response.body == b""
                assert response.header("content-length") is None


def test_head_answer_with_content_length_keeps_the_client_connection(
    serve: Callable[..., str], transport_kind: str
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5000\r\n\r\n"
    with ScriptedServer(answer_each(answer)) as upstream:
        gateway = raw_upstream_gateway(serve, transport_kind, upstream.url)
        with RawConnection.to(gateway) as conn:
            for _ in range(2):
                conn.send(b"HEAD /thing HTTP/1.1\r\nHost: x\r\n\r\n")
                response = conn.read_response()
                assert response.status == 200
                assert response.complete
                assert response.header("content-length") == b"5000"


# -- the asterisk form, empty segments --------------------------------------------------------


def test_options_asterisk_reaches_the_host_app(
    upstreams: Upstreams, serve: Callable[..., str], transport_kind: str
) -> None:
    from asgi_gateway import GatewayMiddleware

    async def host_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        # A server-wide OPTIONS answer, as the asterisk form asks for (RFC 9110 9.3.7).
        body = f"{scope['method']} {scope['raw_path'].decode()}".encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"allow", b"GET, POST")]})
        await send({"type": "http.response.body", "body": body})

    gateway = serve(
        GatewayMiddleware(host_app, config=routing_config(upstreams), **transport_kwargs(transport_kind))
    )
    response = raw_request(gateway, method="OPTIONS", target=b"*")
    assert response.status == 200, response.body
    assert response.body == b"OPTIONS *"
    assert sum(upstream.stats()["total"] for upstream in upstreams) == 0


def test_options_asterisk_on_a_standalone_gateway_is_not_found(
    upstreams: Upstreams, standalone_gateway_factory: Callable[..., str]
) -> None:
    gateway = standalone_gateway_factory(routing_config(upstreams))
    response = raw_request(gateway, method="OPTIONS", target=b"*")
    assert response.status == 404
    assert response.json()["error"] == "not_found"


@pytest.mark.parametrize(
    ("target", "expected", "upstream_path"),
    [
        # Merged, these read as another route's path: that route takes them, merged.
        (b"//api/users/7", "u1", "/api/users/7"),
        (b"/api//users/7", "u1", "/api/users/7"),
        (b"/api/stripped//7", "u2", "//7"),
        (b"//api//stripped/7", "u2", "/7"),
        # The same route either way: the path goes as it came.
        (b"/api/users//7", "u1", "/api/users//7"),
        (b"/api/other//x", "u3", "/api/other//x"),
    ],
)
def test_empty_segments_are_merged_for_matching(
    routing_gateway: str, target: bytes, expected: str, upstream_path: str
) -> None:
    response = raw_request(routing_gateway, target=target)
    assert response.status == 200, response.body
    assert where(response) == expected
    assert response.json()["raw_path"] == upstream_path
