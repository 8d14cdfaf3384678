"""The public names: what `asgi_gateway` exports is the contract of DESIGN.md."""

from __future__ import annotations

import importlib.resources

import asgi_gateway
from asgi_gateway import _exceptions

REQUIRED = {
    "Gateway",
    "GatewayMiddleware",
    "load_config",
    "GatewayConfig",
    "ConfigError",
    "GatewayError",
    "ClientRequestError",
    "BadRequest",
    "PayloadTooLarge",
    "UpstreamError",
    "UpstreamUnavailable",
    "BadGateway",
    "GatewayTimeout",
}


def test_all_contains_the_entry_points_and_exceptions() -> None:
    missing = REQUIRED - set(asgi_gateway.__all__)
    assert not missing, f"missing from asgi_gateway.__all__: {sorted(missing)}"


def test_every_exception_of_the_tree_is_public() -> None:
    missing = set(_exceptions.__all__) - set(asgi_gateway.__all__)
    assert not missing, f"exceptions not exported: {sorted(missing)}"
    for name in _exceptions.__all__:
        assert getattr(asgi_gateway, name) is getattr(_exceptions, name)


def test_every_name_in_all_exists_once() -> None:
    assert len(asgi_gateway.__all__) == len(set(asgi_gateway.__all__))
    for name in asgi_gateway.__all__:
        assert hasattr(asgi_gateway, name), name


def test_public_names_live_in_private_modules_but_read_as_public() -> None:
    # Users import from the package; the objects are defined in private modules.
    for name in ("Gateway", "GatewayMiddleware", "load_config", "GatewayConfig", "ConfigError"):
        module = getattr(asgi_gateway, name).__module__
        assert module.startswith("asgi_gateway._"), (name, module)


def test_exception_tree_shape() -> None:
    assert issubclass(asgi_gateway.ConfigError, asgi_gateway.GatewayError)
    for name in ("BadGateway", "GatewayTimeout", "UpstreamUnavailable"):
        assert issubclass(getattr(asgi_gateway, name), asgi_gateway.UpstreamError)
    for name in ("BadRequest", "PayloadTooLarge"):
        assert issubclass(getattr(asgi_gateway, name), asgi_gateway.ClientRequestError)
    statuses = {
        "BadRequest": (400, "bad_request"),
        "PayloadTooLarge": (413, "payload_too_large"),
        "BadGateway": (502, "bad_gateway"),
        "UpstreamUnavailable": (503, "upstream_unavailable"),
        "GatewayTimeout": (504, "gateway_timeout"),
    }
    for name, (status, code) in statuses.items():
        cls = getattr(asgi_gateway, name)
        assert (cls.status, cls.code) == (status, code), name


def test_package_is_typed() -> None:
    assert (importlib.resources.files("asgi_gateway") / "py.typed").is_file()
