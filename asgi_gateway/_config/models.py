"""The config sections: typed, frozen dataclasses, and the constants their values are checked against."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

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
class HedgeConfig:
    """Hedged requests of an upstream: `upstreams.<name>.hedge`.

    After `delay` seconds without a response head, one more try of the same request goes to
    another server, up to `max_extra` more; the first head wins.
    """

    delay: float = 0.05
    max_extra: int = 1


@dataclass(frozen=True, slots=True)
class AdaptiveConcurrencyConfig:
    """A concurrency limit that follows latency: `upstreams.<name>.adaptive_concurrency`.

    A gradient controller, as Envoy's adaptive concurrency filter: every `interval` seconds
    the `sample_percentile` of the latencies measured is compared with the minimum latency,
    `limit = gradient * limit + sqrt(gradient * limit)` with `gradient = (1 + buffer) *
    min_rtt / sample_rtt` clamped to 0.5 to 2, held within `min_limit` and `max_limit`. The
    minimum is measured first and again every `min_rtt_interval` seconds (plus up to
    `jitter` of it), over `min_rtt_samples` requests sent while the limit is `min_limit`.
    """

    initial_limit: int = 20
    min_limit: int = 3
    max_limit: int = 1000
    interval: float = 0.1
    sample_percentile: float = 50
    buffer: float = 0.25
    min_rtt_interval: float = 60.0
    min_rtt_samples: int = 25
    jitter: float = 0.15


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Finding an upstream's servers in DNS: `upstreams.<name>.discovery`.

    Each server entry's host name is resolved (A and AAAA) and every address becomes a
    server of its own, with the entry's weight and backup flag. It is resolved again every
    `interval` seconds, or when the answer's TTL runs out if that is sooner and
    `respect_ttl` (never more often than once a second). `nameservers` are `ip[:port]`
    (port 53 by default); None asks the system's resolver.
    """

    type: Literal["dns"] = "dns"
    interval: float = 5.0
    respect_ttl: bool = True
    nameservers: tuple[str, ...] | None = None


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
    passive detection is turned off (it is on by default); `hedge` is None when requests
    are not hedged (the default).
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
    hedge: HedgeConfig | None = None
    adaptive_concurrency: AdaptiveConcurrencyConfig | None = None
    #: None: each host name is resolved when a connection is made, as the system resolves it.
    discovery: DiscoveryConfig | None = None
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
class AdminConfig:
    """The operator's endpoints under `path` (None: off): status, readiness, reload.

    With `token` set, every admin request but `{path}/ready` needs
    `Authorization: Bearer TOKEN`; only clients within `allow_ips` reach them.
    """

    path: str | None = None
    token: str | None = None
    allow_ips: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    #: The status page links each recent error's trace here: `{trace_id}` is replaced.
    trace_url: str | None = None


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
