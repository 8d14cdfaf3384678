"""The rules a route keeps: what it matches, its limits and IP rules, its rate limit and
auth, and its header rules and rewrite (`routes[i]`)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from typing import Final
from urllib.parse import unquote_to_bytes, urlsplit

from .checks import _positive
from .models import (
    _HMAC_ALGORITHMS,
    HTTP_METHODS,
    JWT_ALGORITHMS,
    HeaderRulesConfig,
    JwtConfig,
    RouteConfig,
    _Inherit,
)
from .reader import _Errors
from .templates import _KeyedError, compile_rewrite, header_template


def _check_route(
    where: str, route: RouteConfig, upstreams: Collection[str] | None, errors: _Errors, *, redis: bool
) -> None:
    """`upstreams` is None when there are none to check `route.upstream` against.

    `redis` tells whether the top-level `redis` section is there.
    """
    if not isinstance(route.path, str) or not route.path.startswith("/"):
        errors.add(f"{where}.path", f"{route.path!r} must start with '/'")
    elif "?" in route.path or "#" in route.path or "%" in route.path:
        errors.add(f"{where}.path", f"{route.path!r} must be a plain path without '?', '#' or '%'")
    if upstreams is not None and route.upstream not in upstreams:
        known = ", ".join(sorted(upstreams))
        errors.add(f"{where}.upstream", f"{route.upstream!r} is not a configured upstream ({known})")
    for method in route.methods or ():
        if method not in HTTP_METHODS and not re.fullmatch(r"[A-Z][A-Z0-9_-]*", method):
            errors.add(f"{where}.methods", f"{method!r} is not an HTTP method")
    if route.host is not None and (not route.host or any(c in route.host for c in "/ ")):
        errors.add(f"{where}.host", f"{route.host!r} is not a host name")
    if not isinstance(route.max_body_size, _Inherit) and route.max_body_size is not None:
        _positive(f"{where}.max_body_size", route.max_body_size, errors, allow_zero=True)
    if not isinstance(route.max_message_size, _Inherit) and route.max_message_size is not None:
        _positive(f"{where}.max_message_size", route.max_message_size, errors, allow_zero=True)
    for key in ("allow_ips", "deny_ips"):
        for i, spec in enumerate(getattr(route, key) or ()):
            if not _is_network(spec):
                errors.add(f"{where}.{key}[{i}]", f"{spec!r} is not an IP address or CIDR")
    if route.rate_limit is not None:
        _check_rate_limit(f"{where}.rate_limit", route, errors, redis=redis)
    if route.auth is not None:
        if route.auth.jwt is None:
            errors.add(f"{where}.auth.jwt", "is required in auth (the only method so far)")
        else:
            _check_jwt(f"{where}.auth.jwt", route.auth.jwt, errors)
    claims = route.auth is not None and route.auth.jwt is not None
    if route.request_headers is not None:
        _check_header_rules(f"{where}.request_headers", route.request_headers, errors, up=True, claims=claims)
    if route.response_headers is not None:
        _check_header_rules(
            f"{where}.response_headers", route.response_headers, errors, up=False, claims=claims
        )
    if route.rewrite is not None:
        _check_rewrite(f"{where}.rewrite", route, errors)
    for key in ("redirects", "cookies"):
        if getattr(route, key) not in ("keep", "rewrite"):
            errors.add(f"{where}.{key}", f"{getattr(route, key)!r} is not one of keep, rewrite")
    if not isinstance(route.forwarded, bool | _Inherit):
        errors.add(f"{where}.forwarded", f"{route.forwarded!r} is not true or false")


# -- header rules and rewrites --------------------------------------------------------------

# The hop-by-hop headers, as the relay drops them (`_proxy.HOP_BY_HOP`).
_HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
# Headers the gateway itself frames or sets on the way up (the transport sends Host; the
# telemetry layer sends traceparent); a rule on them would be overridden or contradict them.
_RULE_RESERVED_UP: Final = _HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "x-request-id",
    "traceparent",
    "tracestate",
}
# ... and on the way back, where the server in front frames the body and adds Date.
_RULE_RESERVED_DOWN: Final = _HOP_BY_HOP | {"content-length", "x-request-id", "date"}
# A WebSocket handshake's own headers, both ways: its client and the server in front write them.
_WEBSOCKET_HANDSHAKE: Final = "sec-websocket-"
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e]*$")


def _check_header_rules(
    where: str, rules: HeaderRulesConfig, errors: _Errors, *, up: bool, claims: bool
) -> None:
    reserved = _RULE_RESERVED_UP if up else _RULE_RESERVED_DOWN
    for kind in ("set", "add", "remove"):
        entries = getattr(rules, kind)
        names = entries if kind == "remove" else list(entries)
        for i, name in enumerate(names):
            at = f"{where}.{kind}[{i}]" if kind == "remove" else f"{where}.{kind}.{name}"
            if not isinstance(name, str) or not _HEADER_NAME.match(name.lower()):
                errors.add(at, f"{name!r} is not a header name")
            elif name.lower() in reserved or name.lower().startswith(_WEBSOCKET_HANDSHAKE):
                errors.add(at, f"{name!r} is the gateway's own header{'' if up else ' on the way back'}")
            elif kind != "remove":
                _check_header_value(at, entries[name], errors, up=up, claims=claims)


def _check_header_value(where: str, value: object, errors: _Errors, *, up: bool, claims: bool) -> None:
    if not isinstance(value, str) or not _HEADER_VALUE.match(value):
        errors.add(where, f"{value!r} is not a header value (printable ASCII)")
        return
    try:
        parts = header_template(value)
    except ValueError as exc:
        errors.add(where, str(exc))
        return
    for part in parts:
        if part == ("var", "server") and up:
            errors.add(where, "{server} is only known on the way back (use it in response_headers)")
        elif isinstance(part, tuple) and part[0] == "claim" and not claims:
            errors.add(where, f"{{claim:{part[1]}}} needs the route's auth.jwt (claims come from its token)")


def _check_rewrite(where: str, route: RouteConfig, errors: _Errors) -> None:
    assert route.rewrite is not None
    try:
        _, parts = compile_rewrite(route.rewrite)
    except _KeyedError as exc:
        errors.add(f"{where}.{exc.key}", str(exc))
        return
    at = f"{where}.replacement"
    replacement = route.rewrite.replacement
    # What the replacement's own text tells; what the groups bring is checked on each
    # request (the path must still route to this same route).
    shape = b"".join(part if isinstance(part, bytes) else b"x" for part in parts)
    segments = [unquote_to_bytes(segment) for segment in shape.split(b"/")[1:]]
    if b"?" in shape or b"#" in shape:
        errors.add(at, f"{replacement!r}: a path has no '?' or '#' (the query string goes upstream as it is)")
    elif b"//" in shape or any(segment in (b".", b"..") for segment in segments):
        errors.add(at, f"{replacement!r} has an empty or dot segment: it could leave its route")
    elif (
        not route.strip_prefix
        and isinstance(route.path, str)
        and route.rewrite.pattern.startswith(("^", "\\A"))
    ):
        _check_stays(at, route.path, parts, errors)


def _check_stays(where: str, prefix: str, parts: tuple[bytes | int | str, ...], errors: _Errors) -> None:
    """On a route that keeps its prefix, refuse a replacement whose own text leaves the prefix.

    The pattern is anchored at the path's start, so the path begins with the replacement; its
    segments up to the last `/` before a group are fixed text.
    """
    literal = b""
    for part in parts:
        if not isinstance(part, bytes):
            break
        literal += part
    if not literal.startswith(b"/"):
        return  # starts with a group's text: only a request can tell
    fixed = literal.split(b"/")[1:-1]
    expected = [segment for segment in prefix.encode("utf-8").split(b"/") if segment]
    if all(a == b for a, b in zip(fixed, expected, strict=False)):
        return
    errors.add(
        where,
        f"the path would always leave the route's prefix {prefix!r} (with strip_prefix: true,"
        " the replacement rewrites the path below the prefix)",
    )


def _is_network(spec: object) -> bool:
    if not isinstance(spec, str):
        return False
    try:
        ipaddress.ip_network(spec, strict=False)
    except ValueError:
        return False
    return True


_RATE_LIMIT_KEY = re.compile(r"^(client_ip|route|header:[!#$%&'*+.^_`|~0-9A-Za-z-]+|claim:[^\s]+)$")
# Headers the gateway or the server in front owns: a claim must never be sent as one of these.
_RESERVED_HEADERS: Final = _RULE_RESERVED_UP | {"authorization"}
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")


def _check_rate_limit(where: str, route: RouteConfig, errors: _Errors, *, redis: bool) -> None:
    limit = route.rate_limit
    assert limit is not None
    _positive(f"{where}.rate", limit.rate, errors)
    _positive(f"{where}.per", limit.per, errors)
    if limit.burst is not None and (
        isinstance(limit.burst, bool) or not isinstance(limit.burst, int) or limit.burst < 1
    ):
        errors.add(f"{where}.burst", f"{limit.burst!r} must be an integer of at least 1")
    if not isinstance(limit.key, str) or not _RATE_LIMIT_KEY.match(limit.key):
        errors.add(f"{where}.key", f"{limit.key!r} is not client_ip, header:NAME, claim:NAME or route")
    elif limit.key.startswith("claim:") and (route.auth is None or route.auth.jwt is None):
        errors.add(f"{where}.key", f"{limit.key!r} needs the route's auth.jwt (claims come from its token)")
    if limit.backend not in ("memory", "redis"):
        errors.add(f"{where}.backend", f"{limit.backend!r} is not one of memory, redis")
    elif limit.backend == "redis" and not redis:
        errors.add(f"{where}.backend", "redis needs the top-level redis section (its url)")


def _check_jwt(where: str, jwt: JwtConfig, errors: _Errors) -> None:
    sources = [key for key in ("jwks_url", "public_key", "secret") if getattr(jwt, key) is not None]
    # Reported at a key inside the section, so that the section's other errors still show.
    if not sources:
        errors.add(f"{where}.jwks_url", "one of jwks_url, public_key or secret is required")
    for extra in sources[1:]:
        errors.add(
            f"{where}.{extra}", f"only one of jwks_url, public_key or secret may be set (also: {sources[0]})"
        )
    if jwt.jwks_url is not None:
        parts = urlsplit(jwt.jwks_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            errors.add(f"{where}.jwks_url", f"{jwt.jwks_url!r} is not an http(s) URL")
    if jwt.public_key is not None and "-----BEGIN" not in jwt.public_key:
        errors.add(f"{where}.public_key", "is not a PEM public key (-----BEGIN PUBLIC KEY-----...)")
    if not jwt.algorithms:
        errors.add(f"{where}.algorithms", "at least one algorithm is required")
    for i, algorithm in enumerate(jwt.algorithms):
        if algorithm not in JWT_ALGORITHMS:
            errors.add(f"{where}.algorithms[{i}]", f"{algorithm!r} is not one of {', '.join(JWT_ALGORITHMS)}")
    hmac = [a for a in jwt.algorithms if a in _HMAC_ALGORITHMS]
    # One key, one family: a public key accepted as an HMAC secret is the HS/RS confusion attack.
    if jwt.secret is not None and len(hmac) != len(jwt.algorithms):
        errors.add(
            f"{where}.algorithms", f"{list(jwt.algorithms)!r}: a secret only verifies HS256, HS384, HS512"
        )
    elif jwt.secret is None and hmac:
        errors.add(
            f"{where}.algorithms", f"{hmac!r} need a secret; jwks_url and public_key verify the others"
        )
    _positive(f"{where}.leeway", jwt.leeway, errors, allow_zero=True)
    for claim, header in jwt.claims_to_headers.items():
        if not _HEADER_NAME.match(header) or header in _RESERVED_HEADERS:
            errors.add(
                f"{where}.claims_to_headers.{claim}", f"{header!r} is not a header name a claim may set"
            )
