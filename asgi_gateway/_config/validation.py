"""`GatewayConfig` and the rules every config keeps, checked however it was built.

`GatewayConfig` lives here, beside `validate`, because it validates itself on construction.
`validate` checks the gateway-wide keys itself and hands each route to `validation_route`,
each upstream to `validation_upstream`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .checks import _positive
from .models import AdminConfig, RedisConfig, RouteConfig, UpstreamConfig
from .reader import _Errors
from .validation_route import _check_route
from .validation_upstream import _check_upstream


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
