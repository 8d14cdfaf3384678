"""Configuration: typed, frozen models, loading from files or mappings, validation."""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Final, Literal
from urllib.parse import unquote_to_bytes, urlsplit

from ._exceptions import ConfigError

__all__ = [
    "BALANCERS",
    "JWT_ALGORITHMS",
    "RETRY_CONDITIONS",
    "AuthConfig",
    "GatewayConfig",
    "HeaderRulesConfig",
    "HealthCheckConfig",
    "JwtConfig",
    "OutlierDetectionConfig",
    "RateLimitConfig",
    "RedisConfig",
    "RetryConfig",
    "RewriteConfig",
    "RouteConfig",
    "ServerConfig",
    "TimeoutsConfig",
    "UpstreamConfig",
    "load_config",
]

BALANCERS: Final = (
    "round_robin",
    "random",
    "weighted_random",
    "least_connections",
    "peak_ewma",
    "consistent_hash",
)
RETRY_CONDITIONS: Final = ("connect-failure", "reset", "timeout")
HTTP_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)
#: The JWT algorithms a route may allow; `none` is never one of them.
JWT_ALGORITHMS: Final = (
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
_HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})


class _Inherit:
    """Marks a per-route setting that takes the gateway-wide value."""

    _instance: _Inherit | None = None

    def __new__(cls) -> _Inherit:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "INHERIT"

    def __reduce__(self) -> str:
        return "INHERIT"


INHERIT: Final = _Inherit()


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """One server of an upstream: an entry of `upstreams.<name>.servers`.

    Attributes:
        url: `http://host[:port]` or `https://host[:port]`, with no path.
        weight: Its share of traffic relative to the upstream's other servers (at least 1).
        backup: A backup serves only while no primary is available.
    """

    url: str
    weight: int = 1
    backup: bool = False


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active health checks of an upstream: `upstreams.<name>.health_check`.

    Every `interval` seconds each server gets `GET path`, bounded by `timeout`; a 2xx or
    3xx answer passes. `unhealthy_threshold` failures in a row take a server down,
    `healthy_threshold` passes in a row bring it back.
    """

    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2


@dataclass(frozen=True, slots=True)
class OutlierDetectionConfig:
    """Passive outlier detection of an upstream: `upstreams.<name>.outlier_detection`.

    `consecutive_failures` gateway failures in a row eject a server for
    `base_ejection_time` seconds, doubled on each repeated ejection up to
    `max_ejection_time`; at most `max_ejection_percent` of the servers are ejected at once.
    """

    consecutive_failures: int = 5
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 50


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """The retry policy of an upstream: `upstreams.<name>.retry`.

    `attempts` counts every try, the first included. `retry_on` holds the condition names
    `"connect-failure"`, `"reset"`, `"timeout"` and 5xx statuses as integers.
    """

    attempts: int = 3
    retry_on: tuple[str | int, ...] = ("connect-failure", "reset", "timeout", 502, 503, 504)
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    budget_ratio: float = 0.2
    budget_min_per_second: float = 10
    buffer_limit: int = 65536


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """The timeouts of an upstream, in seconds: `upstreams.<name>.timeouts`.

    `connect` and `read` apply to each try; `total` bounds all tries and backoff until the
    response head.
    """

    connect: float = 2.0
    read: float = 30.0
    total: float = 60.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One upstream: the mapping under `upstreams.<name>`, whose key is `name`.

    `health_check` is None when active checks are off; `outlier_detection` is None when
    passive detection is turned off (it is on by default).
    """

    name: str
    servers: tuple[ServerConfig, ...]
    balancer: Literal[
        "round_robin", "random", "weighted_random", "least_connections", "peak_ewma", "consistent_hash"
    ] = "round_robin"
    hash_on: str | None = None
    health_check: HealthCheckConfig | None = None
    outlier_detection: OutlierDetectionConfig | None = field(default_factory=OutlierDetectionConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    max_concurrent_requests: int = 1000
    panic: bool = False


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """A route's rate limit: `routes[].rate_limit`, a GCRA limit per key.

    On average one request every `per / rate` seconds is allowed per key, and an idle key
    may send `burst` at once (None: `rate`, rounded up). `key` is `client_ip`,
    `header:NAME`, `claim:NAME` (a claim of the verified JWT) or `route` (one bucket for
    the whole route). `backend` is `memory` (this process) or `redis` (every gateway
    process sharing the top-level `redis`); `shadow` counts and logs but never refuses.
    """

    rate: float
    per: float = 1.0
    burst: int | None = None
    key: str = "client_ip"
    backend: Literal["memory", "redis"] = "memory"
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """A route's JWT authentication: `routes[].auth.jwt`.

    The keys come from exactly one of `jwks_url`, `public_key` (PEM) or `secret` (HS*).
    `issuer` and `audience` are checked when set; `algorithms` is the allow-list, `leeway`
    the clock skew accepted (seconds). `claims_to_headers` maps claim names to the request
    headers they are sent upstream in (a client's own copies are removed).
    `forward_authorization` false removes the `Authorization` header before the request
    goes upstream.
    """

    jwks_url: str | None = None
    public_key: str | None = None
    secret: str | None = None
    issuer: str | None = None
    audience: tuple[str, ...] | None = None
    algorithms: tuple[str, ...] = ("RS256",)
    leeway: float = 30.0
    claims_to_headers: Mapping[str, str] = field(default_factory=dict)
    forward_authorization: bool = True


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """A route's authentication: `routes[].auth`."""

    jwt: JwtConfig | None = None


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """The Redis that `backend: redis` rate limits share: the top-level `redis`.

    A call slower than `timeout` seconds counts as failed; `on_error` is `allow` (fail
    open, counted and logged) or `deny` (503).
    """

    url: str = "redis://127.0.0.1:6379/0"
    timeout: float = 0.05
    on_error: Literal["allow", "deny"] = "allow"


@dataclass(frozen=True, slots=True)
class HeaderRulesConfig:
    """A route's header rules, one way: `routes[].request_headers` or `routes[].response_headers`.

    Applied in this order: every header named in `remove` goes, then each `set` name
    replaces whatever headers of that name there were with one, then each `add` header is
    added beside any already there. Names are header names (any case); values may hold
    variables such as `{client_ip}` or `{claim:sub}`, and `{{`/`}}` for literal braces.
    """

    set: Mapping[str, str] = field(default_factory=dict)
    add: Mapping[str, str] = field(default_factory=dict)
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RewriteConfig:
    """A route's path rewrite: `routes[].rewrite`.

    The first match of `pattern` (a regular expression, searched in the raw path as it goes
    upstream, after `strip_prefix`) is replaced by `replacement`, where `$1`, `${1}` and
    `${name}` are the pattern's groups and `$$` is a `$`. A path the pattern does not match
    goes upstream unchanged.
    """

    pattern: str
    replacement: str


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One route: an entry of `routes`.

    `methods` is None for any method and `host` None for any host. `max_body_size` and
    `preserve_host` take the gateway-wide values unless set (None for `max_body_size`
    means no limit).
    """

    path: str
    upstream: str
    strip_prefix: bool = False
    methods: tuple[str, ...] | None = None
    host: str | None = None
    max_body_size: int | _Inherit | None = INHERIT
    preserve_host: bool | _Inherit = INHERIT
    max_message_size: int | _Inherit | None = INHERIT
    rate_limit: RateLimitConfig | None = None
    auth: AuthConfig | None = None
    #: Client addresses or networks allowed (after `trusted_proxies`); None allows everyone.
    allow_ips: tuple[str, ...] | None = None
    deny_ips: tuple[str, ...] = ()
    request_headers: HeaderRulesConfig | None = None
    response_headers: HeaderRulesConfig | None = None
    rewrite: RewriteConfig | None = None
    #: `rewrite`: a `Location`/`Content-Location` at an upstream server (or, with `strip_prefix`,
    #: an absolute path) is made the client-facing URL; `keep` passes them as they are.
    redirects: Literal["keep", "rewrite"] = "keep"
    #: `rewrite`: `Set-Cookie` `Path` gets the stripped prefix back and a `Domain` naming an
    #: upstream server becomes the client-facing host; `keep` passes them as they are.
    cookies: Literal["keep", "rewrite"] = "keep"
    #: Send an RFC 7239 `Forwarded` header upstream (default: the top-level `forwarded`).
    forwarded: bool | _Inherit = INHERIT


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

    def __post_init__(self) -> None:
        validate(self)


# -- loading -----------------------------------------------------------------------


def load_config(source: GatewayConfig | Mapping[str, Any] | str | os.PathLike[str]) -> GatewayConfig:
    """Build a validated `GatewayConfig` from a mapping, a file path or a config object.

    Args:
        source: A mapping of the configuration schema, a path to a `.toml`, `.yaml`/`.yml`
            (needs the `yaml` extra) or `.json` file, or a `GatewayConfig` (returned as it is).

    Returns:
        The validated, frozen configuration.

    Raises:
        ConfigError: The config is invalid or the file cannot be read or parsed. It names
            every bad key path and value found, one line each, e.g.
            `upstreams.users.servers[1].url: 'htp://x' is not an http(s) URL`; a file
            that cannot be read or parsed is a single error.
    """
    if isinstance(source, GatewayConfig):
        return source
    if isinstance(source, str | os.PathLike):
        return from_mapping(_read_file(os.fspath(source)))
    if isinstance(source, Mapping):
        return from_mapping(source)
    raise ConfigError(
        "", f"config must be a mapping, a file path or a GatewayConfig, not {type(source).__name__}"
    )


def _read_file(path: str) -> Any:
    suffix = os.path.splitext(path)[1].lower()
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path!r}: {exc.strerror or exc}") from None
    try:
        if suffix == ".toml":
            import tomllib

            return tomllib.loads(raw.decode("utf-8"))
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:  # pragma: no cover - depends on the environment
                raise ConfigError(
                    "", f"{path!r} is YAML; install the 'yaml' extra: pip install 'asgi-gateway[yaml]'"
                ) from None
            return yaml.safe_load(raw)
        if suffix == ".json":
            return json.loads(raw)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError("", f"cannot parse config file {path!r}: {exc}") from None
    raise ConfigError("", f"config file {path!r} must end in .toml, .yaml, .yml or .json")


class _Errors:
    """Collects every error of one config, so that a single `ConfigError` names them all.

    An error at a key path inside or around one already reported is dropped: it follows from
    the first (a server list that is not a list has no servers; an upstream that is not a
    mapping has no `servers` key), and a user fixing the first would never see it.
    """

    __slots__ = ("found",)

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        if not self.reported(path):
            self.found.append((path, message))

    def reported(self, path: str) -> bool:
        """True if an error was reported at `path`, at a key around it or at one inside it."""
        return any(_nested(seen, path) or _nested(path, seen) for seen, _ in self.found)

    def raise_any(self) -> None:
        if self.found:
            first, *more = self.found
            raise ConfigError(*first, *more)


def _nested(outer: str, inner: str) -> bool:
    """True if key path `inner` is `outer` or lies inside it (`a.b` in `a`, `a[0]` in `a`)."""
    return inner.startswith(outer) and (len(inner) == len(outer) or inner[len(outer)] in ".[")


class _Reader:
    """Reads one mapping, checking types and refusing unknown keys.

    A bad value is reported to `errors` and read as the default, so that the rest of the
    config is still checked; what was read is thrown away if any error was reported.
    """

    def __init__(
        self, data: Any, path: str, allowed: Sequence[str], errors: _Errors, model: type | None = None
    ) -> None:
        self.errors = errors
        self.path = path
        #: The defaults of the keys, from the fields of the model they are read into: written
        #: once, there.
        self.defaults = _defaults(model) if model is not None else {}
        if not isinstance(data, Mapping):
            errors.add(path or "config", f"{data!r} is not a mapping")
            data = {}
        for key in data:
            if key not in allowed:
                errors.add(self.where(str(key)), f"unknown key (allowed: {', '.join(allowed)})")
        self.data: Mapping[Any, Any] = data

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def default(self, key: str) -> Any:
        return self.defaults[key]

    def boolean(self, key: str) -> Any:
        if key not in self.data:
            return self.defaults[key]
        value = self.data[key]
        if not isinstance(value, bool):
            self.errors.add(self.where(key), f"{value!r} is not true or false")
            return self.defaults[key]
        return value

    def string(self, key: str, *, required: bool = False) -> str | None:
        default = None if required else self.defaults[key]
        if key not in self.data:
            if required:
                self.errors.add(self.where(key), "is required")
            return default
        value = self.data[key]
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            self.errors.add(self.where(key), f"{value!r} is not a non-empty string")
            return default
        return value

    def number(self, key: str, *, minimum: float = 0.0, strict: bool = True, required: bool = False) -> float:
        # A required key has no default; only ever returned for an error, which throws the
        # whole config away.
        default = 1.0 if required else self.defaults[key]
        if required and key not in self.data:
            self.errors.add(self.where(key), "is required")
            return default
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.errors.add(self.where(key), f"{value!r} is not a number")
            return float(default)
        if value < minimum or (strict and value == minimum):
            bound = "greater than" if strict else "at least"
            self.errors.add(self.where(key), f"{value!r} must be {bound} {minimum:g}")
            return float(default)
        return float(value)

    def integer(self, key: str, *, minimum: int = 1) -> int:
        # A size limit's default may be INHERIT; only ever returned for a bad value, which
        # throws the whole config away.
        default: int = self.defaults[key] if isinstance(self.defaults[key], int) else minimum
        value = self.data.get(key, self.defaults[key])
        if isinstance(value, bool) or not isinstance(value, int):
            self.errors.add(self.where(key), f"{value!r} is not an integer")
            return default
        if value < minimum:
            self.errors.add(self.where(key), f"{value!r} must be at least {minimum}")
            return default
        return value


@functools.cache
def _defaults(model: type) -> dict[str, Any]:
    """The default of every field of a config dataclass that has one."""
    defaults: dict[str, Any] = {}
    for spec in fields(model):
        if spec.default is not MISSING:
            defaults[spec.name] = spec.default
        elif spec.default_factory is not MISSING:
            defaults[spec.name] = spec.default_factory()
    return defaults


def _optional_section(reader: _Reader, key: str, on_by_default: bool) -> tuple[bool, Any]:
    """(enabled, mapping) for a section that may be omitted, null/false (off) or a mapping."""
    if not reader.has(key):
        return on_by_default, {}
    value = reader.raw(key)
    if value is None or value is False:
        return False, {}
    if value is True:
        return True, {}
    return True, value


def from_mapping(data: Any) -> GatewayConfig:
    """Build a `GatewayConfig` from plain data (the schema of DESIGN.md).

    Every section is read and checked even after an error, and one `ConfigError` names them all.
    """
    if not isinstance(data, Mapping):
        raise ConfigError("config", f"{data!r} is not a mapping")
    errors = _Errors()
    top = _Reader(
        data,
        "",
        (
            "routes",
            "upstreams",
            "max_body_size",
            "preserve_host",
            "trusted_proxies",
            "status_path",
            "max_message_size",
            "redis",
            "forwarded",
        ),
        errors,
        GatewayConfig,
    )
    redis = _redis(top, errors)
    raw_upstreams = top.raw("upstreams")
    # Routes are checked against the upstream names even when an upstream's own spec is bad;
    # with no usable `upstreams` at all, "not a configured upstream" would only repeat that.
    valid_upstreams = isinstance(raw_upstreams, Mapping) and bool(raw_upstreams)
    names = [str(name) for name in raw_upstreams] if valid_upstreams else None

    routes: list[RouteConfig] = []
    raw_routes = top.raw("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        errors.add("routes", f"{raw_routes!r} must be a non-empty list")
    else:
        for i, spec in enumerate(raw_routes):
            route = _route(f"routes[{i}]", spec, errors)
            _check_route(f"routes[{i}]", route, names, errors, redis=redis is not None)
            routes.append(route)

    upstreams: dict[str, UpstreamConfig] = {}
    if not valid_upstreams:
        errors.add("upstreams", f"{raw_upstreams!r} must be a non-empty mapping of upstream names")
    else:
        for name, spec in raw_upstreams.items():
            upstream = _upstream(str(name), spec, errors)
            _check_upstream(f"upstreams.{name}", upstream, errors)
            upstreams[str(name)] = upstream

    max_body_size = _size_limit(top, "max_body_size")
    max_message_size = _size_limit(top, "max_message_size")
    trusted = top.raw("trusted_proxies", [])
    if not isinstance(trusted, list) or not all(isinstance(item, str) for item in trusted):
        errors.add("trusted_proxies", f"{trusted!r} is not a list of addresses or CIDRs")
        trusted = []
    preserve_host = top.boolean("preserve_host")
    forwarded = top.boolean("forwarded")
    status_path = top.string("status_path")
    if redis is not None:
        _check_redis(redis, errors)
    _check_settings(
        max_body_size if isinstance(max_body_size, int) else None,
        max_message_size if isinstance(max_message_size, int) else None,
        trusted,
        status_path,
        errors,
    )
    errors.raise_any()
    return GatewayConfig(
        routes=tuple(routes),
        upstreams=upstreams,
        max_body_size=max_body_size if isinstance(max_body_size, int) else None,
        preserve_host=preserve_host,
        trusted_proxies=tuple(trusted),
        status_path=status_path,
        max_message_size=max_message_size if isinstance(max_message_size, int) else None,
        redis=redis,
        forwarded=forwarded,
    )


def _redis(top: _Reader, errors: _Errors) -> RedisConfig | None:
    enabled, data = _optional_section(top, "redis", False)
    if not enabled:
        return None
    reader = _Reader(data, "redis", ("url", "timeout", "on_error"), errors, RedisConfig)
    return RedisConfig(
        url=reader.string("url") or "",
        timeout=reader.number("timeout"),
        on_error=reader.string("on_error"),  # type: ignore[arg-type]  # checked in _check_redis()
    )


def _addresses(reader: _Reader, key: str) -> tuple[str, ...] | None:
    value = reader.raw(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        reader.errors.add(reader.where(key), f"{value!r} is not a list of addresses or CIDRs")
        return None
    return tuple(value)


def _rate_limit(route: _Reader) -> RateLimitConfig | None:
    enabled, data = _optional_section(route, "rate_limit", False)
    if not enabled:
        return None
    reader = _Reader(
        data,
        route.where("rate_limit"),
        ("rate", "per", "burst", "key", "backend", "shadow"),
        route.errors,
        RateLimitConfig,
    )
    burst = None if reader.raw("burst") is None else reader.integer("burst", minimum=1)
    return RateLimitConfig(
        rate=reader.number("rate", required=True),
        per=reader.number("per"),
        burst=burst,
        key=reader.string("key") or "",
        backend=reader.string("backend"),  # type: ignore[arg-type]  # checked in _check_route()
        shadow=reader.boolean("shadow"),
    )


def _auth(route: _Reader) -> AuthConfig | None:
    enabled, data = _optional_section(route, "auth", False)
    if not enabled:
        return None
    reader = _Reader(data, route.where("auth"), ("jwt",), route.errors, AuthConfig)
    jwt_on, jwt_data = _optional_section(reader, "jwt", False)
    if not jwt_on:
        # An `auth` that checks nothing would let every request through unnoticed.
        route.errors.add(reader.where("jwt"), "is required in auth (the only method so far)")
        return AuthConfig()
    jwt = _Reader(
        jwt_data,
        reader.where("jwt"),
        (
            "jwks_url",
            "public_key",
            "secret",
            "issuer",
            "audience",
            "algorithms",
            "leeway",
            "claims_to_headers",
            "forward_authorization",
        ),
        route.errors,
        JwtConfig,
    )
    audience = jwt.raw("audience")
    if isinstance(audience, str) and audience:
        audience = (audience,)
    elif isinstance(audience, list) and audience and all(isinstance(a, str) and a for a in audience):
        audience = tuple(audience)
    elif audience is not None:
        route.errors.add(jwt.where("audience"), f"{audience!r} is not a string or a list of strings")
        audience = None
    algorithms = jwt.raw("algorithms", list(jwt.default("algorithms")))
    if not isinstance(algorithms, list) or not all(isinstance(a, str) for a in algorithms):
        route.errors.add(jwt.where("algorithms"), f"{algorithms!r} is not a list of algorithm names")
        algorithms = list(jwt.default("algorithms"))
    claims = jwt.raw("claims_to_headers", {})
    if not isinstance(claims, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in claims.items()
    ):
        route.errors.add(
            jwt.where("claims_to_headers"), f"{claims!r} is not a mapping of claim names to headers"
        )
        claims = {}
    return AuthConfig(
        jwt=JwtConfig(
            jwks_url=jwt.string("jwks_url"),
            public_key=jwt.string("public_key"),
            secret=jwt.string("secret"),
            issuer=jwt.string("issuer"),
            audience=audience,
            algorithms=tuple(algorithms),
            leeway=jwt.number("leeway", strict=False),
            claims_to_headers={name: header.lower() for name, header in claims.items()},
            forward_authorization=jwt.boolean("forward_authorization"),
        )
    )


def _size_limit(reader: _Reader, key: str) -> int | _Inherit | None:
    if not reader.has(key):
        result: int | _Inherit | None = reader.default(key)
        return result
    value = reader.raw(key)
    if value is None:
        return None
    return reader.integer(key, minimum=0)


def _route(path: str, data: Any, errors: _Errors) -> RouteConfig:
    reader = _Reader(
        data,
        path,
        (
            "path",
            "upstream",
            "strip_prefix",
            "methods",
            "host",
            "max_body_size",
            "preserve_host",
            "max_message_size",
            "rate_limit",
            "auth",
            "allow_ips",
            "deny_ips",
            "request_headers",
            "response_headers",
            "rewrite",
            "redirects",
            "cookies",
            "forwarded",
        ),
        errors,
        RouteConfig,
    )
    methods = reader.raw("methods")
    if methods is not None:
        if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
            errors.add(reader.where("methods"), f"{methods!r} is not a non-empty list of method names")
            methods = None
        else:
            methods = tuple(m.upper() for m in methods)
    return RouteConfig(
        path=reader.string("path", required=True) or "/",
        upstream=reader.string("upstream", required=True) or "",
        strip_prefix=reader.boolean("strip_prefix"),
        methods=methods,
        host=reader.string("host"),
        max_body_size=_size_limit(reader, "max_body_size"),
        preserve_host=reader.boolean("preserve_host"),
        max_message_size=_size_limit(reader, "max_message_size"),
        rate_limit=_rate_limit(reader),
        auth=_auth(reader),
        allow_ips=_addresses(reader, "allow_ips"),
        deny_ips=_addresses(reader, "deny_ips") or (),
        request_headers=_header_rules(reader, "request_headers"),
        response_headers=_header_rules(reader, "response_headers"),
        rewrite=_rewrite(reader),
        redirects=reader.string("redirects"),  # type: ignore[arg-type]  # checked in _check_route()
        cookies=reader.string("cookies"),  # type: ignore[arg-type]  # checked in _check_route()
        forwarded=reader.boolean("forwarded") if reader.has("forwarded") else INHERIT,
    )


def _header_rules(route: _Reader, key: str) -> HeaderRulesConfig | None:
    enabled, data = _optional_section(route, key, False)
    if not enabled:
        return None
    reader = _Reader(data, route.where(key), ("set", "add", "remove"), route.errors, HeaderRulesConfig)
    values: dict[str, dict[str, str]] = {}
    for kind in ("set", "add"):
        raw = reader.raw(kind, {})
        if not isinstance(raw, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
        ):
            route.errors.add(reader.where(kind), f"{raw!r} is not a mapping of header names to strings")
            raw = {}
        values[kind] = {name.lower(): value for name, value in raw.items()}
    remove = reader.raw("remove", [])
    if not isinstance(remove, list) or not all(isinstance(name, str) for name in remove):
        route.errors.add(reader.where("remove"), f"{remove!r} is not a list of header names")
        remove = []
    return HeaderRulesConfig(
        set=values["set"], add=values["add"], remove=tuple(name.lower() for name in remove)
    )


def _rewrite(route: _Reader) -> RewriteConfig | None:
    enabled, data = _optional_section(route, "rewrite", False)
    if not enabled:
        return None
    reader = _Reader(data, route.where("rewrite"), ("pattern", "replacement"), route.errors, RewriteConfig)
    pattern = reader.raw("pattern")
    if not isinstance(pattern, str) or not pattern:
        route.errors.add(
            reader.where("pattern"),
            "is required" if pattern is None else f"{pattern!r} is not a non-empty string",
        )
        pattern = ""
    replacement = reader.raw("replacement")
    if not isinstance(replacement, str):
        route.errors.add(
            reader.where("replacement"),
            "is required" if replacement is None else f"{replacement!r} is not a string",
        )
        replacement = ""
    return RewriteConfig(pattern=pattern, replacement=replacement)


def _upstream(name: str, data: Any, errors: _Errors) -> UpstreamConfig:
    path = f"upstreams.{name}"
    reader = _Reader(
        data,
        path,
        (
            "servers",
            "balancer",
            "hash_on",
            "health_check",
            "outlier_detection",
            "retry",
            "timeouts",
            "max_concurrent_requests",
            "panic",
        ),
        errors,
        UpstreamConfig,
    )
    raw_servers = reader.raw("servers")
    servers = []
    if not isinstance(raw_servers, list) or not raw_servers:
        errors.add(reader.where("servers"), f"{raw_servers!r} must be a non-empty list")
        raw_servers = []
    for i, spec in enumerate(raw_servers):
        if isinstance(spec, str):
            spec = {"url": spec}
        server = _Reader(spec, f"{path}.servers[{i}]", ("url", "weight", "backup"), errors, ServerConfig)
        servers.append(
            ServerConfig(
                url=server.string("url", required=True) or "",
                weight=server.integer("weight", minimum=1),
                backup=server.boolean("backup"),
            )
        )

    check_on, check_data = _optional_section(reader, "health_check", False)
    health_check = None
    if check_on:
        check = _Reader(
            check_data,
            reader.where("health_check"),
            ("path", "interval", "timeout", "healthy_threshold", "unhealthy_threshold"),
            errors,
            HealthCheckConfig,
        )
        health_check = HealthCheckConfig(
            path=check.string("path") or "",
            interval=check.number("interval"),
            timeout=check.number("timeout"),
            healthy_threshold=check.integer("healthy_threshold"),
            unhealthy_threshold=check.integer("unhealthy_threshold"),
        )

    outlier_on, outlier_data = _optional_section(reader, "outlier_detection", True)
    outlier = None
    if outlier_on:
        od = _Reader(
            outlier_data,
            reader.where("outlier_detection"),
            ("consecutive_failures", "base_ejection_time", "max_ejection_time", "max_ejection_percent"),
            errors,
            OutlierDetectionConfig,
        )
        outlier = OutlierDetectionConfig(
            consecutive_failures=od.integer("consecutive_failures"),
            base_ejection_time=od.number("base_ejection_time"),
            max_ejection_time=od.number("max_ejection_time"),
            max_ejection_percent=od.number("max_ejection_percent", strict=False),
        )

    retry_reader = _Reader(
        reader.raw("retry", {}),
        reader.where("retry"),
        (
            "attempts",
            "retry_on",
            "backoff_base",
            "backoff_max",
            "budget_ratio",
            "budget_min_per_second",
            "buffer_limit",
        ),
        errors,
        RetryConfig,
    )
    retry_on = retry_reader.raw("retry_on", list(retry_reader.default("retry_on")))
    if not isinstance(retry_on, list):
        errors.add(retry_reader.where("retry_on"), f"{retry_on!r} is not a list")
        retry_on = list(retry_reader.default("retry_on"))
    retry = RetryConfig(
        attempts=retry_reader.integer("attempts"),
        retry_on=tuple(retry_on),
        backoff_base=retry_reader.number("backoff_base", strict=False),
        backoff_max=retry_reader.number("backoff_max", strict=False),
        budget_ratio=retry_reader.number("budget_ratio", strict=False),
        budget_min_per_second=retry_reader.number("budget_min_per_second", strict=False),
        buffer_limit=retry_reader.integer("buffer_limit", minimum=0),
    )

    timeouts_reader = _Reader(
        reader.raw("timeouts", {}),
        reader.where("timeouts"),
        ("connect", "read", "total"),
        errors,
        TimeoutsConfig,
    )
    timeouts = TimeoutsConfig(
        connect=timeouts_reader.number("connect"),
        read=timeouts_reader.number("read"),
        total=timeouts_reader.number("total"),
    )
    return UpstreamConfig(
        name=name,
        servers=tuple(servers),
        balancer=reader.string("balancer"),  # type: ignore[arg-type]  # checked in _check_upstream()
        hash_on=reader.string("hash_on"),
        health_check=health_check,
        outlier_detection=outlier,
        retry=retry,
        timeouts=timeouts,
        max_concurrent_requests=reader.integer("max_concurrent_requests"),
        panic=reader.boolean("panic"),
    )


# -- validation of the typed objects (whatever built them) --------------------------------

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
    errors.raise_any()


def _check_url(where: str, url: str, errors: _Errors) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        errors.add(where, f"{url!r} is not an http(s) URL")
        return
    if parts.scheme not in ("http", "https") or not parts.hostname:
        errors.add(where, f"{url!r} is not an http(s) URL")
    elif parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        errors.add(where, f"{url!r} must be scheme://host[:port] with no path, query or credentials")
    elif port == 0:
        errors.add(where, f"{url!r} has port 0")


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

#: Variables a header rule's value may hold; `server` only on the way back (it is chosen
#: after the request's headers are final, once per try).
HEADER_VARIABLES: Final = ("client_ip", "request_id", "route", "upstream", "server")
# Headers the gateway itself frames or sets on the way up (the transport sends Host; the
# telemetry layer sends traceparent); a rule on them would be overridden or contradict them.
_RULE_RESERVED_UP: Final = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "x-request-id",
        "traceparent",
        "tracestate",
    }
)
# ... and on the way back, where the server in front frames the body and adds Date.
_RULE_RESERVED_DOWN: Final = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "x-request-id",
        "date",
    }
)
_TEMPLATE_PART = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e]*$")
_CLAIM_NAME = re.compile(r"^[^\s{}]+$")


def header_template(value: str) -> tuple[str | tuple[str, str], ...]:
    """A header rule's value as its parts: literal text, or `(kind, name)` for a variable.

    `kind` is `var` (`{client_ip}`, ...) or `claim` (`{claim:NAME}`). Raises ValueError
    naming what is wrong.
    """
    parts: list[str | tuple[str, str]] = []
    literal: list[str] = []
    pos = 0
    for match in _TEMPLATE_PART.finditer(value):
        literal.append(value[pos : match.start()])
        pos = match.end()
        text = match.group(0)
        if text in ("{{", "}}"):
            literal.append(text[0])
            continue
        name = match.group(1)
        if name is None:
            raise ValueError(f"{text!r} without its pair (write {text * 2!r} for a literal {text!r})")
        if name.startswith("claim:") and _CLAIM_NAME.match(name[6:]):
            variable = ("claim", name[6:])
        elif name in HEADER_VARIABLES:
            variable = ("var", name)
        else:
            raise ValueError(
                f"{{{name}}} is not a variable ({', '.join('{' + v + '}' for v in HEADER_VARIABLES)},"
                " {claim:NAME})"
            )
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(variable)
    literal.append(value[pos:])
    if "".join(literal):
        parts.append("".join(literal))
    return tuple(parts)


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
            elif name.lower() in reserved:
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


_GROUP_REFERENCE = re.compile(r"\$(?:(\$)|(\d+)|\{(\w+)\}|)")


def rewrite_template(replacement: str, pattern: re.Pattern[bytes]) -> tuple[bytes | int | str, ...]:
    """A rewrite's replacement as its parts: literal bytes, or a group's number or name.

    Raises ValueError naming a reference the pattern has no group for.
    """
    parts: list[bytes | int | str] = []
    literal = bytearray()
    pos = 0
    for match in _GROUP_REFERENCE.finditer(replacement):
        literal += replacement[pos : match.start()].encode("ascii")
        pos = match.end()
        dollar, number, name = match.groups()
        if dollar:
            literal += b"$"
            continue
        if number is None and name is None:
            raise ValueError("'$' that names no group (write '$$' for a literal '$')")
        group: int | str
        if name is not None and not name.isdigit():
            if name not in pattern.groupindex:
                raise ValueError(f"${{{name}}}: the pattern has no group of that name")
            group = name
        else:
            group = int(number or name)
            if group > pattern.groups:
                raise ValueError(f"${group}: the pattern has {pattern.groups} group(s)")
        if literal:
            parts.append(bytes(literal))
            literal = bytearray()
        parts.append(group)
    literal += replacement[pos:].encode("ascii")
    if literal:
        parts.append(bytes(literal))
    return tuple(parts)


def compile_rewrite(rewrite: RewriteConfig) -> tuple[re.Pattern[bytes], tuple[bytes | int | str, ...]]:
    """The rewrite's compiled pattern and replacement; ValueError (with `.key`) when invalid."""
    if not isinstance(rewrite.pattern, str) or not rewrite.pattern.isascii():
        raise _KeyedError("pattern", "must be ASCII (write other characters percent-encoded)")
    try:
        pattern = re.compile(rewrite.pattern.encode("ascii"))
    except re.error as exc:
        raise _KeyedError(
            "pattern", f"{rewrite.pattern!r} is not a valid regular expression: {exc}"
        ) from None
    if not isinstance(rewrite.replacement, str) or not rewrite.replacement.isascii():
        raise _KeyedError("replacement", "must be ASCII (write other characters percent-encoded)")
    try:
        return pattern, rewrite_template(rewrite.replacement, pattern)
    except ValueError as exc:
        raise _KeyedError("replacement", f"{rewrite.replacement!r}: {exc}") from None


class _KeyedError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


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
_RESERVED_HEADERS: Final = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "x-request-id",
        "authorization",
        "traceparent",
        "tracestate",
    }
)
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
    if upstream.max_concurrent_requests < 1:
        errors.add(
            f"{where}.max_concurrent_requests", f"{upstream.max_concurrent_requests!r} must be at least 1"
        )
