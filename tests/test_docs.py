"""The configuration reference (docs/configuration.md) and the loader cannot drift apart.

The keys the loader accepts are read from the loader itself: a config with every section
switched on is generated from the config dataclasses and loaded, and each `_Reader` the
loader opens on the way reports the keys it allows. The reference page documents each key
under a heading of its own, `### `upstreams.<name>.retry.attempts``, with its default as a
`- **Default:** `value`` line.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from asgi_gateway import _config

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

#: Dataclass fields that are not keys of the mapping form: an upstream's name is its key.
NOT_KEYS = {"upstreams.<name>.name"}
#: Values for the required keys, so that the generated config loads.
REQUIRED_VALUES: dict[str, Any] = {
    "routes[].path": "/",
    "routes[].upstream": "<name>",
    "upstreams.<name>.servers[].url": "http://127.0.0.1:8000",
    "routes[].rate_limit.rate": 10,
    "routes[].rewrite.pattern": "^/old/",
    "routes[].rewrite.replacement": "/new/",
}
#: Values for keys that have a default but of which one must be set (a JWT's key source).
ONE_OF_VALUES: dict[str, Any] = {"routes[].auth.jwt.jwks_url": "http://127.0.0.1:8000/jwks.json"}

_HEADING = re.compile(r"^###\s+`([^`]+)`", re.MULTILINE)
_DEFAULT = re.compile(r"^- \*\*Default:\*\*\s*(.*)$")


@dataclasses.dataclass
class _Field:
    owner: type[Any]
    field: dataclasses.Field[Any]
    #: The nested config dataclass, and how it is held: "" (itself), "[]" (a list), "map" (by name).
    nested: type[Any] | None
    container: str


def _nested(hint: Any) -> tuple[type[Any] | None, str]:
    """The config dataclass inside a field's type, if any, and how it is contained."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint, ""
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            found = _nested(arg)
            if found[0] is not None:
                return found
        return None, ""
    if origin is tuple and args and dataclasses.is_dataclass(args[0]):
        return args[0], "[]"
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping) and len(args) == 2:
        inner, _ = _nested(args[1])
        return (inner, "map") if inner is not None else (None, "")
    return None, ""


def _walk(cls: type[Any], prefix: str = "") -> Iterator[tuple[str, _Field]]:
    """(dotted key, field) for every field of `cls` and of the config dataclasses it holds."""
    hints = typing.get_type_hints(cls, vars(_config))
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if key in NOT_KEYS:
            continue
        nested, container = _nested(hints[f.name])
        yield key, _Field(cls, f, nested, container)
        if nested is not None:
            child = {"": f"{key}.", "[]": f"{key}[].", "map": f"{key}.<name>."}[container]
            yield from _walk(nested, child)


def _sample(cls: type[Any], prefix: str = "") -> dict[str, Any]:
    """A mapping for `cls` with every nested section present (so switched on)."""
    hints = typing.get_type_hints(cls, vars(_config))
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if key in NOT_KEYS:
            continue
        nested, container = _nested(hints[f.name])
        if nested is not None:
            if container == "[]":
                out[f.name] = [_sample(nested, f"{key}[].")]
            elif container == "map":
                out[f.name] = {"<name>": _sample(nested, f"{key}.<name>.")}
            else:
                out[f.name] = _sample(nested, f"{key}.")
        elif key in ONE_OF_VALUES:
            out[f.name] = ONE_OF_VALUES[key]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert key in REQUIRED_VALUES, f"{key} is required: give it a value in REQUIRED_VALUES"
            out[f.name] = REQUIRED_VALUES[key]
    return out


def accepted_keys() -> set[str]:
    """Every key path the loader accepts, as reported by the loader's own readers."""
    seen: list[tuple[str, tuple[str, ...]]] = []
    original = _config._Reader.__init__

    def recording(self: Any, data: Any, path: str, allowed: Any, *args: Any, **kwargs: Any) -> None:
        seen.append((path, tuple(allowed)))
        original(self, data, path, allowed, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_config._Reader, "__init__", recording)
        _config.load_config(_sample(_config.GatewayConfig))
    assert any(path == "" for path, _ in seen), "the loader no longer reads the top level with _Reader"
    keys = set()
    for path, allowed in seen:
        section = re.sub(r"\[\d+\]", "[]", path)
        keys.update(f"{section}.{key}" if section else key for key in allowed)
    return keys


def documented() -> dict[str, str | None]:
    """Each key the reference documents, with the text of its Default line."""
    text = REFERENCE.read_text(encoding="utf-8")
    keys: dict[str, str | None] = {}
    for match in _HEADING.finditer(text):
        key = match.group(1)
        assert key not in keys, f"{key} is documented twice"
        body = text[match.end() : text.find("\n#", match.end())]
        default = next((m.group(1) for line in body.splitlines() if (m := _DEFAULT.match(line))), None)
        keys[key] = default
    return keys


def test_the_generated_config_switches_every_section_on() -> None:
    # Otherwise the loader's readers for a section would never run, and its keys go unseen.
    config = _config.load_config(_sample(_config.GatewayConfig))
    upstream = config.upstreams["<name>"]
    assert upstream.health_check is not None and upstream.outlier_detection is not None
    assert len(config.routes) == 1 and len(upstream.servers) == 1


def test_every_accepted_key_is_documented_and_every_documented_key_is_accepted() -> None:
    accepted = accepted_keys()
    docs = set(documented())
    assert not accepted - docs, (
        f"keys the loader accepts, missing from {REFERENCE.name}: {sorted(accepted - docs)}"
    )
    assert not docs - accepted, (
        f"keys {REFERENCE.name} documents that the loader refuses: {sorted(docs - accepted)}"
    )


def test_every_field_of_the_config_objects_is_a_key_the_loader_accepts() -> None:
    # The typed objects and the mapping form have the same keys.
    accepted = accepted_keys()
    fields = {key for key, _ in _walk(_config.GatewayConfig)}
    assert not fields - accepted, f"config fields the loader does not accept: {sorted(fields - accepted)}"


def test_every_key_documents_its_default() -> None:
    missing = [key for key, default in documented().items() if not default]
    assert not missing, f"keys without a '- **Default:**' line: {missing}"


def test_documented_defaults_are_the_defaults() -> None:
    docs = documented()
    checked = 0
    for key, info in _walk(_config.GatewayConfig):
        default = docs.get(key)
        field = info.field
        if default is None or field.default is dataclasses.MISSING or field.default is _config.INHERIT:
            continue
        if info.nested is not None and field.default is not None:
            continue
        literal = re.fullmatch(r"`([^`]*)`", default.strip())
        assert literal, f"{key}: the default {field.default!r} is written as {default!r}, not as `value`"
        value = yaml.safe_load(literal.group(1))
        expected = list(field.default) if isinstance(field.default, tuple) else field.default
        assert value == expected, f"{key}: documented default {value!r}, the code's is {field.default!r}"
        checked += 1
    assert checked >= 30


def test_the_reference_example_is_a_valid_config_with_every_key() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    block = re.search(r"## A complete example\n.*?```yaml\n(.*?)```", text, re.DOTALL)
    assert block, "the reference's complete example is missing"
    data = yaml.safe_load(block.group(1))
    config = _config.load_config(data)
    assert config.routes and config.upstreams

    def paths(value: Any, prefix: str) -> Iterator[str]:
        if isinstance(value, Mapping):
            for key, item in value.items():
                name = "<name>" if prefix == "upstreams." else key
                yield f"{prefix}{name}"
                yield from paths(item, f"{prefix}{name}.")
        elif isinstance(value, list) and value and isinstance(value[0], Mapping):
            for item in value:
                yield from paths(item, f"{prefix.rstrip('.')}[].")

    assert set(paths(data, "")) - {"upstreams.<name>"} == accepted_keys()


def test_the_api_reference_shows_every_public_name() -> None:
    import asgi_gateway

    page = (REFERENCE.parent / "reference" / "api.md").read_text(encoding="utf-8")
    shown = set(re.findall(r"^::: asgi_gateway\.(\w+)$", page, re.MULTILINE))
    public = set(asgi_gateway.__all__)
    assert not public - shown, f"public names missing from docs/reference/api.md: {sorted(public - shown)}"
    assert not shown - public, (
        f"docs/reference/api.md shows names that are not public: {sorted(shown - public)}"
    )
