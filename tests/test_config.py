"""Config: one schema from a mapping, TOML, YAML, JSON or typed objects; errors name key path and value."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from servers import Upstreams, http_client

from asgi_gateway import (
    ConfigError,
    Gateway,
    GatewayConfig,
    GatewayMiddleware,
    RouteConfig,
    ServerConfig,
    TimeoutsConfig,
    UpstreamConfig,
    load_config,
)

BAD_URL_MESSAGE = "upstreams.users.servers[1].url: 'htp://x' is not an http(s) URL"


def base() -> dict[str, Any]:
    return {
        "routes": [
            {"path": "/api/users", "upstream": "users", "methods": ["GET", "POST"], "strip_prefix": True},
            {"path": "/api", "upstream": "misc", "host": "api.example.com"},
        ],
        "upstreams": {
            "users": {
                "servers": [
                    {"url": "http://127.0.0.1:9001", "weight": 2},
                    {"url": "http://127.0.0.1:9002", "backup": True},
                ],
                "balancer": "round_robin",
                "timeouts": {"connect": 1.5, "read": 10, "total": 20},
                "retry": {"attempts": 2},
            },
            "misc": {"servers": [{"url": "https://example.com"}]},
        },
        "max_body_size": 2048,
        "preserve_host": False,
        "trusted_proxies": ["10.0.0.0/8"],
    }


def toml_value(value: Any) -> str:
    """Just enough TOML for these configs: everything inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def write_config(directory: Path, data: dict[str, Any], suffix: str) -> Path:
    path = directory / f"gateway{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(data))
    elif suffix in (".yaml", ".yml"):
        path.write_text(yaml.safe_dump(data))
    elif suffix == ".toml":
        path.write_text("".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in data.items()))
    else:
        raise ValueError(suffix)
    return path


def test_mapping_builds_the_typed_config() -> None:
    config = load_config(base())
    assert isinstance(config, GatewayConfig)
    first = config.routes[0]
    assert (first.path, first.upstream, first.strip_prefix, first.methods) == (
        "/api/users",
        "users",
        True,
        ("GET", "POST"),
    )
    assert config.routes[1].host == "api.example.com"
    users = config.upstreams["users"]
    assert [s.url for s in users.servers] == ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    assert [s.weight for s in users.servers] == [2, 1]
    assert [s.backup for s in users.servers] == [False, True]
    assert (users.timeouts.connect, users.timeouts.read, users.timeouts.total) == (1.5, 10, 20)
    assert users.retry.attempts == 2
    assert config.max_body_size == 2048
    assert config.trusted_proxies == ("10.0.0.0/8",)


def test_defaults_follow_the_design() -> None:
    config = load_config(
        {"routes": [{"path": "/", "upstream": "u"}], "upstreams": {"u": {"servers": [{"url": "http://a"}]}}}
    )
    upstream = config.upstreams["u"]
    assert config.max_body_size == 10 * 1024 * 1024
    assert config.preserve_host is False
    assert config.trusted_proxies == ()
    assert config.status_path is None
    assert upstream.balancer == "round_robin"
    assert upstream.servers[0].weight == 1 and upstream.servers[0].backup is False
    assert (upstream.timeouts.connect, upstream.timeouts.read, upstream.timeouts.total) == (2.0, 30.0, 60.0)
    assert upstream.retry.attempts == 3
    assert upstream.max_concurrent_requests == 1000
    assert upstream.health_check is None
    assert upstream.outlier_detection is not None
    assert config.routes[0].strip_prefix is False
    assert config.routes[0].methods is None


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".yml", ".json"])
def test_files_give_the_same_config_as_the_mapping(tmp_path: Path, suffix: str) -> None:
    path = write_config(tmp_path, base(), suffix)
    assert load_config(path) == load_config(base())
    assert load_config(str(path)) == load_config(base())


def test_typed_config_objects_are_accepted() -> None:
    config = GatewayConfig(
        routes=(RouteConfig(path="/api", upstream="users"),),
        upstreams={
            "users": UpstreamConfig(
                name="users",
                servers=(ServerConfig(url="http://127.0.0.1:9001"),),
                timeouts=TimeoutsConfig(read=5.0),
            )
        },
    )
    assert load_config(config) is config


def mutate(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = copy.deepcopy(base())
    change(data)
    return data


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        target: Any = data
        keys = path.split("/")
        for key in keys[:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        last = keys[-1]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return change


# (mutation, key path the message starts with, text the message contains)
BAD_CONFIGS = {
    "unknown top-level key": (_set("bogus", 1), "bogus", "unknown"),
    "unknown route key": (_set("routes/0/pathh", "/x"), "routes[0].pathh", "unknown"),
    "unknown upstream key": (_set("upstreams/users/balancr", "random"), "upstreams.users.balancr", "unknown"),
    "unknown server key": (
        _set("upstreams/users/servers/0/wieght", 3),
        "upstreams.users.servers[0].wieght",
        "unknown",
    ),
    "unknown timeouts key": (
        _set("upstreams/users/timeouts/conect", 1),
        "upstreams.users.timeouts.conect",
        "unknown",
    ),
    "unknown upstream in route": (_set("routes/1/upstream", "nope"), "routes[1].upstream", "'nope'"),
    "bad url": (
        _set("upstreams/users/servers/1/url", "htp://x"),
        "upstreams.users.servers[1].url",
        "'htp://x'",
    ),
    "url without host": (
        _set("upstreams/misc/servers/0/url", "http://"),
        "upstreams.misc.servers[0].url",
        "http://",
    ),
    "zero weight": (_set("upstreams/users/servers/0/weight", 0), "upstreams.users.servers[0].weight", "0"),
    "negative weight": (
        _set("upstreams/users/servers/1/weight", -2),
        "upstreams.users.servers[1].weight",
        "-2",
    ),
    "zero read timeout": (_set("upstreams/users/timeouts/read", 0), "upstreams.users.timeouts.read", "0"),
    "negative connect timeout": (
        _set("upstreams/users/timeouts/connect", -1.5),
        "upstreams.users.timeouts.connect",
        "-1.5",
    ),
    "zero total timeout": (
        _set("upstreams/users/timeouts/total", 0.0),
        "upstreams.users.timeouts.total",
        "0",
    ),
    "negative max_body_size": (_set("max_body_size", -1), "max_body_size", "-1"),
    "unknown balancer": (
        _set("upstreams/users/balancer", "fastest"),
        "upstreams.users.balancer",
        "'fastest'",
    ),
    "bad trusted proxy": (_set("trusted_proxies", ["not-an-ip"]), "trusted_proxies[0]", "'not-an-ip'"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_mapping_raises_config_error_naming_path_and_value(case: str) -> None:
    change, path, value = BAD_CONFIGS[case]
    with pytest.raises(ConfigError) as info:
        load_config(mutate(change))
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert value in message.removeprefix(f"{path}: "), message


def test_bad_url_message_is_exact() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(mutate(_set("upstreams/users/servers/1/url", "htp://x")))
    assert str(info.value) == BAD_URL_MESSAGE


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".yml", ".json"])
@pytest.mark.parametrize(
    "case", ["bad url", "unknown server key", "zero weight", "unknown upstream in route"]
)
def test_bad_files_raise_the_same_config_error(tmp_path: Path, suffix: str, case: str) -> None:
    change, path, _ = BAD_CONFIGS[case]
    data = mutate(change)
    with pytest.raises(ConfigError) as from_mapping:
        load_config(data)
    with pytest.raises(ConfigError) as from_file:
        load_config(write_config(tmp_path, data, suffix))
    assert str(from_file.value) == str(from_mapping.value)
    assert str(from_file.value).startswith(path)


def test_typed_objects_are_validated_too() -> None:
    with pytest.raises(ConfigError) as info:
        GatewayConfig(
            routes=(RouteConfig(path="/api", upstream="users"),),
            upstreams={
                "users": UpstreamConfig(
                    name="users",
                    servers=(ServerConfig(url="http://127.0.0.1:9001"), ServerConfig(url="htp://x")),
                )
            },
        )
    assert str(info.value) == BAD_URL_MESSAGE


@pytest.mark.parametrize(
    "case", ["bad url", "unknown top-level key", "zero read timeout", "unknown upstream in route"]
)
def test_gateway_middleware_validates_at_construction(case: str) -> None:
    change, path, _ = BAD_CONFIGS[case]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never called")

    with pytest.raises(ConfigError) as info:
        GatewayMiddleware(app, config=mutate(change))
    assert str(info.value).startswith(path)
    with pytest.raises(ConfigError) as info:
        Gateway(mutate(change))
    assert str(info.value).startswith(path)


def test_gateway_middleware_validates_files_at_construction(tmp_path: Path) -> None:
    path = write_config(tmp_path, mutate(_set("upstreams/users/servers/1/url", "htp://x")), ".toml")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never called")

    with pytest.raises(ConfigError) as info:
        GatewayMiddleware(app, config=str(path))
    assert str(info.value) == BAD_URL_MESSAGE


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("gateway.ini", "[routes]\n"),
        ("broken.toml", "routes = [\n"),
        ("broken.json", "{"),
        ("broken.yaml", "routes: [\n"),
        ("list.json", "[]"),
    ],
)
def test_unreadable_files_raise_config_error(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError):
        load_config(path)


def test_missing_file_raises_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert "nowhere.toml" in str(info.value)


@pytest.mark.parametrize("form", ["mapping", "toml", "yaml", "json", "typed"])
def test_every_config_form_serves_requests(
    upstreams: Upstreams, gateway_factory: Callable[..., str], tmp_path: Path, form: str
) -> None:
    data = {
        "routes": [{"path": "/api/users", "upstream": "users", "strip_prefix": True}],
        "upstreams": {"users": {"servers": [{"url": upstreams.u2.url}]}},
    }
    source: Any
    if form == "mapping":
        source = data
    elif form == "typed":
        source = load_config(data)
    else:
        source = str(write_config(tmp_path, data, f".{form}"))
    url = gateway_factory(source)
    with http_client(url, timeout=10) as client:
        response = client.get("/api/users/7")
        assert response.status_code == 200
        assert response.json()["server"] == "u2"
        assert response.json()["raw_path"] == "/7"
        assert client.get("/local").text == "local"
