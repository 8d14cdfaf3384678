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
    "trusted proxies not a list": (_set("trusted_proxies", "10.0.0.0/8"), "trusted_proxies", "'10.0.0.0/8'"),
    "upstreams not a mapping": (_set("upstreams", []), "upstreams", "[]"),
    "routes not a list": (_set("routes", {}), "routes", "{}"),
    "route not a mapping": (_set("routes/0", "/api"), "routes[0]", "'/api'"),
    "section not a mapping": (_set("upstreams/users/retry", 3), "upstreams.users.retry", "3"),
    "missing route path": (lambda data: data["routes"][0].pop("path"), "routes[0].path", "required"),
    "empty route upstream": (_set("routes/0/upstream", ""), "routes[0].upstream", "''"),
    "not a boolean": (_set("routes/0/strip_prefix", "yes"), "routes[0].strip_prefix", "'yes'"),
    "not a number": (
        _set("upstreams/users/timeouts/read", "slow"),
        "upstreams.users.timeouts.read",
        "'slow'",
    ),
    "not an integer": (_set("upstreams/users/retry/attempts", 2.5), "upstreams.users.retry.attempts", "2.5"),
    "attempts below 1": (_set("upstreams/users/retry/attempts", 0), "upstreams.users.retry.attempts", "0"),
    "route path without slash": (_set("routes/0/path", "api"), "routes[0].path", "'api'"),
    "route path with query": (_set("routes/0/path", "/api?x"), "routes[0].path", "'/api?x'"),
    "methods not a list": (_set("routes/0/methods", "GET"), "routes[0].methods", "'GET'"),
    "bad method": (_set("routes/0/methods", ["GET", "G ET"]), "routes[0].methods", "'G ET'"),
    "bad route host": (_set("routes/1/host", "a b"), "routes[1].host", "'a b'"),
    "negative route max_body_size": (_set("routes/0/max_body_size", -5), "routes[0].max_body_size", "-5"),
    "servers not a list": (
        _set("upstreams/users/servers", "http://a"),
        "upstreams.users.servers",
        "'http://a'",
    ),
    "no servers": (_set("upstreams/users/servers", []), "upstreams.users.servers", "[]"),
    "url with path": (
        _set("upstreams/users/servers/0/url", "http://a/api"),
        "upstreams.users.servers[0].url",
        "'http://a/api'",
    ),
    "url with port 0": (
        _set("upstreams/users/servers/0/url", "http://a:0"),
        "upstreams.users.servers[0].url",
        "'http://a:0'",
    ),
    "bad hash_on": (_set("upstreams/users/hash_on", "body"), "upstreams.users.hash_on", "'body'"),
    "consistent_hash without hash_on": (
        _set("upstreams/users/balancer", "consistent_hash"),
        "upstreams.users.hash_on",
        "consistent_hash",
    ),
    "retry_on not a list": (
        _set("upstreams/users/retry/retry_on", "reset"),
        "upstreams.users.retry.retry_on",
        "'reset'",
    ),
    "bad retry condition": (
        _set("upstreams/users/retry/retry_on", ["reset", 404]),
        "upstreams.users.retry.retry_on[1]",
        "404",
    ),
    "backoff_max below backoff_base": (
        _set("upstreams/users/retry", {"backoff_base": 1.0, "backoff_max": 0.5}),
        "upstreams.users.retry.backoff_max",
        "0.5",
    ),
    "health check path without slash": (
        _set("upstreams/users/health_check", {"path": "healthz"}),
        "upstreams.users.health_check.path",
        "'healthz'",
    ),
    "zero health check interval": (
        _set("upstreams/users/health_check", {"interval": 0}),
        "upstreams.users.health_check.interval",
        "0",
    ),
    "max_ejection_percent over 100": (
        _set("upstreams/users/outlier_detection", {"max_ejection_percent": 150}),
        "upstreams.users.outlier_detection.max_ejection_percent",
        "150",
    ),
    "max_ejection_time below base_ejection_time": (
        _set("upstreams/users/outlier_detection", {"base_ejection_time": 60, "max_ejection_time": 10}),
        "upstreams.users.outlier_detection.max_ejection_time",
        "10",
    ),
    "zero max_concurrent_requests": (
        _set("upstreams/users/max_concurrent_requests", 0),
        "upstreams.users.max_concurrent_requests",
        "0",
    ),
    "status_path without slash": (_set("status_path", "status"), "status_path", "'status'"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_mapping_raises_config_error_naming_path_and_value(case: str) -> None:
    change, path, value = BAD_CONFIGS[case]
    with pytest.raises(ConfigError) as info:
        load_config(mutate(change))
    message = str(info.value)
    # One mistake, one error: nothing that only follows from it is reported too.
    assert len(info.value.errors) == 1, message
    assert info.value.path == path
    assert message.startswith(f"{path}: "), message
    assert value in message.removeprefix(f"{path}: "), message


def changes(*steps: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        for step in steps:
            step(data)

    return change


# Six mistakes across routes, upstreams, servers, retry, timeouts, health_check and trusted_proxies.
SIX_MISTAKES = changes(
    _set("routes/1/upstream", "nope"),
    _set("upstreams/users/servers/1/url", "htp://x"),
    _set("upstreams/users/retry/attempts", 0),
    _set("upstreams/users/timeouts/read", "slow"),
    _set("upstreams/misc/health_check", {"path": "/healthz", "interval": -1}),
    _set("trusted_proxies", ["10.0.0.0/8", "not-an-ip"]),
)
SIX_ERRORS = [
    ("routes[1].upstream", "'nope' is not a configured upstream (misc, users)"),
    ("upstreams.users.servers[1].url", "'htp://x' is not an http(s) URL"),
    ("upstreams.users.retry.attempts", "0 must be at least 1"),
    ("upstreams.users.timeouts.read", "'slow' is not a number"),
    ("upstreams.misc.health_check.interval", "-1 must be greater than 0"),
    ("trusted_proxies[1]", "'not-an-ip' is not an IP address or CIDR"),
]


@pytest.mark.parametrize("form", ["mapping", ".toml", ".yaml", ".json"])
def test_every_error_is_reported_in_one_config_error(tmp_path: Path, form: str) -> None:
    data = mutate(SIX_MISTAKES)
    with pytest.raises(ConfigError) as info:
        load_config(data if form == "mapping" else write_config(tmp_path, data, form))
    error = info.value
    assert sorted(error.errors) == sorted(SIX_ERRORS)
    assert len(error.errors) == len(SIX_ERRORS)
    # One line per error, in the order of `errors`; `path` is the first one's.
    assert str(error).splitlines() == [f"{path}: {message}" for path, message in error.errors]
    assert error.path == error.errors[0][0]
    assert isinstance(error, ValueError)


def test_every_bad_item_of_a_list_is_reported() -> None:
    data = mutate(
        changes(
            _set("upstreams/users/retry/retry_on", ["reset", 404, "timeout", "sometimes"]),
            _set("trusted_proxies", ["x", "10.0.0.0/8", "y"]),
            _set(
                "upstreams/users/servers", ["htp://a", {"url": "http://b", "weight": 0}, {"url": "ftp://c"}]
            ),
        )
    )
    with pytest.raises(ConfigError) as info:
        load_config(data)
    assert [path for path, _ in info.value.errors] == [
        "upstreams.users.servers[1].weight",
        "upstreams.users.servers[0].url",
        "upstreams.users.servers[2].url",
        "upstreams.users.retry.retry_on[1]",
        "upstreams.users.retry.retry_on[3]",
        "trusted_proxies[0]",
        "trusted_proxies[2]",
    ]


# (mutation, the only errors expected): what merely follows from an error is not reported again.
CONSEQUENCES = {
    "servers not a list: no 'at least one server'": (
        _set("upstreams/users/servers", {"url": "http://a"}),
        [("upstreams.users.servers", "{'url': 'http://a'} must be a non-empty list")],
    ),
    "server not a mapping: no 'url is required'": (
        _set("upstreams/users/servers/0", 7),
        [("upstreams.users.servers[0]", "7 is not a mapping")],
    ),
    "missing url: no 'not an http(s) URL'": (
        _set("upstreams/users/servers/0", {"weight": 2}),
        [("upstreams.users.servers[0].url", "is required")],
    ),
    "upstream not a mapping: its routes still name it": (
        _set("upstreams/users", ["http://a"]),
        [("upstreams.users", "['http://a'] is not a mapping")],
    ),
    "no upstreams: routes are not checked against nothing": (
        lambda data: data.pop("upstreams"),
        [("upstreams", "None must be a non-empty mapping of upstream names")],
    ),
    "route not a mapping: no 'path is required'": (
        _set("routes/1", ["/api", "misc"]),
        [("routes[1]", "['/api', 'misc'] is not a mapping")],
    ),
    "bad hash_on type: no 'required for consistent_hash'": (
        changes(_set("upstreams/users/balancer", "consistent_hash"), _set("upstreams/users/hash_on", 5)),
        [("upstreams.users.hash_on", "5 is not a non-empty string")],
    ),
    "bad backoff_base: backoff_max is not compared with the default": (
        _set("upstreams/users/retry", {"backoff_base": "fast", "backoff_max": 0.01}),
        [("upstreams.users.retry.backoff_base", "'fast' is not a number")],
    ),
    "bad base_ejection_time: max_ejection_time is not compared with the default": (
        _set("upstreams/users/outlier_detection", {"base_ejection_time": -1, "max_ejection_time": 10}),
        [("upstreams.users.outlier_detection.base_ejection_time", "-1 must be greater than 0")],
    ),
}


@pytest.mark.parametrize("case", list(CONSEQUENCES))
def test_errors_that_follow_from_an_earlier_one_are_not_reported(case: str) -> None:
    change, expected = CONSEQUENCES[case]
    with pytest.raises(ConfigError) as info:
        load_config(mutate(change))
    assert list(info.value.errors) == expected


def test_cross_key_checks_run_beside_errors_in_values() -> None:
    data = mutate(
        changes(
            _set("upstreams/users/balancer", "consistent_hash"),
            _set("upstreams/users/timeouts/connect", True),
            _set("routes/0/upstream", "user"),
            _set("upstreams/misc/retry", {"backoff_base": 2, "backoff_max": 1, "attempts": "3"}),
        )
    )
    with pytest.raises(ConfigError) as info:
        load_config(data)
    assert sorted(info.value.errors) == [
        ("routes[0].upstream", "'user' is not a configured upstream (misc, users)"),
        ("upstreams.misc.retry.attempts", "'3' is not an integer"),
        ("upstreams.misc.retry.backoff_max", "1.0 is below backoff_base"),
        ("upstreams.users.hash_on", "is required when balancer is consistent_hash"),
        ("upstreams.users.timeouts.connect", "True is not a number"),
    ]


def test_unknown_keys_are_all_reported_and_the_known_ones_still_read() -> None:
    data = mutate(
        changes(
            _set("routes/0/pathh", "/x"),
            _set("upstreams/users/balancr", "random"),
            _set("upstreams/users/servers/0/weight", "heavy"),
            _set("bogus", 1),
        )
    )
    with pytest.raises(ConfigError) as info:
        load_config(data)
    assert sorted(path for path, _ in info.value.errors) == [
        "bogus",
        "routes[0].pathh",
        "upstreams.users.balancr",
        "upstreams.users.servers[0].weight",
    ]


def test_config_error_keeps_every_error_through_pickle() -> None:
    import pickle

    with pytest.raises(ConfigError) as info:
        load_config(mutate(SIX_MISTAKES))
    copied = pickle.loads(pickle.dumps(info.value))
    assert (type(copied), copied.errors, copied.path, str(copied)) == (
        ConfigError,
        info.value.errors,
        info.value.path,
        str(info.value),
    )


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


def test_typed_objects_report_every_error() -> None:
    with pytest.raises(ConfigError) as info:
        GatewayConfig(
            routes=(RouteConfig(path="api", upstream="users"), RouteConfig(path="/b", upstream="nope")),
            upstreams={
                "users": UpstreamConfig(
                    name="users",
                    servers=(ServerConfig(url="htp://x"), ServerConfig(url="http://a", weight=0)),
                    timeouts=TimeoutsConfig(total=0),
                )
            },
            status_path="status",
        )
    assert info.value.errors == (
        ("routes[0].path", "'api' must start with '/'"),
        ("routes[1].upstream", "'nope' is not a configured upstream (users)"),
        ("upstreams.users.servers[0].url", "'htp://x' is not an http(s) URL"),
        ("upstreams.users.servers[1].weight", "0 must be a positive integer"),
        ("upstreams.users.timeouts.total", "0 must be positive"),
        ("status_path", "'status' must start with '/'"),
    )


def test_typed_config_without_upstreams_is_one_error() -> None:
    with pytest.raises(ConfigError) as info:
        GatewayConfig(routes=(RouteConfig(path="/api", upstream="users"),), upstreams={})
    assert info.value.errors == (("upstreams", "at least one upstream is required"),)


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
    with pytest.raises(ConfigError) as info:
        load_config(path)
    # A file that cannot be read as a mapping is one error: there is nothing to check further.
    assert len(info.value.errors) == 1


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


def test_max_message_size_is_its_own_limit_inherited_by_routes() -> None:
    from asgi_gateway._routing import Router

    def limits(data: dict[str, Any]) -> list[int | None]:
        config = load_config(data)
        return [route.max_message_size for route in Router(config).routes]

    data = base()
    data["routes"][1]["max_message_size"] = None
    # 1 MiB by default, whatever max_body_size says (2048 in base()); null on a route: no limit.
    assert limits(data) == [1024 * 1024, None]
    data["max_message_size"] = 4096
    data["routes"][0]["max_message_size"] = 512
    assert limits(data) == [512, None]
    del data["routes"][0]["max_message_size"]
    assert limits(data) == [4096, None]
    data["max_message_size"] = None
    assert load_config(data).max_message_size is None
    assert [route.max_body_size for route in Router(load_config(data)).routes] == [2048, 2048]


@pytest.mark.parametrize(
    ("key_path", "value", "where"),
    [
        ("max_message_size", -1, "max_message_size"),
        ("max_message_size", "1MiB", "max_message_size"),
        ("routes/0/max_message_size", -5, "routes[0].max_message_size"),
        ("routes/1/max_message_size", 1.5, "routes[1].max_message_size"),
    ],
)
def test_bad_max_message_size_is_reported_with_its_key_path(key_path: str, value: Any, where: str) -> None:
    data = base()
    _set(key_path, value)(data)
    with pytest.raises(ConfigError) as info:
        load_config(data)
    assert f"{where}: {value!r}" in str(info.value)


def test_typed_max_message_size_is_validated() -> None:
    config = load_config(base())
    with pytest.raises(ConfigError, match="max_message_size"):
        GatewayConfig(routes=config.routes, upstreams=config.upstreams, max_message_size=-1)
    route = RouteConfig(path="/x", upstream="users", max_message_size=-2)
    with pytest.raises(ConfigError, match=r"routes\[0\]\.max_message_size"):
        GatewayConfig(routes=(route,), upstreams=config.upstreams)


def test_header_rules_may_not_name_a_header_the_relay_replaces() -> None:
    # The relay drops or rewrites these itself; a rule on them would silently do nothing.
    from asgi_gateway import _proxy
    from asgi_gateway._config import validation_route as validation

    assert {name.decode() for name in _proxy.HOP_BY_HOP} == validation._HOP_BY_HOP
    assert {name.decode() for name in _proxy._REPLACED_UP} <= validation._RULE_RESERVED_UP
    assert {name.decode() for name in _proxy._REPLACED_DOWN} <= validation._RULE_RESERVED_DOWN
