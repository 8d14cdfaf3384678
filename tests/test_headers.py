"""End to end: the header rules of DESIGN.md, raw path and query bytes.

Requests are written byte for byte on raw sockets where a client library would normalise them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from servers import (
    RawConnection,
    RawResponse,
    Upstreams,
    http_client,
    make_host_app,
    serve_app,
    transport_kwargs,
)


def config(upstreams: Upstreams, **top: Any) -> dict[str, Any]:
    return {
        "routes": [
            {"path": "/keep-host", "upstream": "one", "preserve_host": True},
            {"path": "/own-host", "upstream": "one", "preserve_host": False},
            {"path": "/stripped", "upstream": "one", "strip_prefix": True},
            {"path": "/", "upstream": "one"},
        ],
        "upstreams": {"one": {"servers": [{"url": upstreams.u1.url}]}},
        **top,
    }


@pytest.fixture(scope="module")
def gateway(upstreams: Upstreams, transport_kind: str) -> Iterator[str]:
    with serve_app(make_host_app(config(upstreams), **transport_kwargs(transport_kind))) as url:
        yield url


def send(url: str, target: bytes, *headers: tuple[str, str], body: bytes = b"") -> RawResponse:
    """One request with exactly these headers (plus Host unless given)."""
    lines = [b"POST " if body else b"GET ", target, b" HTTP/1.1\r\n"]
    if not any(name.lower() == "host" for name, _ in headers):
        lines.append(b"Host: client.example:8080\r\n")
    for name, value in headers:
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    if body:
        lines.append(f"Content-Length: {len(body)}\r\n".encode())
    lines.append(b"\r\n")
    with RawConnection.to(url) as conn:
        conn.send(b"".join(lines) + body)
        return conn.read_response()


def upstream_headers(response: RawResponse) -> list[tuple[str, str]]:
    assert response.status == 200, response.body
    return [(name, value) for name, value in response.json()["headers"]]


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k == name]


def test_hop_by_hop_request_headers_are_removed(gateway: str) -> None:
    seen = upstream_headers(
        send(
            gateway,
            b"/echo",
            ("Connection", "keep-alive, X-Secret, X-Other"),
            ("X-Secret", "1"),
            ("X-Other", "2"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Upgrade", "h2c"),
            ("X-Kept", "yes"),
        )
    )
    names = {name for name, _ in seen}
    for name in ("x-secret", "x-other", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"):
        assert name not in names, seen
    for value in values(seen, "connection"):
        assert "x-secret" not in value.lower() and "x-other" not in value.lower()
    assert values(seen, "x-kept") == ["yes"]


def test_client_transfer_encoding_is_not_copied_upstream(gateway: str) -> None:
    raw = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    with RawConnection.to(gateway) as conn:
        conn.send(raw)
        response = conn.read_response()
    seen = response.json()
    assert seen["body"] == "hello world"
    te = values([(k, v) for k, v in seen["headers"]], "transfer-encoding")
    cl = values([(k, v) for k, v in seen["headers"]], "content-length")
    # Re-framed by the gateway's own client: one framing, never both.
    assert (te == ["chunked"] and cl == []) or (te == [] and cl == ["11"]), seen["headers"]


def test_hop_by_hop_response_headers_are_removed(gateway: str) -> None:
    target = (
        b"/headers?h=connection:x-secret&h=x-secret:1&h=keep-alive:timeout%3D5"
        b"&h=proxy-connection:keep-alive&h=trailer:x-sum&h=upgrade:h2c&h=x-kept:yes"
    )
    response = send(gateway, target)
    assert response.status == 200
    names = {name.decode() for name, _ in response.headers}
    for name in ("x-secret", "keep-alive", "proxy-connection", "trailer", "upgrade"):
        assert name not in names, response.headers
    for value in response.header_list("connection"):
        assert b"x-secret" not in value.lower()
    assert response.header_list("x-kept") == [b"yes"]


def test_one_date_header_reaches_the_client(gateway: str) -> None:
    # The upstream (uvicorn) sends a Date, and so does the server in front of the gateway.
    response = send(gateway, b"/headers?h=date:Mon,%2001%20Jan%202001%2000:00:00%20GMT")
    assert response.status == 200
    dates = response.header_list("date")
    assert len(dates) == 1 and b"2001" not in dates[0], response.headers


def test_connection_header_cannot_strip_the_gateways_own_headers(gateway: str) -> None:
    seen = upstream_headers(
        send(
            gateway,
            b"/echo",
            ("Connection", "X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, X-Request-Id"),
        )
    )
    assert values(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert values(seen, "x-forwarded-proto") == ["http"]
    assert values(seen, "x-forwarded-host") == ["client.example:8080"]
    assert len(values(seen, "x-request-id")) == 1


def forwarded_for(seen: list[tuple[str, str]]) -> list[str]:
    found = values(seen, "x-forwarded-for")
    assert len(found) == 1, found
    return [part.strip() for part in found[0].split(",")]


def test_x_forwarded_for_from_an_untrusted_client_is_replaced(gateway: str) -> None:
    seen = upstream_headers(send(gateway, b"/echo", ("X-Forwarded-For", "1.2.3.4, 5.6.7.8")))
    assert forwarded_for(seen) == ["127.0.0.1"]


def test_x_forwarded_for_is_set_when_absent(gateway: str) -> None:
    assert forwarded_for(upstream_headers(send(gateway, b"/echo"))) == ["127.0.0.1"]


@pytest.mark.parametrize("trusted", [["127.0.0.1"], ["127.0.0.0/8"], ["10.0.0.0/8", "127.0.0.1/32"]])
def test_x_forwarded_for_from_a_trusted_proxy_is_appended(
    upstreams: Upstreams, gateway_factory: Callable[..., str], trusted: list[str]
) -> None:
    url = gateway_factory(config(upstreams, trusted_proxies=trusted))
    seen = upstream_headers(send(url, b"/echo", ("X-Forwarded-For", "1.2.3.4, 5.6.7.8")))
    assert forwarded_for(seen) == ["1.2.3.4", "5.6.7.8", "127.0.0.1"]
    assert forwarded_for(upstream_headers(send(url, b"/echo"))) == ["127.0.0.1"]


def test_x_forwarded_for_with_a_non_matching_trusted_list_is_replaced(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    url = gateway_factory(config(upstreams, trusted_proxies=["10.0.0.0/8"]))
    seen = upstream_headers(send(url, b"/echo", ("X-Forwarded-For", "1.2.3.4")))
    assert forwarded_for(seen) == ["127.0.0.1"]


def test_forwarded_and_x_real_ip_from_an_untrusted_client_are_removed(gateway: str) -> None:
    # They name the client as X-Forwarded-For does: an upstream believing them could be fooled.
    seen = upstream_headers(
        send(gateway, b"/echo", ("Forwarded", "for=6.6.6.6;proto=https"), ("X-Real-IP", "6.6.6.6"))
    )
    assert values(seen, "forwarded") == []
    assert values(seen, "x-real-ip") == []
    assert forwarded_for(seen) == ["127.0.0.1"]


def test_forwarded_and_x_real_ip_from_a_trusted_proxy_are_kept(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    url = gateway_factory(config(upstreams, trusted_proxies=["127.0.0.1"]))
    seen = upstream_headers(
        send(url, b"/echo", ("Forwarded", "for=6.6.6.6;proto=https"), ("X-Real-IP", "6.6.6.6"))
    )
    assert values(seen, "forwarded") == ["for=6.6.6.6;proto=https"]
    assert values(seen, "x-real-ip") == ["6.6.6.6"]


def test_x_forwarded_proto_and_host_are_set(gateway: str) -> None:
    seen = upstream_headers(
        send(
            gateway,
            b"/echo",
            ("Host", "public.example:8443"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "spoofed.example"),
        )
    )
    assert values(seen, "x-forwarded-proto") == ["http"]
    assert values(seen, "x-forwarded-host") == ["public.example:8443"]


def test_host_is_the_upstreams_by_default(upstreams: Upstreams, gateway: str) -> None:
    seen = upstream_headers(send(gateway, b"/echo", ("Host", "public.example")))
    assert values(seen, "host") == [f"127.0.0.1:{upstreams.u1.port}"]
    # A route's preserve_host: true wins over the global false.
    seen = upstream_headers(send(gateway, b"/keep-host/echo", ("Host", "public.example")))
    assert values(seen, "host") == ["public.example"]


def test_preserve_host_globally_and_per_route(
    upstreams: Upstreams, gateway_factory: Callable[..., str]
) -> None:
    url = gateway_factory(config(upstreams, preserve_host=True))
    seen = upstream_headers(send(url, b"/echo", ("Host", "public.example:9000")))
    assert values(seen, "host") == ["public.example:9000"]
    # A route's preserve_host: false wins over the global true.
    seen = upstream_headers(send(url, b"/own-host/echo", ("Host", "public.example:9000")))
    assert values(seen, "host") == [f"127.0.0.1:{upstreams.u1.port}"]


@pytest.mark.parametrize("request_id", ["abc-123", "0f8fad5b-d9cb-469f-a165-70867728950e", "req_1.2"])
def test_sane_request_id_is_kept_and_returned(gateway: str, request_id: str) -> None:
    response = send(gateway, b"/echo", ("X-Request-Id", request_id))
    assert values(upstream_headers(response), "x-request-id") == [request_id]
    assert response.header_list("x-request-id") == [request_id.encode()]


@pytest.mark.parametrize("request_id", ["x" * 1000, "bad id;<script>", ""])
def test_insane_request_id_is_replaced(gateway: str, request_id: str) -> None:
    response = send(gateway, b"/echo", ("X-Request-Id", request_id))
    upstream_ids = values(upstream_headers(response), "x-request-id")
    assert len(upstream_ids) == 1
    assert upstream_ids[0] != request_id
    assert re.fullmatch(r"[A-Za-z0-9._-]{8,128}", upstream_ids[0]), upstream_ids
    assert response.header_list("x-request-id") == [upstream_ids[0].encode()]


def test_sane_request_id_is_kept_on_the_ambiguous_path_answer(gateway: str) -> None:
    # "/stripped%2Fx" reads as another route once decoded: refused, with the client's own id.
    response = send(gateway, b"/stripped%2Fx", ("X-Request-Id", "client-id-42"))
    assert response.status == 400, response.body
    assert response.json()["request_id"] == "client-id-42"
    assert response.header_list("x-request-id") == [b"client-id-42"]


def test_request_id_is_generated_and_returned(gateway: str) -> None:
    ids = []
    for _ in range(3):
        response = send(gateway, b"/echo")
        upstream_ids = values(upstream_headers(response), "x-request-id")
        assert len(upstream_ids) == 1
        assert response.header_list("x-request-id") == [upstream_ids[0].encode()]
        ids.append(upstream_ids[0])
    assert len(set(ids)) == 3


def test_repeated_set_cookie_headers_survive(gateway: str) -> None:
    with http_client(gateway, timeout=10) as client:
        response = client.get("/set-cookie", params=[("c", "a=1"), ("c", "b=2"), ("value", "3")])
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/", "session=3; Path=/"]


def test_repeated_request_headers_survive_in_order(gateway: str) -> None:
    seen = upstream_headers(send(gateway, b"/echo", ("X-Multi", "one"), ("X-Other", "x"), ("X-Multi", "two")))
    assert values(seen, "x-multi") == ["one", "two"]


@pytest.mark.parametrize(
    "query",
    [
        b"a=1&a=2&flag",
        b"flag",
        b"x=%20+y&z=%2B&e=%C3%A9&empty=&=v",
        b"b=2&a=1&b=1",
        b"q=a%26b%3Dc;d",
    ],
)
def test_query_string_is_relayed_byte_for_byte(gateway: str, query: bytes) -> None:
    response = send(gateway, b"/echo?" + query)
    assert response.json()["query_string"] == query.decode("latin-1")


@pytest.mark.parametrize(
    ("target", "upstream_path"),
    [
        (b"/api/a%2Fb/%7Euser/caf%C3%A9/x;p=1", "/api/a%2Fb/%7Euser/caf%C3%A9/x;p=1"),
        (b"/api/A%2fb//double/", "/api/A%2fb//double/"),
        (b"/stripped/a%20b/%25", "/a%20b/%25"),
    ],
)
def test_raw_path_is_relayed_byte_for_byte(gateway: str, target: bytes, upstream_path: str) -> None:
    response = send(gateway, target)
    assert response.status == 200, response.body
    assert response.json()["raw_path"] == upstream_path


def test_no_accept_encoding_is_added(gateway: str) -> None:
    assert values(upstream_headers(send(gateway, b"/echo")), "accept-encoding") == []
    seen = upstream_headers(send(gateway, b"/echo", ("Accept-Encoding", "br;q=1, identity;q=0.5")))
    assert values(seen, "accept-encoding") == ["br;q=1, identity;q=0.5"]


def test_ordinary_headers_pass_both_ways_unchanged(gateway: str) -> None:
    response = send(
        gateway,
        b"/echo",
        ("Authorization", "Bearer t0k3n"),
        ("Accept", "application/json"),
        ("X-Case", "MiXeD Value"),
        body=b"payload",
    )
    seen = upstream_headers(response)
    assert values(seen, "authorization") == ["Bearer t0k3n"]
    assert values(seen, "x-case") == ["MiXeD Value"]
    assert values(seen, "content-length") == ["7"]
    assert response.header("x-upstream-name") == b"u1"
    assert response.header("content-type") == b"application/json"


def test_gateway_headers_also_set_for_plain_httpx_clients(upstreams: Upstreams, gateway: str) -> None:
    with http_client(gateway, timeout=10) as client:
        response = client.get("/echo")
    seen = [(k, v) for k, v in response.json()["headers"]]
    assert values(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert values(seen, "host") == [f"127.0.0.1:{upstreams.u1.port}"]
    assert response.headers["x-request-id"] == values(seen, "x-request-id")[0]
