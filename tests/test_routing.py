"""Unit tests of the compiled router (the end-to-end matrix lives in test_proxy.py)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from types import FrameType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_gateway import BadRequest, ConfigError, GatewayConfig, load_config
from asgi_gateway._routing import Route, Router, resolve_dot_segments


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


# -- rewrites ------------------------------------------------------------------------------------


def _expand(replacement: str) -> bytes:
    """A rewrite's replacement in `re`'s own template syntax (`Match.expand`)."""
    out = re.sub(
        r"\$(?:(\$)|(\d+)|\{(\w+)\})", lambda m: "$" if m[1] else f"\\g<{m[2] or m[3]}>", replacement
    )
    return out.encode("ascii")


def _rewritten_by_the_book(
    router: Router, config: GatewayConfig, method: str, path: bytes
) -> tuple[Route, bytes] | None:
    """What a rewrite does, the long way: `re`'s expansion, and always the full re-match."""
    found = Router.match(router, method, None, path)
    if found is None or found[0].rewrite is None:
        return found
    route, sent = found
    spec = config.routes[route.index].rewrite
    assert spec is not None
    hit = re.search(spec.pattern.encode("ascii"), sent)
    if hit is None:
        return found
    rewritten = sent[: hit.start()] + hit.expand(_expand(spec.replacement)) + sent[hit.end() :]
    as_sent = (
        b"".join(b"/" + part for part in route.segments) + rewritten if route.strip_prefix else rewritten
    )
    again = Router.match(router, method, None, as_sent)
    if again is None or again[0] is not route:
        raise BadRequest("the rewritten path would leave its route")
    return again


_REWRITES = [
    {"pattern": "^/(.*)$", "replacement": "/v2/$1"},
    {"pattern": r"^/(?P<version>v\d+)/([^/]+)/(\d+)$", "replacement": "/$3/${version}/$2"},
    {"pattern": "users", "replacement": "people"},
    {"pattern": "^/x-([^/]*)-([^/]*)/(.*)$", "replacement": "/$1$2/$3"},
    {"pattern": "^/(a)?b/(.*)", "replacement": "/[$1]%20$$/${2}"},
    {"pattern": "^/([^/]*)(/.*)?$", "replacement": "$2/$1"},
    {"pattern": "^/item/(.*)", "replacement": "/item;v=1/${1}"},
]
_REWRITE_SEGMENT = st.sampled_from(
    ["users", "v2", "7", "a", "b", "x-.-.", "x-a-b", ".", "..", "%2e", "", "a;b"]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["/", "/api", "/api/users", "/item"]),
            st.booleans(),
            st.none() | st.sampled_from(range(len(_REWRITES))),
        ),
        min_size=1,
        max_size=4,
    ),
    st.lists(_REWRITE_SEGMENT, max_size=5),
)
def test_a_rewrite_gives_what_res_own_expansion_and_a_full_rematch_give(
    specs: list[tuple[str, bool, int | None]], segments: list[str]
) -> None:
    routes: list[dict[str, object]] = []
    for path, strip, rewrite in specs:
        route: dict[str, object] = {"path": path, "upstream": "u", "strip_prefix": strip}
        if rewrite is not None:
            route["rewrite"] = _REWRITES[rewrite]
        routes.append(route)
    try:
        config = load_config({"routes": routes, "upstreams": {"u": {"servers": ["http://127.0.0.1:1"]}}})
    except ConfigError:
        return  # a rewrite the route cannot take (checked at start-up, not here)
    r = Router(config)
    path = ("/" + "/".join(segments)).encode()
    try:
        expected: object = _rewritten_by_the_book(r, config, "GET", path)
    except BadRequest as exc:
        expected = type(exc)
    try:
        assert r.match("GET", None, path) == expected
    except BadRequest as exc:
        assert type(exc) is expected


@pytest.mark.parametrize(
    ("rewrite", "path", "expected"),
    [
        ({"pattern": "^/(.*)$", "replacement": "/v2/$1"}, b"/1k", b"/v2/1k"),
        # Group 0, a group that took no part, a literal "%" and "$".
        ({"pattern": "^/(a)?b/(.*)", "replacement": "/$1[$0]%20$$/${2}"}, b"/b/c", b"/[/b/c]%20$/c"),
        # Not anchored: the text around the match stays.
        ({"pattern": "users", "replacement": "people"}, b"/api/users/7", b"/api/people/7"),
        ({"pattern": "^/(?P<a>[^/]*)/(?P<b>[^/]*)$", "replacement": "/${b}/${a}/$1"}, b"/x/y", b"/y/x/x"),
    ],
)
def test_rewrite_examples(rewrite: dict[str, str], path: bytes, expected: bytes) -> None:
    match = router({"path": "/", "upstream": "u", "rewrite": rewrite}).match("GET", None, path)
    assert match is not None and match[1] == expected


def _python_calls(call: Callable[[], object]) -> list[str]:
    """The Python functions one `call()` runs, itself included (built-ins left out)."""
    called: list[str] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call":
            called.append(frame.f_code.co_name)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(previous)
    return called[1:]  # the lambda itself


def test_a_rewrite_costs_the_routes_without_one_no_call() -> None:
    edge = {"path": "/edge", "upstream": "u", "rewrite": {"pattern": "^/edge/(.*)$", "replacement": "/$1"}}
    plain = router({"path": "/edge", "upstream": "u"}, {"path": "/", "upstream": "u"})
    rewriting = router(edge, {"path": "/", "upstream": "u"})
    for path in (b"/1k", b"/a/../1k"):
        assert rewriting.match("GET", None, path) == (rewriting.routes[1], path.replace(b"/a/..", b""))
        without = _python_calls(lambda: plain.match("GET", None, path))  # noqa: B023
        assert len(_python_calls(lambda: rewriting.match("GET", None, path))) == len(without)  # noqa: B023
