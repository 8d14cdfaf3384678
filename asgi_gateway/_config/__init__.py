"""Configuration: typed, frozen models, loading from files or mappings, validation.

`models` holds the config sections, `validation` the `GatewayConfig` that checks itself on
construction, `reader` and `load` (with `load_upstream` for the `upstreams` sections) turn
plain data (a file's, a mapping's) into one, and `templates` parses header rule values and rewrite replacements.
"""

# `name as name` re-exports what `__all__` leaves out but is imported from here: by the
# package's other modules, by its tests, and by `typing.get_type_hints(model, vars(_config))`,
# which resolves the models' annotations (`Mapping`, `Literal`) in this namespace.
from collections.abc import Mapping as Mapping
from typing import Literal as Literal

from .load import from_mapping as from_mapping
from .load import load_config
from .load import load_with_digest as load_with_digest
from .models import (
    BALANCERS,
    JWT_ALGORITHMS,
    RETRY_CONDITIONS,
    AdaptiveConcurrencyConfig,
    AdminConfig,
    AuthConfig,
    DiscoveryConfig,
    HeaderRulesConfig,
    HealthCheckConfig,
    HedgeConfig,
    JwtConfig,
    OutlierDetectionConfig,
    RateLimitConfig,
    RedisConfig,
    RetryConfig,
    RewriteConfig,
    RouteConfig,
    ServerConfig,
    TimeoutsConfig,
    UpstreamConfig,
)
from .models import HTTP_METHODS as HTTP_METHODS
from .models import INHERIT as INHERIT
from .models import _Inherit as _Inherit
from .reader import _Errors as _Errors
from .reader import _Reader as _Reader
from .templates import HEADER_VARIABLES as HEADER_VARIABLES
from .templates import compile_rewrite as compile_rewrite
from .templates import header_template as header_template
from .templates import rewrite_template as rewrite_template
from .validation import GatewayConfig
from .validation import validate as validate

__all__ = [
    "BALANCERS",
    "JWT_ALGORITHMS",
    "RETRY_CONDITIONS",
    "AdaptiveConcurrencyConfig",
    "AdminConfig",
    "AuthConfig",
    "DiscoveryConfig",
    "GatewayConfig",
    "HeaderRulesConfig",
    "HealthCheckConfig",
    "HedgeConfig",
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
