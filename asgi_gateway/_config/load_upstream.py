"""The readers of an `upstreams.NAME` section: its servers, health check, outlier detection,
retry, timeouts, hedge, adaptive concurrency and discovery."""

from __future__ import annotations

from typing import Any

from .models import (
    AdaptiveConcurrencyConfig,
    DiscoveryConfig,
    HealthCheckConfig,
    HedgeConfig,
    OutlierDetectionConfig,
    RetryConfig,
    ServerConfig,
    TimeoutsConfig,
    UpstreamConfig,
)
from .reader import _Errors, _Reader


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
            "hedge",
            "adaptive_concurrency",
            "discovery",
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

    health_check = None
    check = reader.section(
        "health_check",
        ("path", "interval", "timeout", "healthy_threshold", "unhealthy_threshold"),
        HealthCheckConfig,
    )
    if check is not None:
        health_check = HealthCheckConfig(
            path=check.string("path") or "",
            interval=check.number("interval"),
            timeout=check.number("timeout"),
            healthy_threshold=check.integer("healthy_threshold"),
            unhealthy_threshold=check.integer("unhealthy_threshold"),
        )

    outlier = None
    od = reader.section(
        "outlier_detection",
        ("consecutive_failures", "base_ejection_time", "max_ejection_time", "max_ejection_percent"),
        OutlierDetectionConfig,
        on_by_default=True,
    )
    if od is not None:
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

    hedge = None
    hedge_reader = reader.section("hedge", ("delay", "max_extra"), HedgeConfig)
    if hedge_reader is not None:
        hedge = HedgeConfig(delay=hedge_reader.number("delay"), max_extra=hedge_reader.integer("max_extra"))
    adaptive = _adaptive_concurrency(reader)
    return UpstreamConfig(
        name=name,
        servers=tuple(servers),
        balancer=reader.string("balancer"),  # type: ignore[arg-type]  # checked in _check_upstream()
        hash_on=reader.string("hash_on"),
        health_check=health_check,
        outlier_detection=outlier,
        retry=retry,
        timeouts=timeouts,
        hedge=hedge,
        adaptive_concurrency=adaptive,
        discovery=_discovery(reader),
        max_concurrent_requests=reader.integer("max_concurrent_requests"),
        panic=reader.boolean("panic"),
    )


def _discovery(upstream: _Reader) -> DiscoveryConfig | None:
    reader = upstream.section(
        "discovery", ("type", "interval", "respect_ttl", "nameservers"), DiscoveryConfig
    )
    if reader is None:
        return None
    nameservers = reader.raw("nameservers")
    if nameservers is not None and (
        not isinstance(nameservers, list) or not all(isinstance(item, str) for item in nameservers)
    ):
        upstream.errors.add(
            reader.where("nameservers"), f"{nameservers!r} is not a list of ip[:port] strings"
        )
        nameservers = None
    # The values are checked in _check_upstream(), so that a config built in Python is checked alike.
    return DiscoveryConfig(
        type=reader.string("type"),  # type: ignore[arg-type]  # checked in _check_upstream()
        interval=reader.number("interval"),
        respect_ttl=reader.boolean("respect_ttl"),
        nameservers=tuple(nameservers) if nameservers is not None else None,
    )


def _adaptive_concurrency(upstream: _Reader) -> AdaptiveConcurrencyConfig | None:
    reader = upstream.section(
        "adaptive_concurrency",
        (
            "initial_limit",
            "min_limit",
            "max_limit",
            "interval",
            "sample_percentile",
            "buffer",
            "min_rtt_interval",
            "min_rtt_samples",
            "jitter",
        ),
        AdaptiveConcurrencyConfig,
    )
    if reader is None:
        return None
    # Only the types are read here; the bounds are checked in _check_upstream(), so that a
    # config built in Python is checked alike.
    lowest = -float("inf")
    return AdaptiveConcurrencyConfig(
        initial_limit=reader.integer("initial_limit", minimum=-(2**63)),
        min_limit=reader.integer("min_limit", minimum=-(2**63)),
        max_limit=reader.integer("max_limit", minimum=-(2**63)),
        interval=reader.number("interval", minimum=lowest, strict=False),
        sample_percentile=reader.number("sample_percentile", minimum=lowest, strict=False),
        buffer=reader.number("buffer", minimum=lowest, strict=False),
        min_rtt_interval=reader.number("min_rtt_interval", minimum=lowest, strict=False),
        min_rtt_samples=reader.integer("min_rtt_samples", minimum=-(2**63)),
        jitter=reader.number("jitter", minimum=lowest, strict=False),
    )
