"""The edge keys of the config: defaults, and every mistake named in one ConfigError."""

from __future__ import annotations

from typing import Any

import pytest
from edge.tokens import pem

from asgi_gateway import (
    ConfigError,
    Gateway,
    GatewayConfig,
    JwtConfig,
    RateLimitConfig,
    RouteConfig,
    load_config,
)
from asgi_gateway._config import ServerConfig, UpstreamConfig

UPSTREAMS = {"u": {"servers": ["http://127.0.0.1:9"]}}


def load(*routes: dict[str, Any], **top: Any) -> GatewayConfig:
    return load_config(
        {"routes": [{"path": "/", "upstream": "u", **r} for r in routes], "upstreams": UPSTREAMS, **top}
    )


def errors(*routes: dict[str, Any], **top: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load(*routes, **top)
    return dict(info.value.errors)


def test_defaults() -> None:
    config = load(
        {"rate_limit": {"rate": 5}, "auth": {"jwt": {"jwks_url": "http://127.0.0.1:1/jwks"}}}, redis={}
    )
    route = config.routes[0]
    assert route.rate_limit == RateLimitConfig(
        rate=5.0, per=1.0, burst=None, key="client_ip", backend="memory"
    )
    assert route.auth is not None and route.auth.jwt is not None
    jwt = route.auth.jwt
    assert (jwt.algorithms, jwt.leeway, jwt.forward_authorization, dict(jwt.claims_to_headers)) == (
        ("RS256",),
        30.0,
        True,
        {},
    )
    assert route.allow_ips is None and route.deny_ips == ()
    assert config.redis is not None
    assert (config.redis.url, config.redis.timeout, config.redis.on_error) == (
        "redis://127.0.0.1:6379/0",
        0.05,
        "allow",
    )
    assert load({}).routes[0].rate_limit is None and load({}).redis is None


def test_every_edge_mistake_at_once() -> None:
    found = errors(
        {
            "rate_limit": {
                "rate": 0,
                "per": -1,
                "burst": 0,
                "key": "cookie:x",
                "backend": "disk",
                "shadow": "yes",
            },
            "allow_ips": ["10.0.0.0/33"],
            "deny_ips": "10.0.0.1",
        },
        {"rate_limit": {"rate": 1, "key": "claim:sub"}},
        {"rate_limit": {"rate": 1, "backend": "redis"}},
        {"auth": {"jwt": {"jwks_url": "ftp://x", "algorithms": ["none", "HS256"], "leeway": -1}}},
        {"auth": {"jwt": {"secret": "s" * 40, "public_key": "x", "algorithms": ["RS256"]}}},
        {"auth": {"jwt": {"jwks_url": "http://127.0.0.1:1/jwks", "algorithms": ["HS256"]}}},
        {
            "auth": {
                "jwt": {"secret": "s" * 40, "algorithms": ["HS256"], "claims_to_headers": {"sub": "Host"}}
            }
        },
        {"auth": {"jwt": {}}},
        {"auth": {}},
        {"auth": {"basic": {}}},
    )
    assert found == {
        "routes[0].rate_limit.rate": "0 must be greater than 0",
        "routes[0].rate_limit.per": "-1 must be greater than 0",
        "routes[0].rate_limit.burst": "0 must be at least 1",
        "routes[0].rate_limit.shadow": "'yes' is not true or false",
        "routes[0].deny_ips": "'10.0.0.1' is not a list of addresses or CIDRs",
        "routes[0].allow_ips[0]": "'10.0.0.0/33' is not an IP address or CIDR",
        "routes[0].rate_limit.key": "'cookie:x' is not client_ip, header:NAME, claim:NAME or route",
        "routes[0].rate_limit.backend": "'disk' is not one of memory, redis",
        "routes[1].rate_limit.key": "'claim:sub' needs the route's auth.jwt (claims come from its token)",
        "routes[2].rate_limit.backend": "redis needs the top-level redis section (its url)",
        "routes[3].auth.jwt.leeway": "-1 must be at least 0",
        "routes[3].auth.jwt.jwks_url": "'ftp://x' is not an http(s) URL",
        "routes[3].auth.jwt.algorithms[0]": (
            "'none' is not one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512, EdDSA"
        ),
        "routes[4].auth.jwt.secret": "only one of jwks_url, public_key or secret may be set (also: public_key)",
        "routes[4].auth.jwt.public_key": "is not a PEM public key (-----BEGIN PUBLIC KEY-----...)",
        "routes[4].auth.jwt.algorithms": "['RS256']: a secret only verifies HS256, HS384, HS512",
        "routes[6].auth.jwt.claims_to_headers.sub": "'host' is not a header name a claim may set",
        "routes[7].auth.jwt.jwks_url": "one of jwks_url, public_key or secret is required",
        "routes[5].auth.jwt.algorithms": "['HS256'] need a secret; jwks_url and public_key verify the others",
        "routes[8].auth.jwt": "is required in auth (the only method so far)",
        "routes[9].auth.basic": "unknown key (allowed: jwt)",
        "routes[9].auth.jwt": "is required in auth (the only method so far)",
    }


def test_redis_section_mistakes() -> None:
    found = errors({}, redis={"url": "http://x", "timeout": 0, "on_error": "maybe", "db": 1})
    assert found == {
        "redis.db": "unknown key (allowed: url, timeout, on_error)",
        "redis.timeout": "0 must be greater than 0",
        "redis.url": "'http://x' is not a redis://, rediss:// or unix:// URL",
        "redis.on_error": "'maybe' is not one of allow, deny",
    }


def test_the_typed_objects_are_validated_too() -> None:
    with pytest.raises(ConfigError, match="redis needs the top-level redis section"):
        GatewayConfig(
            routes=(RouteConfig("/", "u", rate_limit=RateLimitConfig(rate=1, backend="redis")),),
            upstreams={"u": UpstreamConfig("u", (ServerConfig("http://127.0.0.1:9"),))},
        )


def test_keys_are_checked_when_the_gateway_is_built(rsa_keys: Any) -> None:
    with pytest.raises(
        ConfigError, match=r"routes\[0\].auth.jwt.secret: HS256 needs a secret of at least 32 bytes"
    ):
        Gateway(load({"auth": {"jwt": {"secret": "short", "algorithms": ["HS256"]}}}))
    with pytest.raises(ConfigError, match=r"routes\[0\].auth.jwt.public_key: an RSA key cannot verify ES256"):
        Gateway(load({"auth": {"jwt": {"public_key": pem(rsa_keys[0]), "algorithms": ["ES256"]}}}))
    assert JwtConfig().algorithms == ("RS256",)
