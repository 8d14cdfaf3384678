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
from urllib.parse import urlsplit

from ._exceptions import ConfigError

__all__ = [
    "BALANCERS",
    "RETRY_CONDITIONS",
    "GatewayConfig",
    "HealthCheckConfig",
    "OutlierDetectionConfig",
    "RetryConfig",
    "RouteConfig",
    "ServerConfig",
    "TimeoutsConfig",
    "UpstreamConfig",
    "load_config",
]

BALANCERS: Final = ("round_robin", "random", "weighted_random", "least_connections", "consistent_hash")
RETRY_CONDITIONS: Final = ("connect-failure", "reset", "timeout")
HTTP_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)


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
    balancer: Literal["round_robin", "random", "weighted_random", "least_connections", "consistent_hash"] = (
        "round_robin"
    )
    hash_on: str | None = None
    health_check: HealthCheckConfig | None = None
    outlier_detection: OutlierDetectionConfig | None = field(default_factory=OutlierDetectionConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    max_concurrent_requests: int = 1000
    panic: bool = False


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

    def number(self, key: str, *, minimum: float = 0.0, strict: bool = True) -> float:
        default = self.defaults[key]
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
        ),
        errors,
        GatewayConfig,
    )
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
            _check_route(f"routes[{i}]", route, names, errors)
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
    status_path = top.string("status_path")
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
    )


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
        _check_route(f"routes[{i}]", route, config.upstreams or None, errors)
    if not config.upstreams:
        errors.add("upstreams", "at least one upstream is required")
    for name, upstream in config.upstreams.items():
        _check_upstream(f"upstreams.{name}", upstream, errors)
    _check_settings(
        config.max_body_size, config.max_message_size, config.trusted_proxies, config.status_path, errors
    )
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


def _check_route(where: str, route: RouteConfig, upstreams: Collection[str] | None, errors: _Errors) -> None:
    """`upstreams` is None when there are none to check `route.upstream` against."""
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
