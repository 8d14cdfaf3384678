"""`load_config`: a validated `GatewayConfig` from a mapping, a file or a config object."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from .._exceptions import ConfigError
from .load_upstream import _upstream
from .models import (
    INHERIT,
    AdminConfig,
    AuthConfig,
    HeaderRulesConfig,
    JwtConfig,
    RateLimitConfig,
    RedisConfig,
    RewriteConfig,
    RouteConfig,
    UpstreamConfig,
    _Inherit,
)
from .reader import _Errors, _file_bytes, _optional_section, _parse_file, _read_file, _Reader
from .validation import GatewayConfig, _check_lifecycle, _check_redis, _check_settings
from .validation_route import _check_route
from .validation_upstream import _check_upstream


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


def load_with_digest(
    source: GatewayConfig | Mapping[str, Any] | str | os.PathLike[str],
) -> tuple[GatewayConfig, str]:
    """`load_config(source)`, and the SHA-256 (hex) of what it was loaded from.

    A file's digest is of its bytes, read once (a file replaced meanwhile cannot give the
    config of one version and the digest of another); a mapping's is of its canonical JSON.
    """
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        raw = _file_bytes(path)
        return from_mapping(_parse_file(path, raw)), hashlib.sha256(raw).hexdigest()
    config = load_config(source)
    if isinstance(source, GatewayConfig):
        text = repr(source)
    else:
        text = json.dumps(source, sort_keys=True, default=repr, separators=(",", ":"))
    return config, hashlib.sha256(text.encode()).hexdigest()


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
            "drain_timeout",
            "drain_delay",
            "admin",
        ),
        errors,
        GatewayConfig,
    )
    redis = _redis(top)
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
    drain_timeout = top.number("drain_timeout", strict=False)
    drain_delay = top.number("drain_delay", strict=False)
    admin = _admin(top)
    _check_lifecycle(drain_timeout, drain_delay, admin, errors)
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
        drain_timeout=drain_timeout,
        drain_delay=drain_delay,
        admin=admin,
    )


def _admin(top: _Reader) -> AdminConfig:
    reader = top.section(
        "admin", ("path", "token", "allow_ips", "trace_url"), AdminConfig, on_by_default=True
    )
    if reader is None:
        return AdminConfig()
    allow = _addresses(reader, "allow_ips")
    return AdminConfig(
        path=reader.string("path"),
        token=reader.string("token"),
        allow_ips=allow if allow is not None else AdminConfig().allow_ips,
        trace_url=reader.string("trace_url"),
    )


def _redis(top: _Reader) -> RedisConfig | None:
    reader = top.section("redis", ("url", "timeout", "on_error"), RedisConfig)
    if reader is None:
        return None
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
    reader = route.section(
        "rate_limit", ("rate", "per", "burst", "key", "backend", "shadow"), RateLimitConfig
    )
    if reader is None:
        return None
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
    reader = route.section("auth", ("jwt",), AuthConfig)
    if reader is None:
        return None
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
    reader = route.section(key, ("set", "add", "remove"), HeaderRulesConfig)
    if reader is None:
        return None
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
    reader = route.section("rewrite", ("pattern", "replacement"), RewriteConfig)
    if reader is None:
        return None
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
