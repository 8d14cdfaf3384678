"""The rules an upstream keeps: its servers, balancer, retry, timeouts, hedge, health check,
outlier detection, adaptive concurrency and discovery (`upstreams.NAME`)."""

from __future__ import annotations

import functools
import ipaddress
import math
import re
from dataclasses import fields
from typing import Final
from urllib.parse import urlsplit

from .checks import _positive
from .models import (
    BALANCERS,
    RETRY_CONDITIONS,
    AdaptiveConcurrencyConfig,
    DiscoveryConfig,
    UpstreamConfig,
)
from .reader import _Errors

#: The most extra tries `hedge.max_extra` may ask for: each is one more request on the fleet.
_MAX_EXTRA_HEDGES: Final = 4
_HASH_ON = re.compile(r"^(header:[!#$%&'*+.^_`|~0-9A-Za-z-]+|cookie:[^\s;=,]+|client_ip|path)$")


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
