"""Unit tests of the compiled router (the end-to-end matrix lives in test_proxy.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_gateway import BadRequest, load_config
from asgi_gateway._routing import Router, resolve_dot_segments


def router(*routes: dict[str, object]) -> Router:
    upstreams = {name: {"servers": ["http://127.0.0.1:9"]} for name in {str(r["upstream"]) for r in routes}}
    return Router(load_config({"routes": list(routes), "upstreams": upstreams}))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/api/users", b"/api/users"),
        (b"/api/users/7", b"/api/users/7"),
        (b"/api/users/", b"/api/users/"),
        (b"/api/usersX", None),
        (b"/api", None),
        (b"/other/api/users", None),
    ],
)
def test_prefix_matches_whole_segments(path: bytes, expected: bytes | None) -> None:
    match = router({"path": "/api/users", "upstream": "users"}).match("GET", None, path)
    assert (match[1] if match else None) == expected


def test_first_match_wins_in_config_order() -> None:
    r = router({"path": "/api", "upstream": "a"}, {"path": "/api/users", "upstream": "b"})
    match = r.match("GET", None, b"/api/users/1")
    assert match is not None and match[0].upstream == "a"
    r = router({"path": "/api/users", "upstream": "b"}, {"path": "/api", "upstream": "a"})
    match = r.match("GET", None, b"/api/users/1")
    assert match is not None and match[0].upstream == "b"
    match = r.match("GET", None, b"/api/orders")
    assert match is not None and match[0].upstream == "a"


def test_methods_and_host_narrow_a_route() -> None:
    r = router(
        {"path": "/api", "upstream": "writes", "methods": ["post", "PUT"]},
        {"path": "/api", "upstream": "special", "host": "API.example.com"},
        {"path": "/", "upstream": "fallback"},
    )
    assert r.match("POST", None, b"/api/x")[0].upstream == "writes"  # type: ignore[index]
    assert r.match("GET", "api.example.com", b"/api/x")[0].upstream == "special"  # type: ignore[index]
    assert r.match("GET", "other.example.com", b"/api/x")[0].upstream == "fallback"  # type: ignore[index]


def test_strip_prefix_keeps_the_rest_raw() -> None:
    r = router({"path": "/api/users", "upstream": "users", "strip_prefix": True})
    assert r.match("GET", None, b"/api/users/7")[1] == b"/7"  # type: ignore[index]
    assert r.match("GET", None, b"/api/users")[1] == b"/"  # type: ignore[index]
    assert r.match("GET", None, b"/api/users/a%20b/")[1] == b"/a%20b/"  # type: ignore[index]


@pytest.mark.parametrize(
    ("raw", "resolved"),
    [
        (b"/a/b/../c", b"/a/c"),
        (b"/a/./b", b"/a/b"),
        (b"/../../etc", b"/etc"),
        (b"/a/b/..", b"/a/"),
        (b"/a/.", b"/a/"),
        (b"/a/..b/c", b"/a/..b/c"),
        (b"/plain/path", b"/plain/path"),
    ],
)
def test_resolve_dot_segments(raw: bytes, resolved: bytes) -> None:
    assert resolve_dot_segments(raw) == resolved


def test_dot_segments_cannot_escape_a_route() -> None:
    r = router({"path": "/api/users", "upstream": "users"}, {"path": "/admin", "upstream": "admin"})
    match = r.match("GET", None, b"/api/users/../../admin/x")
    assert match is not None and match[0].upstream == "admin" and match[1] == b"/admin/x"
    assert r.match("GET", None, b"/api/users/../secret") is None


@pytest.mark.parametrize(
    "path",
    [
        b"/api/users/%2e%2e/%2e%2e/admin",
        b"/api/users/..%2f..%2fadmin",
        b"/api/users/%252e%252e/%252e%252e/admin",
        b"/api/users/..\\..\\admin",
        b"/api%2fusers",
        b"/api/users/..;/..;/admin",
        b"/api/users/%2e%2e;x=1/%2e%2e;/admin",
    ],
)
def test_encoded_tricks_that_change_the_route_are_refused(path: bytes) -> None:
    r = router({"path": "/api/users", "upstream": "users"}, {"path": "/admin", "upstream": "admin"})
    with pytest.raises(BadRequest):
        r.match("GET", None, path)


def test_harmless_encodings_pass() -> None:
    r = router({"path": "/api/users", "upstream": "users"})
    match = r.match("GET", None, b"/api/users/a%2Fb/%C3%A9")
    assert match is not None and match[1] == b"/api/users/a%2Fb/%C3%A9"
    match = r.match("GET", None, b"/%61pi/users/1")
    assert match is not None and match[0].upstream == "users"
    match = r.match("GET", None, b"/api/users/7;jsessionid=abc")
    assert match is not None and match[1] == b"/api/users/7;jsessionid=abc"


def test_match_cost_does_not_grow_with_route_count() -> None:
    routes = [{"path": f"/svc{i}/v1", "upstream": "u"} for i in range(1000)]
    r = router(*routes)
    match = r.match("GET", None, b"/svc999/v1/items")
    assert match is not None and match[0].index == 999
    # The table is keyed by prefix: a lookup touches one entry per path depth, not every route.
    assert r._max_depth == 2


# -- the plain-path fast lookup agrees with the general one ------------------------------------

_SEGMENT = st.sampled_from(["api", "users", "v1", "42", "a.b", "x-y", "é"])


@st.composite
def _routes_and_path(draw: st.DrawFn) -> tuple[list[dict[str, object]], bytes, str, str | None]:
    routes: list[dict[str, object]] = []
    for _ in range(draw(st.integers(1, 6))):
        route: dict[str, object] = {
            "path": "/" + "/".join(draw(st.lists(_SEGMENT, max_size=3))),
            "upstream": "u",
            "strip_prefix": draw(st.booleans()),
        }
        if draw(st.booleans()):
            route["methods"] = draw(st.lists(st.sampled_from(["GET", "POST"]), min_size=1, max_size=2))
        if draw(st.booleans()):
            route["host"] = draw(st.sampled_from(["a.example", "b.example"]))
        routes.append(route)
    segments = draw(st.lists(_SEGMENT, max_size=5))
    path = ("/" + "/".join(segments) + draw(st.sampled_from(["", "/"]))).encode()
    method = draw(st.sampled_from(["GET", "POST", "PUT"]))
    host = draw(st.sampled_from([None, "a.example", "b.example"]))
    return routes, path, method, host


@settings(max_examples=300, deadline=None)
@given(_routes_and_path())
def test_plain_path_lookup_matches_the_general_one(
    case: tuple[list[dict[str, object]], bytes, str, str | None],
) -> None:
    routes, path, method, host = case
    router = Router(
        load_config({"routes": routes, "upstreams": {"u": {"servers": [{"url": "http://127.0.0.1:1"}]}}})
    )
    assert router.match(method, host, path) == router._match_general(method, host, path)


def test_plain_path_lookup_examples() -> None:
    router = Router(
        load_config(
            {
                "routes": [
                    {"path": "/api/users", "upstream": "u", "methods": ["POST"]},
                    {"path": "/api", "upstream": "u", "strip_prefix": True},
                    {"path": "/", "upstream": "u"},
                ],
                "upstreams": {"u": {"servers": [{"url": "http://127.0.0.1:1"}]}},
            }
        )
    )
    assert router.match("GET", None, b"/api/users/7") == (router.routes[1], b"/users/7")
    assert router.match("POST", None, b"/api/users/7") == (router.routes[0], b"/api/users/7")
    assert router.match("GET", None, b"/api") == (router.routes[1], b"/")
    assert router.match("GET", None, b"/api/") == (router.routes[1], b"/")
    assert router.match("GET", None, b"/apix") == (router.routes[2], b"/apix")
    assert router.match("GET", None, b"/") == (router.routes[2], b"/")
