"""`GatewayConfig` and the rules every config keeps, checked however it was built.

`GatewayConfig` lives here, beside `validate`, because it validates itself on construction.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Final
from urllib.parse import unquote_to_bytes, urlsplit

from .models import (
    _HMAC_ALGORITHMS,
    BALANCERS,
    HTTP_METHODS,
    JWT_ALGORITHMS,
    RETRY_CONDITIONS,
    AdaptiveConcurrencyConfig,
    AdminConfig,
    DiscoveryConfig,
    HeaderRulesConfig,
    JwtConfig,
    RedisConfig,
    RouteConfig,
    UpstreamConfig,
    _Inherit,
)
from .reader import _Errors
from .templates import _KeyedError, compile_rewrite, header_template


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The whole configuration, typed and frozen; the mapping form's top level.

    Build it with `load_config` from a mapping or a file, or directly from the config
    objects; either way it is validated on construction and raises `ConfigError`.
    `upstreams` maps each upstream's name to its `UpstreamConfig`.
    """

    routes: tuple[RouteConfig, ...]
    upstreams: Mapping[str, UpstreamConfig]
    max_body_size: int | None = 10 * 1024 * 1024
    preserve_host: bool = False
    trusted_proxies: tuple[str, ...] = ()
    status_path: str | None = None
    #: The largest WebSocket message, either way; each is held whole while relayed.
    max_message_size: int | None = 1024 * 1024
    #: The Redis that `backend: redis` rate limits use; None when no route needs one.
    redis: RedisConfig | None = None
    #: Send an RFC 7239 `Forwarded` header upstream on every route that does not say otherwise.
    forwarded: bool = False
    #: On SIGTERM, how long requests in flight may take to finish (s).
    drain_timeout: float = 30.0
    #: On SIGTERM, how long readiness fails while everything is still served (s).
    drain_delay: float = 0.0
    admin: AdminConfig = field(default_factory=AdminConfig)

    def __post_init__(self) -> None:
        validate(self)


#: The most extra tries `hedge.max_extra` may ask for: each is one more request on the fleet.
_MAX_EXTRA_HEDGES: Final = 4
_HASH_ON = re.compile(r"^(header:[!#$%&'*+.^_`|~0-9A-Za-z-]+|cookie:[^\s;=,]+|client_ip|path)$")


def validate(config: GatewayConfig) -> None:
    """Check cross-field rules on a config however it was built; raise one `ConfigError` naming all."""
    errors = _Errors()
    if not config.routes:
        errors.add("routes", "at least one route is required")
    for i, route in enumerate(config.routes):
        _check_route(f"routes[{i}]", route, config.upstreams or None, errors, redis=config.redis is not None)
    if not config.upstreams:
        errors.add("upstreams", "at least one upstream is required")
    for name, upstream in config.upstreams.items():
        _check_upstream(f"upstreams.{name}", upstream, errors)
    _check_settings(
        config.max_body_size, config.max_message_size, config.trusted_proxies, config.status_path, errors
    )
    if config.redis is not None:
        _check_redis(config.redis, errors)
    _check_lifecycle(config.drain_timeout, config.drain_delay, config.admin, errors)
    errors.raise_any()


def _check_url(where: str, url: str, errors: _Errors) -> None:
    problem = _url_problem(url) if isinstance(url, str) else f"{url!r} is not an http(s) URL"
    if problem is not None:
        errors.add(where, problem)


# A config is validated when it is read and again as a `GatewayConfig`, and a reload checks
# the same URLs once more: with a thousand servers, parsing them is most of a reload's time.
@functools.lru_cache(maxsize=8192)
def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return f"{url!r} is not an http(s) URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http(s) URL"
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        return f"{url!r} must be scheme://host[:port] with no path, query or credentials"
    if port == 0:
        return f"{url!r} has port 0"
    return None


def _positive(where: str, value: object, errors: _Errors, *, allow_zero: bool = False) -> None:
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        errors.add(where, f"{value!r} must be {'non-negative' if allow_zero else 'positive'}")


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


def _check_redis(redis: RedisConfig, errors: _Errors) -> None:
    if not isinstance(redis.url, str) or urlsplit(redis.url).scheme not in ("redis", "rediss", "unix"):
        errors.add("redis.url", f"{redis.url!r} is not a redis://, rediss:// or unix:// URL")
    _positive("redis.timeout", redis.timeout, errors)
    if redis.on_error not in ("allow", "deny"):
        errors.add("redis.on_error", f"{redis.on_error!r} is not one of allow, deny")


def _check_lifecycle(drain_timeout: float, drain_delay: float, admin: AdminConfig, errors: _Errors) -> None:
    """Drain and admin: the keys of the gateway's own life rather than of its requests."""
    _positive("drain_timeout", drain_timeout, errors, allow_zero=True)
    _positive("drain_delay", drain_delay, errors, allow_zero=True)
    path = admin.path
    if path is not None:
        if not isinstance(path, str) or not path.startswith("/") or path == "/":
            errors.add("admin.path", f"{path!r} must start with '/' and name a path below the root")
        elif path.endswith("/") or "//" in path or any(part in (".", "..") for part in path.split("/")):
            errors.add("admin.path", f"{path!r} must not end with '/' or hold empty, '.' or '..' segments")
    if admin.token is not None and (not isinstance(admin.token, str) or not admin.token):
        errors.add("admin.token", f"{admin.token!r} must be a non-empty string")
    trace_url = admin.trace_url
    if trace_url is not None and (
        not isinstance(trace_url, str)
        or "{trace_id}" not in trace_url
        or not trace_url.lower().startswith(("http://", "https://"))
    ):
        errors.add("admin.trace_url", f"{trace_url!r} must be an http(s) URL holding {{trace_id}}")
    for i, network in enumerate(admin.allow_ips):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            errors.add(f"admin.allow_ips[{i}]", f"{network!r} is not an IP address or CIDR")


def _check_settings(
    max_body_size: int | None,
    max_message_size: int | None,
    trusted_proxies: Sequence[str],
    status_path: str | None,
    errors: _Errors,
) -> None:
    """The gateway-wide keys."""
    if max_body_size is not None:
        _positive("max_body_size", max_body_size, errors, allow_zero=True)
    if max_message_size is not None:
        _positive("max_message_size", max_message_size, errors, allow_zero=True)
    for i, proxy in enumerate(trusted_proxies):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            errors.add(f"trusted_proxies[{i}]", f"{proxy!r} is not an IP address or CIDR")
    if status_path is not None and not status_path.startswith("/"):
        errors.add("status_path", f"{status_path!r} must start with '/'")


def _check_upstream(where: str, upstream: UpstreamConfig, errors: _Errors) -> None:
    if not upstream.servers:
        errors.add(f"{where}.servers", "at least one server is required")
    for i, server in enumerate(upstream.servers):
        _check_url(f"{where}.servers[{i}].url", server.url, errors)
        if isinstance(server.weight, bool) or not isinstance(server.weight, int) or server.weight < 1:
            errors.add(f"{where}.servers[{i}].weight", f"{server.weight!r} must be a positive integer")
    if upstream.balancer not in BALANCERS:
        errors.add(f"{where}.balancer", f"{upstream.balancer!r} is not one of {', '.join(BALANCERS)}")
    if upstream.hash_on is not None and not _HASH_ON.match(upstream.hash_on):
        errors.add(
            f"{where}.hash_on", f"{upstream.hash_on!r} is not header:NAME, cookie:NAME, client_ip or path"
        )
    if upstream.balancer == "consistent_hash" and upstream.hash_on is None:
        errors.add(f"{where}.hash_on", "is required when balancer is consistent_hash")
    retry = upstream.retry
    for i, condition in enumerate(retry.retry_on):
        if isinstance(condition, bool) or not (
            condition in RETRY_CONDITIONS or (isinstance(condition, int) and 500 <= condition <= 599)
        ):
            errors.add(
                f"{where}.retry.retry_on[{i}]",
                f"{condition!r} is not one of {', '.join(RETRY_CONDITIONS)} or a 5xx status",
            )
    if retry.attempts < 1:
        errors.add(f"{where}.retry.attempts", f"{retry.attempts!r} must be at least 1")
    # A comparison with a value already reported bad would be with the default read instead.
    if retry.backoff_max < retry.backoff_base and not errors.reported(f"{where}.retry.backoff_base"):
        errors.add(f"{where}.retry.backoff_max", f"{retry.backoff_max!r} is below backoff_base")
    for name in ("connect", "read", "total"):
        _positive(f"{where}.timeouts.{name}", getattr(upstream.timeouts, name), errors)
    if upstream.hedge is not None:
        hedge = upstream.hedge
        _positive(f"{where}.hedge.delay", hedge.delay, errors)
        if (
            isinstance(hedge.max_extra, bool)
            or not isinstance(hedge.max_extra, int)
            or not 1 <= hedge.max_extra <= _MAX_EXTRA_HEDGES
        ):
            errors.add(f"{where}.hedge.max_extra", f"{hedge.max_extra!r} is not 1 to {_MAX_EXTRA_HEDGES}")
    if upstream.health_check is not None:
        hc = upstream.health_check
        if not hc.path.startswith("/"):
            errors.add(f"{where}.health_check.path", f"{hc.path!r} must start with '/'")
        for f in fields(hc):
            if f.name != "path":
                _positive(f"{where}.health_check.{f.name}", getattr(hc, f.name), errors)
    if upstream.outlier_detection is not None:
        od = upstream.outlier_detection
        if not 0 <= od.max_ejection_percent <= 100:
            errors.add(
                f"{where}.outlier_detection.max_ejection_percent",
                f"{od.max_ejection_percent!r} is not 0 to 100",
            )
        if od.max_ejection_time < od.base_ejection_time and not errors.reported(
            f"{where}.outlier_detection.base_ejection_time"
        ):
            errors.add(
                f"{where}.outlier_detection.max_ejection_time",
                f"{od.max_ejection_time!r} is below base_ejection_time",
            )
    if upstream.adaptive_concurrency is not None:
        _check_adaptive_concurrency(f"{where}.adaptive_concurrency", upstream.adaptive_concurrency, errors)
    if upstream.discovery is not None:
        _check_discovery(f"{where}.discovery", upstream.discovery, errors)
    if upstream.max_concurrent_requests < 1:
        errors.add(
            f"{where}.max_concurrent_requests", f"{upstream.max_concurrent_requests!r} must be at least 1"
        )


def _check_discovery(where: str, config: DiscoveryConfig, errors: _Errors) -> None:
    if config.type != "dns":
        errors.add(f"{where}.type", f"{config.type!r} is not dns (the only type so far)")
    _positive(f"{where}.interval", config.interval, errors)
    if not isinstance(config.respect_ttl, bool):
        errors.add(f"{where}.respect_ttl", f"{config.respect_ttl!r} is not true or false")
    for i, spec in enumerate(config.nameservers or ()):
        if nameserver_address(spec) is None:
            errors.add(
                f"{where}.nameservers[{i}]", f"{spec!r} is not an ip[:port] (e.g. 10.0.0.10, [fd00::a]:53)"
            )


def nameserver_address(spec: object) -> tuple[str, int] | None:
    """`(ip, port)` of a nameserver written `ip`, `ip:port`, `ipv6` or `[ipv6]:port`; None if invalid."""
    if not isinstance(spec, str):
        return None
    host, port = spec, "53"
    if spec.startswith("["):
        host, bracket, rest = spec[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else port
    elif spec.count(":") == 1:
        host, port = spec.split(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return str(ip), int(port)


def _check_adaptive_concurrency(where: str, config: AdaptiveConcurrencyConfig, errors: _Errors) -> None:
    for name in ("min_limit", "initial_limit", "max_limit", "min_rtt_samples"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            errors.add(f"{where}.{name}", f"{value!r} must be an integer of at least 1")
    for name in ("interval", "min_rtt_interval"):
        _positive(f"{where}.{name}", getattr(config, name), errors)
    for name, top in (("sample_percentile", 100.0), ("buffer", math.inf), ("jitter", 1.0)):
        value = getattr(config, name)
        _positive(f"{where}.{name}", value, errors, allow_zero=name != "sample_percentile")
        if isinstance(value, int | float) and value > top:
            errors.add(f"{where}.{name}", f"{value!r} must be at most {top:g}")
    if errors.reported(where):
        return
    # The initial limit is one the controller may hold: min_limit <= initial_limit <= max_limit.
    if config.min_limit > config.initial_limit:
        errors.add(
            f"{where}.min_limit", f"{config.min_limit!r} is above initial_limit ({config.initial_limit})"
        )
    if config.max_limit < config.initial_limit:
        errors.add(
            f"{where}.max_limit", f"{config.max_limit!r} is below initial_limit ({config.initial_limit})"
        )
