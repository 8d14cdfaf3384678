"""End to end: request and response transformation against real upstreams.

Header rules both ways and their variables, path rewrites, `Location` and `Set-Cookie`
rewriting, Python hooks (middleware and mounted forms) and RFC 7239 `Forwarded` chains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
from servers import (
    GatewayServer,
    RawConnection,
    RawResponse,
    Upstreams,
    http_client,
    make_host_app,
    serve_app,
)
from starlette.applications import Starlette

from asgi_gateway import (
    BufferedStream,
    ConfigError,
    Forbidden,
    Gateway,
    GatewayConfig,
    Hooks,
    Request,
    Response,
    RouteConfig,
    ServerConfig,
    UpstreamConfig,
    load_config,
)
from asgi_gateway._layers.transform import transform_layer
from asgi_gateway._types import Exchange, Handler, RequestBody

SECRET = "transform-" + "s" * 40


def send(url: str, target: str, *headers: tuple[str, str], host: str = "client.example:8080") -> RawResponse:
    """One GET with exactly these headers (and the Host given)."""
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        *(f"{k}: {v}" for k, v in headers),
        "Connection: close",
    ]
    with RawConnection.to(url) as conn:
        conn.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return conn.read_response()


def seen(response: RawResponse) -> list[tuple[str, str]]:
    """The headers the upstream's `echo` got."""
    assert response.status == 200, response.body
    return [(name, value) for name, value in response.json()["headers"]]


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key == name]


def headers_target(prefix: str, *pairs: tuple[str, str]) -> str:
    """`{prefix}/headers?h=NAME:VALUE...`: the upstream answers with these headers."""
    return f"{prefix}/headers?" + "&".join(f"h={quote(f'{k}:{v}', safe='')}" for k, v in pairs)


# -- header rules, variables, rewrites, redirects and cookies (config only) ----------------


def transform_config(upstreams: Upstreams) -> dict[str, Any]:
    return {
        "routes": [
            {
                "path": "/rules",
                "upstream": "one",
                "request_headers": {
                    "set": {"X-Set": "fixed", "x-vars": "{client_ip}|{request_id}|{route}|{upstream}"},
                    "add": {"x-added": "two"},
                    "remove": ["x-remove-me"],
                },
                "response_headers": {
                    "set": {"x-a": "replaced", "x-served-by": "{server} for {request_id}"},
                    "add": {"x-b": "second", "x-literal": "{{not a variable}}"},
                    "remove": ["x-upstream-name"],
                },
            },
            {
                "path": "/claims",
                "upstream": "one",
                "auth": {"jwt": {"secret": SECRET, "algorithms": ["HS256"]}},
                "request_headers": {"set": {"x-user": "user={claim:sub}", "x-team": "{claim:team}"}},
                "response_headers": {"set": {"x-user": "{claim:sub}"}},
            },
            {
                "path": "/v",
                "upstream": "one",
                "strip_prefix": True,
                "rewrite": {
                    "pattern": r"^/(?P<version>v\d+)/([^/]+)/(\d+)$",
                    "replacement": "/$3/${version}/$2",
                },
            },
            {
                "path": "/keep",
                "upstream": "one",
                "rewrite": {"pattern": "^/keep/old/", "replacement": "/keep/new/"},
            },
            {
                # A rewrite whose groups can build a dot segment out of harmless-looking text.
                "path": "/joined",
                "upstream": "one",
                "strip_prefix": True,
                "rewrite": {"pattern": r"^/x-([^/]*)-([^/]*)/(.*)$", "replacement": "/$1$2/$3"},
            },
            {"path": "/admin", "upstream": "one"},
            {
                "path": "/app",
                "upstream": "one",
                "strip_prefix": True,
                "redirects": "rewrite",
                "cookies": "rewrite",
            },
            {"path": "/plain", "upstream": "one", "strip_prefix": True},
        ],
        "upstreams": {"one": {"servers": [{"url": upstreams.u1.url}]}},
    }


@pytest.fixture(scope="module")
def gateway(upstreams: Upstreams) -> Iterator[str]:
    with serve_app(make_host_app(transform_config(upstreams))) as url:
        yield url


def test_request_header_rules_set_add_and_remove(gateway: str) -> None:
    got = seen(
        send(
            gateway,
            "/rules/echo",
            ("X-Set", "from-client-1"),
            ("X-Set", "from-client-2"),
            ("X-Added", "one"),
            ("X-Remove-Me", "secret"),
            ("X-Other", "kept"),
        )
    )
    assert values(got, "x-set") == ["fixed"]
    assert values(got, "x-added") == ["one", "two"]
    assert values(got, "x-remove-me") == []
    assert values(got, "x-other") == ["kept"]


def test_request_header_variables(gateway: str) -> None:
    response = send(gateway, "/rules/echo", ("X-Request-Id", "req-42"))
    (value,) = values(seen(response), "x-vars")
    assert value == "127.0.0.1|req-42|/rules|one"


def test_response_header_rules_set_add_remove_and_variables(upstreams: Upstreams, gateway: str) -> None:
    response = send(gateway, headers_target("/rules", ("x-a", "1"), ("x-a", "2"), ("x-b", "first")))
    assert response.status == 200
    assert response.header_list("x-a") == [b"replaced"]
    assert response.header_list("x-b") == [b"first", b"second"]
    assert response.header("x-upstream-name") is None
    assert response.header("x-literal") == b"{not a variable}"
    request_id = response.header("x-request-id")
    assert request_id
    assert response.header("x-served-by") == f"{upstreams.u1.url} for ".encode() + request_id


def test_a_route_without_rules_passes_headers_as_they_are(gateway: str) -> None:
    response = send(gateway, headers_target("/plain", ("x-a", "1")), ("X-Remove-Me", "sent"))
    assert response.header_list("x-a") == [b"1"]
    assert response.header("x-upstream-name") == b"u1"


def test_claims_in_header_rules(gateway: str) -> None:
    token = jwt.encode({"sub": "ada", "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
    response = send(
        gateway,
        "/claims/echo",
        ("Authorization", f"Bearer {token}"),
        ("X-Team", "forged"),
        ("X-User", "forged"),
    )
    got = seen(response)
    assert values(got, "x-user") == ["user=ada"]
    # A claim the token does not have: the header is not sent (and the client's copy is gone).
    assert values(got, "x-team") == []
    assert response.header_list("x-user") == [b"ada"]
    # Without a valid token, auth refuses before any rule runs.
    assert send(gateway, "/claims/echo").status == 401


def test_rewrite_with_capture_groups_after_strip_prefix(gateway: str) -> None:
    response = send(gateway, "/v/v2/users/7?q=1&q=2")
    body = response.json()
    assert body["raw_path"] == "/7/v2/users"
    assert body["query_string"] == "q=1&q=2"
    # The pattern does not match: the path goes upstream unchanged.
    assert send(gateway, "/v/other/echo").json()["raw_path"] == "/other/echo"


def test_rewrite_on_a_route_that_keeps_its_prefix(gateway: str) -> None:
    assert send(gateway, "/keep/old/echo").json()["raw_path"] == "/keep/new/echo"


def test_a_rewrite_that_would_leave_its_route_is_refused(upstreams: Upstreams, gateway: str) -> None:
    before = upstreams.u1.requests()
    # "/x-.-./admin" holds no dot segment, but the rewrite joins "." and "." into "/../admin",
    # which is /admin's path, not /joined's.
    response = send(gateway, "/joined/x-.-./admin/echo")
    assert response.status == 400
    assert response.json()["error"] == "bad_request"
    # An encoded dot segment out of the groups: just as refused.
    assert send(gateway, "/joined/x-%2e-%2e/admin/echo").status == 400
    assert upstreams.u1.requests() == before
    # The same rewrite, when the result stays in the route, is sent.
    assert send(gateway, "/joined/x-a-b/echo").json()["raw_path"] == "/ab/echo"


def test_location_is_rewritten_to_the_client_facing_url(upstreams: Upstreams, gateway: str) -> None:
    response = send(
        gateway,
        headers_target(
            "/app",
            ("location", f"{upstreams.u1.url}/login?next=/home"),
            ("content-location", "/items/7"),
        ),
    )
    assert response.header("location") == b"http://client.example:8080/app/login?next=/home"
    assert response.header("content-location") == b"/app/items/7"
    # Elsewhere: untouched.
    other = send(gateway, headers_target("/app", ("location", "https://elsewhere.example/x")))
    assert other.header("location") == b"https://elsewhere.example/x"
    # A route that does not ask for it: untouched too.
    plain = send(gateway, headers_target("/plain", ("location", f"{upstreams.u1.url}/login")))
    assert plain.header("location") == f"{upstreams.u1.url}/login".encode()


def test_set_cookie_path_and_domain_are_rewritten(gateway: str) -> None:
    response = send(
        gateway,
        headers_target(
            "/app",
            ("set-cookie", "a=1; Path=/; Domain=127.0.0.1; HttpOnly"),
            ("set-cookie", "b=2; path=/cart; Secure"),
            ("set-cookie", "c=3; Domain=other.example"),
        ),
    )
    assert response.header_list("set-cookie") == [
        b"a=1; Path=/app; Domain=client.example; HttpOnly",
        b"b=2; Path=/app/cart; Secure",
        b"c=3; Domain=other.example",
    ]
    plain = send(gateway, headers_target("/plain", ("set-cookie", "a=1; Path=/")))
    assert plain.header_list("set-cookie") == [b"a=1; Path=/"]


def test_routes_without_transformations_get_no_layer(upstreams: Upstreams) -> None:
    gateway = Gateway(transform_config(upstreams))
    for route, handler in zip(gateway.config.routes, gateway.route_handlers, strict=True):
        configured = route.request_headers or route.response_headers or route.redirects != "keep"
        if not configured and route.auth is None:
            assert handler is gateway.stacks[route.upstream].handler, route.path


# -- the layer in-process: what it costs, what it leaves alone -----------------------------


class _Answer(Handler):
    """The route's stack, in-process: answers every request at once with `headers`."""

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers

    async def handle_request(self, request: Request) -> Response:
        return Response(200, list(self.headers), BufferedStream(b"ok"))


def _layer(route: dict[str, Any], inner: Handler, hooks: Hooks | None = None) -> Handler:
    config = load_config(
        {
            "routes": [{"path": "/", "upstream": "one", **route}],
            "upstreams": {"one": {"servers": ["http://127.0.0.1:9"]}},
        }
    )
    return transform_layer(inner, config, 0, hooks)


def _request(*headers: tuple[bytes, bytes]) -> Request:
    upstream = load_config(
        {
            "routes": [{"path": "/", "upstream": "one"}],
            "upstreams": {"one": {"servers": ["http://127.0.0.1:9"]}},
        }
    ).upstreams["one"]
    exchange = Exchange("req-1", "/", upstream, "127.0.0.1", "/x", "http")
    return Request("GET", b"/x", [(b"accept", b"*/*"), *headers], RequestBody([], 0), exchange)


#: The transformation layer's modules, by the start of their file names.
LAYERS = str(Path(transform_layer.__code__.co_filename).with_name("transform"))


def test_header_rules_both_ways_cost_one_coroutine_and_one_call_each_way() -> None:
    inner = _Answer([(b"server", b"nginx"), (b"content-type", b"text/plain")])
    layer = _layer(
        {
            "request_headers": {"set": {"x-edge": "1"}, "add": {"x-via": "gateway"}},
            "response_headers": {"remove": ["server"]},
        },
        inner,
    )
    request = _request((b"x-request-id", b"req-1"))
    called: list[str] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(LAYERS):
            called.append(frame.f_code.co_name)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        response = asyncio.run(_handle(layer, request))
    finally:
        sys.setprofile(previous)
    assert request.headers == [
        (b"accept", b"*/*"),
        (b"x-request-id", b"req-1"),
        (b"x-edge", b"1"),
        (b"x-via", b"gateway"),
    ]
    assert response.headers == [(b"content-type", b"text/plain")]
    # The layer's own coroutine (no second one around the stack's), one call per direction.
    assert len(called) == 3, called
    # A client's header of a `set` name is replaced all the same.
    request = _request((b"x-edge", b"client's"))
    asyncio.run(_handle(layer, request))
    assert request.headers == [(b"accept", b"*/*"), (b"x-edge", b"1"), (b"x-via", b"gateway")]


async def _handle(layer: Handler, request: Request) -> Response:
    return await layer.handle_request(request)


@pytest.mark.parametrize(
    "rules",
    [
        {"remove": ["server"]},
        {"add": {"x-added": "1"}},
        {"set": {"server": "gateway"}, "add": {"x-id": "{request_id}"}},
        {"remove": ["x-absent"], "add": {"x-added": "1"}},
    ],
)
def test_response_rules_leave_the_header_list_they_are_given_alone(rules: dict[str, Any]) -> None:
    # A hook's answer may hand over a list of its own, used again for the next request.
    shared = [(b"server", b"hook"), (b"x-kept", b"1")]
    answer = Response(200, shared, BufferedStream(b"ok"))
    layer = _layer(
        {"response_headers": rules}, _Answer([]), Hooks(on_response=lambda request, response: answer)
    )
    first = asyncio.run(_handle(layer, _request())).headers
    assert shared == [(b"server", b"hook"), (b"x-kept", b"1")]
    assert first is not shared
    assert (b"x-kept", b"1") in first
    dropped = "server" in rules.get("remove", []) or "server" in rules.get("set", {})
    assert ((b"server", b"hook") in first) is not dropped


# -- start-up checks ---------------------------------------------------------------------


def one_route(**route: Any) -> dict[str, Any]:
    return {
        "routes": [{"path": "/api", "upstream": "one", **route}],
        "upstreams": {"one": {"servers": ["http://127.0.0.1:9"]}},
    }


@pytest.mark.parametrize(
    ("route", "key", "text"),
    [
        (
            {"rewrite": {"pattern": "^/(", "replacement": "/"}},
            "routes[0].rewrite.pattern",
            "regular expression",
        ),
        ({"rewrite": {"pattern": "^/(a)", "replacement": "/$2"}}, "routes[0].rewrite.replacement", "1 group"),
        (
            {"rewrite": {"pattern": "^/(a)", "replacement": "/${x}"}},
            "routes[0].rewrite.replacement",
            "no group",
        ),
        ({"rewrite": {"pattern": "^/a"}}, "routes[0].rewrite.replacement", "is required"),
        (
            {"strip_prefix": True, "rewrite": {"pattern": "^/(.*)", "replacement": "/../$1"}},
            "routes[0].rewrite.replacement",
            "dot segment",
        ),
        (
            {"rewrite": {"pattern": "^/api/(.*)", "replacement": "/other/$1"}},
            "routes[0].rewrite.replacement",
            "leave the route",
        ),
        ({"rewrite": {"pattern": "x", "replacement": "/a?b"}}, "routes[0].rewrite.replacement", "'?'"),
        (
            {"request_headers": {"set": {"x-a": "{nope}"}}},
            "routes[0].request_headers.set.x-a",
            "not a variable",
        ),
        ({"request_headers": {"set": {"x-a": "{server}"}}}, "routes[0].request_headers.set.x-a", "way back"),
        (
            {"request_headers": {"add": {"x-a": "{claim:sub}"}}},
            "routes[0].request_headers.add.x-a",
            "auth.jwt",
        ),
        ({"request_headers": {"set": {"Host": "x"}}}, "routes[0].request_headers.set.host", "own header"),
        ({"response_headers": {"remove": ["x-request-id"]}}, "routes[0].response_headers.remove[0]", "own"),
        (
            {"response_headers": {"set": {"x-a": "a\nb"}}},
            "routes[0].response_headers.set.x-a",
            "header value",
        ),
        ({"response_headers": {"set": {"x-a": "{"}}}, "routes[0].response_headers.set.x-a", "pair"),
        ({"request_headers": {"set": {"x a": "1"}}}, "routes[0].request_headers.set.x a", "header name"),
        ({"request_headers": {"bogus": {}}}, "routes[0].request_headers.bogus", "unknown key"),
        ({"redirects": "always"}, "routes[0].redirects", "keep, rewrite"),
        ({"cookies": True}, "routes[0].cookies", "non-empty string"),
        ({"forwarded": "yes"}, "routes[0].forwarded", "true or false"),
    ],
)
def test_invalid_transformations_are_config_errors_naming_the_key(
    route: dict[str, Any], key: str, text: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(one_route(**route))
    assert caught.value.path == key, caught.value
    assert text in str(caught.value)


def test_the_typed_config_is_checked_the_same_way() -> None:
    from asgi_gateway import RewriteConfig

    with pytest.raises(ConfigError) as caught:
        GatewayConfig(
            routes=(RouteConfig("/api", "one", rewrite=RewriteConfig("^/(", "/")),),
            upstreams={"one": UpstreamConfig("one", (ServerConfig("http://127.0.0.1:9"),))},
        )
    assert caught.value.path == "routes[0].rewrite.pattern"


def test_hooks_for_a_path_no_route_has_are_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        Gateway(one_route(), hooks={"/nope": Hooks(on_request=lambda request: None)})
    assert caught.value.path == "hooks['/nope']"
    with pytest.raises(ConfigError):
        Gateway(one_route(), hooks={"/api": print})  # type: ignore[dict-item]


# -- hooks -------------------------------------------------------------------------------


def hooks_config(upstreams: Upstreams) -> dict[str, Any]:
    return {
        "routes": [
            {"path": "/change", "upstream": "one", "response_headers": {"add": {"x-rule": "after-hook"}}},
            {"path": "/answer", "upstream": "one", "response_headers": {"add": {"x-rule": "on-answer"}}},
            {"path": "/boom", "upstream": "one"},
            {"path": "/boom-late", "upstream": "one"},
            {"path": "/refuse", "upstream": "one"},
            {"path": "/stream", "upstream": "one"},
            {"path": "/replace", "upstream": "one"},
            {"path": "/none", "upstream": "one"},
        ],
        "upstreams": {"one": {"servers": [{"url": upstreams.u1.url}], "retry": {"attempts": 1}}},
    }


def change_request(request: Request) -> Request:
    request.headers.append((b"x-hooked", b"sync"))
    request.target = request.target.replace(b"/change/", b"/change/changed/")
    return request


async def change_response(request: Request, response: Response) -> None:
    response.status = 201
    response.headers.append((b"x-hook-saw", request.exchange.route.encode()))


def answer(request: Request) -> Response:
    body = b"answered by the hook"
    return Response(200, [(b"content-type", b"text/plain"), (b"content-length", b"20")], BufferedStream(body))


def boom(request: Request) -> None:
    raise RuntimeError("secret detail of the failure")


async def boom_late(request: Request, response: Response) -> None:
    raise ValueError("secret detail, later")


def refuse(request: Request) -> None:
    raise Forbidden("not on a Sunday")


async def stream_response(request: Request, response: Response) -> Response:
    response.headers.append((b"x-streamed", b"yes"))
    return response


async def replace_body(request: Request, response: Response) -> Response:
    original = response.stream

    async def upper() -> AsyncIterator[bytes]:
        async for chunk in original:
            yield chunk.upper()

    class Upper:
        def __aiter__(self) -> AsyncIterator[bytes]:
            return upper()

        async def aclose(self) -> None:
            pass

    headers = [(name, value) for name, value in response.headers if name != b"content-length"]
    return Response(response.status, headers, Upper(), response.server)


HOOKS = {
    "/change": Hooks(on_request=change_request, on_response=change_response),
    "/answer": Hooks(on_request=answer, on_response=change_response),
    "/boom": Hooks(on_request=boom),
    "/boom-late": Hooks(on_response=boom_late),
    "/refuse": Hooks(on_request=refuse),
    "/stream": Hooks(on_response=stream_response),
    "/replace": Hooks(on_response=replace_body),
}


@pytest.fixture(scope="module")
def hooked(upstreams: Upstreams) -> Iterator[str]:
    with serve_app(make_host_app(hooks_config(upstreams), hooks=HOOKS)) as url:
        yield url


def test_hooks_change_the_request_and_the_response(hooked: str) -> None:
    response = send(hooked, "/change/echo")
    assert response.status == 201
    body = response.json()
    assert body["raw_path"] == "/change/changed/echo"
    assert ["x-hooked", "sync"] in body["headers"]
    assert response.header("x-hook-saw") == b"/change"
    # The route's response rules run after the hook.
    assert response.header("x-rule") == b"after-hook"


def test_a_hook_answers_without_the_upstream(upstreams: Upstreams, hooked: str) -> None:
    before = upstreams.u1.requests()
    response = send(hooked, "/answer/echo")
    assert (response.status, response.body) == (200, b"answered by the hook")
    assert response.header("x-request-id")
    assert response.header("x-rule") == b"on-answer"
    # on_response is for the upstream's answers: the hook's own status stays.
    assert response.header("x-hook-saw") is None
    assert upstreams.u1.requests() == before


@pytest.mark.parametrize(
    ("path", "detail"), [("/boom/echo", "on_request"), ("/boom-late/echo", "on_response")]
)
def test_a_hook_that_raises_is_a_500_with_the_request_id_and_is_logged(
    hooked: str, caplog: pytest.LogCaptureFixture, path: str, detail: str
) -> None:
    with caplog.at_level(logging.ERROR, logger="asgi_gateway"):
        response = send(hooked, path, ("X-Request-Id", "hook-fail-1"))
    assert response.status == 500
    assert response.json() == {
        "error": "internal_error",
        "detail": f"the route's {detail} hook failed",
        "request_id": "hook-fail-1",
    }
    assert b"secret detail" not in response.body and b"Traceback" not in response.body
    records = [r for r in caplog.records if getattr(r, "request_id", None) == "hook-fail-1"]
    assert records and records[0].exc_info is not None
    # The upstream's connection was given back: the next request is served.
    assert send(hooked, "/none/echo").status == 200


def test_a_hook_raising_a_gateway_error_answers_with_it(hooked: str) -> None:
    response = send(hooked, "/refuse/echo")
    assert response.status == 403
    assert response.json()["error"] == "forbidden"


def test_a_streamed_body_passes_a_hook_untouched_and_as_it_comes(upstreams: Upstreams, hooked: str) -> None:
    n = 3
    received: list[str] = []
    with http_client(hooked, timeout=httpx.Timeout(10, read=5)) as client:
        with client.stream("GET", f"/stream/sse?n={n}&gate=transform-hook") as response:
            assert response.headers["x-streamed"] == "yes"
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                received.append(line)
                if len(received) < n:
                    # Event i+1 does not exist yet: a buffered body would never get here.
                    upstreams.u1.release("transform-hook")
    assert received == [f"data: event {i}" for i in range(n)]


def test_a_hook_replaces_the_body_reading_the_upstreams(upstreams: Upstreams, hooked: str) -> None:
    with http_client(hooked) as client:
        response = client.get("/replace/stream?n=2&size=10")
        assert response.status_code == 200
        expected = (bytes(range(10)) * 2).upper()
        assert response.content == expected
        # Closed after the new body: the connection serves the next request.
        assert client.get("/replace/echo").status_code == 200


def test_hooks_in_the_mounted_form(upstreams: Upstreams) -> None:
    gateway = Gateway(hooks_config(upstreams), hooks=HOOKS)
    app = Starlette(lifespan=gateway.lifespan)
    app.mount("/gw", gateway)
    with serve_app(app) as base, http_client(base) as client:
        response = client.get("/gw/change/echo")
        assert response.status_code == 201
        assert response.json()["raw_path"] == "/change/changed/echo"
        failed = client.get("/gw/boom/echo")
        assert failed.status_code == 500
        assert failed.json()["request_id"] == failed.headers["x-request-id"]


def test_routes_without_hooks_get_no_layer(upstreams: Upstreams) -> None:
    gateway = Gateway(hooks_config(upstreams), hooks=HOOKS)
    index = [route.path for route in gateway.config.routes].index("/none")
    assert gateway.route_handlers[index] is gateway.stacks["one"].handler


# -- Forwarded ---------------------------------------------------------------------------


def forwarded_config(upstreams: Upstreams, **top: Any) -> dict[str, Any]:
    return {
        "routes": [
            {"path": "/fwd", "upstream": "one"},
            {"path": "/off", "upstream": "one", "forwarded": False},
        ],
        "upstreams": {"one": {"servers": [{"url": upstreams.u1.url}]}},
        "forwarded": True,
        **top,
    }


@pytest.fixture(scope="module")
def untrusted(upstreams: Upstreams) -> Iterator[str]:
    with serve_app(make_host_app(forwarded_config(upstreams))) as url:
        yield url


@pytest.fixture(scope="module")
def trusted(upstreams: Upstreams) -> Iterator[str]:
    with serve_app(make_host_app(forwarded_config(upstreams, trusted_proxies=["127.0.0.1"]))) as url:
        yield url


def forwarded(response: RawResponse) -> list[str]:
    return values(seen(response), "forwarded")


def test_forwarded_is_generated(untrusted: str) -> None:
    assert forwarded(send(untrusted, "/fwd/echo")) == ['for=127.0.0.1;proto=http;host="client.example:8080"']
    assert forwarded(send(untrusted, "/fwd/echo", host="api.example")) == [
        "for=127.0.0.1;proto=http;host=api.example"
    ]


def test_an_untrusted_clients_forwarded_is_replaced(untrusted: str) -> None:
    response = send(untrusted, "/fwd/echo", ("Forwarded", "for=198.51.100.1;proto=https"), host="a.example")
    assert forwarded(response) == ["for=127.0.0.1;proto=http;host=a.example"]


@pytest.mark.parametrize(
    "value", ["for=1.2.3.4 ;proto=http", "for=2001:db8::1", "garbage", "for=1.2.3.4;for=5.6.7.8"]
)
def test_a_malformed_forwarded_is_dropped(untrusted: str, trusted: str, value: str) -> None:
    for url in (untrusted, trusted):
        response = send(url, "/fwd/echo", ("Forwarded", value), host="a.example")
        assert forwarded(response) == ["for=127.0.0.1;proto=http;host=a.example"], url


def test_a_trusted_proxys_chain_is_appended_to(trusted: str) -> None:
    response = send(
        trusted,
        "/fwd/echo",
        ("Forwarded", 'for=192.0.2.60;proto=https;by="[2001:db8::17]:4711"'),
        ("Forwarded", 'for="[2001:db8:cafe::17]";host=shop.example, for=_hidden'),
        host="a.example",
    )
    assert forwarded(response) == [
        'for=192.0.2.60;proto=https;by="[2001:db8::17]:4711", for="[2001:db8:cafe::17]";host=shop.example,'
        " for=_hidden, for=127.0.0.1;proto=http;host=a.example"
    ]


def test_an_untrusted_client_cannot_spoof_forwarded_with_x_forwarded_headers(untrusted: str) -> None:
    response = send(
        untrusted,
        "/fwd/echo",
        ("X-Forwarded-For", "198.51.100.1, 203.0.113.7"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "https"),
        ("Forwarded", "for=198.51.100.1;proto=https;host=evil.example"),
        host="a.example",
    )
    assert forwarded(response) == ["for=127.0.0.1;proto=http;host=a.example"]


def test_behind_a_trusted_proxy_the_gateways_element_describes_its_own_hop(trusted: str) -> None:
    # The proxy rewrote Host to an internal name and says the client's in its own element (and
    # in X-Forwarded-*): the gateway's element names the Host it received, the proxy's address
    # and the scheme of that connection (RFC 7239 5.3: each hop's "host" is the one it got).
    response = send(
        trusted,
        "/fwd/echo",
        ("X-Forwarded-For", "192.0.2.60"),
        ("X-Forwarded-Host", "shop.example"),
        ("X-Forwarded-Proto", "https"),
        ("Forwarded", "for=192.0.2.60;proto=https;host=shop.example"),
        host="gateway.internal:8080",
    )
    assert forwarded(response) == [
        'for=192.0.2.60;proto=https;host=shop.example, for=127.0.0.1;proto=http;host="gateway.internal:8080"'
    ]
    # The X-Forwarded-* headers still carry the proxy's claims on.
    got = seen(response)
    assert values(got, "x-forwarded-host") == ["shop.example"]
    assert values(got, "x-forwarded-for") == ["192.0.2.60, 127.0.0.1"]


def test_forwarded_off_keeps_todays_behaviour(untrusted: str, trusted: str) -> None:
    chain = "for=192.0.2.60;proto=https"
    # Off on the route: a trusted proxy's passes as it is, an untrusted client's goes.
    assert forwarded(send(trusted, "/off/echo", ("Forwarded", chain))) == [chain]
    assert forwarded(send(untrusted, "/off/echo", ("Forwarded", chain))) == []


@contextlib.contextmanager
def serve_on_ipv6(app: Any) -> Iterator[str]:
    """`app` under uvicorn on [::1], so that the client's address is an IPv6 one."""
    server = GatewayServer(app)
    server.socket.close()
    server.socket = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    server.socket.bind(("::1", 0))
    port = server.socket.getsockname()[1]
    with server:
        yield f"http://[::1]:{port}"


def test_forwarded_from_an_ipv6_client_quotes_it(upstreams: Upstreams) -> None:
    with serve_on_ipv6(make_host_app(forwarded_config(upstreams))) as url:
        with RawConnection("::1", int(url.rsplit(":", 1)[1])) as conn:
            conn.send(b"GET /fwd/echo HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n")
            response = conn.read_response()
    assert forwarded(response) == ['for="[::1]";proto=http;host="[::1]"']
