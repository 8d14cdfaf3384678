"""Configuration: typed, frozen models, loading from files or mappings, validation."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
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
        ConfigError: The config is invalid or the file cannot be read or parsed; the
            message names the offending key path and value, e.g.
            `upstreams.users.servers[1].url: 'htp://x' is not an http(s) URL`.
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


class _Reader:
    """Reads one mapping, checking types and refusing unknown keys."""

    def __init__(self, data: Any, path: str, allowed: Sequence[str]) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path or "config", f"{data!r} is not a mapping")
        for key in data:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                raise ConfigError(where, f"unknown key (allowed: {', '.join(allowed)})")
        self.data = data
        self.path = path

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(self.where(key), f"{value!r} is not true or false")
        return value

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        if key not in self.data:
            if required:
                raise ConfigError(self.where(key), "is required")
            return default
        value = self.data[key]
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(self.where(key), f"{value!r} is not a non-empty string")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0, strict: bool = True) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(self.where(key), f"{value!r} is not a number")
        if value < minimum or (strict and value == minimum):
            bound = "greater than" if strict else "at least"
            raise ConfigError(self.where(key), f"{value!r} must be {bound} {minimum:g}")
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int = 1) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.where(key), f"{value!r} is not an integer")
        if value < minimum:
            raise ConfigError(self.where(key), f"{value!r} must be at least {minimum}")
        return value


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
    """Build a `GatewayConfig` from plain data (the schema of DESIGN.md)."""
    top = _Reader(
        data,
        "",
        ("routes", "upstreams", "max_body_size", "preserve_host", "trusted_proxies", "status_path"),
    )
    raw_upstreams = top.raw("upstreams")
    if not isinstance(raw_upstreams, Mapping) or not raw_upstreams:
        raise ConfigError("upstreams", f"{raw_upstreams!r} must be a non-empty mapping of upstream names")
    upstreams = {str(name): _upstream(str(name), spec) for name, spec in raw_upstreams.items()}

    raw_routes = top.raw("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        raise ConfigError("routes", f"{raw_routes!r} must be a non-empty list")
    routes = tuple(_route(f"routes[{i}]", spec) for i, spec in enumerate(raw_routes))

    max_body_size = _max_body_size(top, 10 * 1024 * 1024)
    trusted = top.raw("trusted_proxies", [])
    if not isinstance(trusted, list) or not all(isinstance(item, str) for item in trusted):
        raise ConfigError("trusted_proxies", f"{trusted!r} is not a list of addresses or CIDRs")
    return GatewayConfig(
        routes=routes,
        upstreams=upstreams,
        max_body_size=max_body_size if isinstance(max_body_size, int) else None,
        preserve_host=top.boolean("preserve_host", False),
        trusted_proxies=tuple(trusted),
        status_path=top.string("status_path"),
    )


def _max_body_size(reader: _Reader, default: int | _Inherit | None) -> int | _Inherit | None:
    if not reader.has("max_body_size"):
        return default
    value = reader.raw("max_body_size")
    if value is None:
        return None
    return reader.integer("max_body_size", 0, minimum=0)


def _route(path: str, data: Any) -> RouteConfig:
    reader = _Reader(
        data,
        path,
        ("path", "upstream", "strip_prefix", "methods", "host", "max_body_size", "preserve_host"),
    )
    methods = reader.raw("methods")
    if methods is not None:
        if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
            raise ConfigError(reader.where("methods"), f"{methods!r} is not a non-empty list of method names")
        methods = tuple(m.upper() for m in methods)
    return RouteConfig(
        path=reader.string("path", required=True) or "/",
        upstream=reader.string("upstream", required=True) or "",
        strip_prefix=reader.boolean("strip_prefix", False),
        methods=methods,
        host=reader.string("host"),
        max_body_size=_max_body_size(reader, INHERIT),
        preserve_host=reader.boolean("preserve_host", False) if reader.has("preserve_host") else INHERIT,
    )


def _upstream(name: str, data: Any) -> UpstreamConfig:
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
    )
    raw_servers = reader.raw("servers")
    if not isinstance(raw_servers, list) or not raw_servers:
        raise ConfigError(reader.where("servers"), f"{raw_servers!r} must be a non-empty list")
    servers = []
    for i, spec in enumerate(raw_servers):
        if isinstance(spec, str):
            spec = {"url": spec}
        server = _Reader(spec, f"{path}.servers[{i}]", ("url", "weight", "backup"))
        servers.append(
            ServerConfig(
                url=server.string("url", required=True) or "",
                weight=server.integer("weight", 1, minimum=1),
                backup=server.boolean("backup", False),
            )
        )

    check_on, check_data = _optional_section(reader, "health_check", False)
    health_check = None
    if check_on:
        check = _Reader(
            check_data,
            reader.where("health_check"),
            ("path", "interval", "timeout", "healthy_threshold", "unhealthy_threshold"),
        )
        health_check = HealthCheckConfig(
            path=check.string("path", "/healthz") or "/healthz",
            interval=check.number("interval", 5.0),
            timeout=check.number("timeout", 1.0),
            healthy_threshold=check.integer("healthy_threshold", 2),
            unhealthy_threshold=check.integer("unhealthy_threshold", 2),
        )

    outlier_on, outlier_data = _optional_section(reader, "outlier_detection", True)
    outlier = None
    if outlier_on:
        od = _Reader(
            outlier_data,
            reader.where("outlier_detection"),
            ("consecutive_failures", "base_ejection_time", "max_ejection_time", "max_ejection_percent"),
        )
        outlier = OutlierDetectionConfig(
            consecutive_failures=od.integer("consecutive_failures", 5),
            base_ejection_time=od.number("base_ejection_time", 30.0),
            max_ejection_time=od.number("max_ejection_time", 300.0),
            max_ejection_percent=od.number("max_ejection_percent", 50, strict=False),
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
    )
    retry_on = retry_reader.raw("retry_on", list(RetryConfig().retry_on))
    if not isinstance(retry_on, list):
        raise ConfigError(retry_reader.where("retry_on"), f"{retry_on!r} is not a list")
    retry = RetryConfig(
        attempts=retry_reader.integer("attempts", 3),
        retry_on=tuple(retry_on),
        backoff_base=retry_reader.number("backoff_base", 0.025, strict=False),
        backoff_max=retry_reader.number("backoff_max", 0.25, strict=False),
        budget_ratio=retry_reader.number("budget_ratio", 0.2, strict=False),
        budget_min_per_second=retry_reader.number("budget_min_per_second", 10, strict=False),
        buffer_limit=retry_reader.integer("buffer_limit", 65536, minimum=0),
    )

    timeouts_reader = _Reader(
        reader.raw("timeouts", {}), reader.where("timeouts"), ("connect", "read", "total")
    )
    timeouts = TimeoutsConfig(
        connect=timeouts_reader.number("connect", 2.0),
        read=timeouts_reader.number("read", 30.0),
        total=timeouts_reader.number("total", 60.0),
    )
    return UpstreamConfig(
        name=name,
        servers=tuple(servers),
        balancer=reader.string("balancer", "round_robin"),  # type: ignore[arg-type]  # checked in validate()
        hash_on=reader.string("hash_on"),
        health_check=health_check,
        outlier_detection=outlier,
        retry=retry,
        timeouts=timeouts,
        max_concurrent_requests=reader.integer("max_concurrent_requests", 1000),
        panic=reader.boolean("panic", False),
    )


# -- validation of the typed objects (whatever built them) --------------------------------

_HASH_ON = re.compile(r"^(header:[!#$%&'*+.^_`|~0-9A-Za-z-]+|cookie:[^\s;=,]+|client_ip|path)$")


def _check_url(where: str, url: str) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(where, f"{url!r} is not an http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(where, f"{url!r} is not an http(s) URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(where, f"{url!r} must be scheme://host[:port] with no path, query or credentials")
    if port == 0:
        raise ConfigError(where, f"{url!r} has port 0")


def _positive(where: str, value: object, *, allow_zero: bool = False) -> None:
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        raise ConfigError(where, f"{value!r} must be {'non-negative' if allow_zero else 'positive'}")


def validate(config: GatewayConfig) -> None:
    """Check cross-field rules on a config however it was built; raise `ConfigError`."""
    if not config.upstreams:
        raise ConfigError("upstreams", "at least one upstream is required")
    if not config.routes:
        raise ConfigError("routes", "at least one route is required")
    for name, upstream in config.upstreams.items():
        _validate_upstream(f"upstreams.{name}", upstream)
    for i, route in enumerate(config.routes):
        where = f"routes[{i}]"
        if not isinstance(route.path, str) or not route.path.startswith("/"):
            raise ConfigError(f"{where}.path", f"{route.path!r} must start with '/'")
        if "?" in route.path or "#" in route.path or "%" in route.path:
            raise ConfigError(f"{where}.path", f"{route.path!r} must be a plain path without '?', '#' or '%'")
        if route.upstream not in config.upstreams:
            known = ", ".join(sorted(config.upstreams))
            raise ConfigError(
                f"{where}.upstream", f"{route.upstream!r} is not a configured upstream ({known})"
            )
        if route.methods is not None:
            for method in route.methods:
                if method not in HTTP_METHODS and not re.fullmatch(r"[A-Z][A-Z0-9_-]*", method):
                    raise ConfigError(f"{where}.methods", f"{method!r} is not an HTTP method")
        if route.host is not None and (not route.host or any(c in route.host for c in "/ ")):
            raise ConfigError(f"{where}.host", f"{route.host!r} is not a host name")
        if not isinstance(route.max_body_size, _Inherit) and route.max_body_size is not None:
            _positive(f"{where}.max_body_size", route.max_body_size, allow_zero=True)
    if config.max_body_size is not None:
        _positive("max_body_size", config.max_body_size, allow_zero=True)
    for i, proxy in enumerate(config.trusted_proxies):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(f"trusted_proxies[{i}]", f"{proxy!r} is not an IP address or CIDR") from None
    if config.status_path is not None and not config.status_path.startswith("/"):
        raise ConfigError("status_path", f"{config.status_path!r} must start with '/'")


def _validate_upstream(where: str, upstream: UpstreamConfig) -> None:
    if not upstream.servers:
        raise ConfigError(f"{where}.servers", "at least one server is required")
    for i, server in enumerate(upstream.servers):
        _check_url(f"{where}.servers[{i}].url", server.url)
        if isinstance(server.weight, bool) or not isinstance(server.weight, int) or server.weight < 1:
            raise ConfigError(f"{where}.servers[{i}].weight", f"{server.weight!r} must be a positive integer")
    if upstream.balancer not in BALANCERS:
        raise ConfigError(f"{where}.balancer", f"{upstream.balancer!r} is not one of {', '.join(BALANCERS)}")
    if upstream.hash_on is not None and not _HASH_ON.match(upstream.hash_on):
        raise ConfigError(
            f"{where}.hash_on", f"{upstream.hash_on!r} is not header:NAME, cookie:NAME, client_ip or path"
        )
    if upstream.balancer == "consistent_hash" and upstream.hash_on is None:
        raise ConfigError(f"{where}.hash_on", "is required when balancer is consistent_hash")
    for i, condition in enumerate(upstream.retry.retry_on):
        if isinstance(condition, bool) or not (
            condition in RETRY_CONDITIONS or (isinstance(condition, int) and 500 <= condition <= 599)
        ):
            raise ConfigError(
                f"{where}.retry.retry_on[{i}]",
                f"{condition!r} is not one of {', '.join(RETRY_CONDITIONS)} or a 5xx status",
            )
    retry = upstream.retry
    if retry.attempts < 1:
        raise ConfigError(f"{where}.retry.attempts", f"{retry.attempts!r} must be at least 1")
    if retry.backoff_max < retry.backoff_base:
        raise ConfigError(f"{where}.retry.backoff_max", f"{retry.backoff_max!r} is below backoff_base")
    for name in ("connect", "read", "total"):
        _positive(f"{where}.timeouts.{name}", getattr(upstream.timeouts, name))
    if upstream.health_check is not None:
        hc = upstream.health_check
        if not hc.path.startswith("/"):
            raise ConfigError(f"{where}.health_check.path", f"{hc.path!r} must start with '/'")
        for f in fields(hc):
            if f.name != "path":
                _positive(f"{where}.health_check.{f.name}", getattr(hc, f.name))
    if upstream.outlier_detection is not None:
        od = upstream.outlier_detection
        if not 0 <= od.max_ejection_percent <= 100:
            raise ConfigError(
                f"{where}.outlier_detection.max_ejection_percent",
                f"{od.max_ejection_percent!r} is not 0 to 100",
            )
        if od.max_ejection_time < od.base_ejection_time:
            raise ConfigError(
                f"{where}.outlier_detection.max_ejection_time",
                f"{od.max_ejection_time!r} is below base_ejection_time",
            )
    if upstream.max_concurrent_requests < 1:
        raise ConfigError(
            f"{where}.max_concurrent_requests", f"{upstream.max_concurrent_requests!r} must be at least 1"
        )
