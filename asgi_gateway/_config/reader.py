"""Reading plain config data: a file's contents, and checked reads of each mapping in it."""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields
from typing import Any

from .._exceptions import ConfigError


def _read_file(path: str) -> Any:
    return _parse_file(path, _file_bytes(path))


def _file_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path!r}: {exc.strerror or exc}") from None


def _parse_file(path: str, raw: bytes) -> Any:
    """The plain data of a config file's contents `raw`, by the file's suffix."""
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".toml":
            import tomllib

            return tomllib.loads(raw.decode("utf-8"))
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:  # pragma: no cover - depends on the environment
                raise ConfigError(
                    "", f"{path!r} is YAML; install the 'yaml' extra: pip install 'asgi-gateway[yaml]'"
                ) from None
            return yaml.safe_load(raw)
        if suffix == ".json":
            return json.loads(raw)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError("", f"cannot parse config file {path!r}: {exc}") from None
    raise ConfigError("", f"config file {path!r} must end in .toml, .yaml, .yml or .json")


class _Errors:
    """Collects every error of one config, so that a single `ConfigError` names them all.

    An error at a key path inside or around one already reported is dropped: it follows from
    the first (a server list that is not a list has no servers; an upstream that is not a
    mapping has no `servers` key), and a user fixing the first would never see it.
    """

    __slots__ = ("found",)

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        if not self.reported(path):
            self.found.append((path, message))

    def reported(self, path: str) -> bool:
        """True if an error was reported at `path`, at a key around it or at one inside it."""
        return any(_nested(seen, path) or _nested(path, seen) for seen, _ in self.found)

    def raise_any(self) -> None:
        if self.found:
            first, *more = self.found
            raise ConfigError(*first, *more)


def _nested(outer: str, inner: str) -> bool:
    """True if key path `inner` is `outer` or lies inside it (`a.b` in `a`, `a[0]` in `a`)."""
    return inner.startswith(outer) and (len(inner) == len(outer) or inner[len(outer)] in ".[")


class _Reader:
    """Reads one mapping, checking types and refusing unknown keys.

    A bad value is reported to `errors` and read as the default, so that the rest of the
    config is still checked; what was read is thrown away if any error was reported.
    """

    def __init__(
        self, data: Any, path: str, allowed: Sequence[str], errors: _Errors, model: type | None = None
    ) -> None:
        self.errors = errors
        self.path = path
        #: The defaults of the keys, from the fields of the model they are read into: written
        #: once, there.
        self.defaults = _defaults(model) if model is not None else {}
        if not isinstance(data, Mapping):
            errors.add(path or "config", f"{data!r} is not a mapping")
            data = {}
        for key in data:
            if key not in allowed:
                errors.add(self.where(str(key)), f"unknown key (allowed: {', '.join(allowed)})")
        self.data: Mapping[Any, Any] = data

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def section(
        self, key: str, allowed: Sequence[str], model: type, *, on_by_default: bool = False
    ) -> _Reader | None:
        """The reader of an optional section (omitted: `on_by_default`; null/false: off; true:
        on with its defaults), or None when it is off."""
        enabled, data = _optional_section(self, key, on_by_default)
        if not enabled:
            return None
        return _Reader(data, self.where(key), allowed, self.errors, model)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def default(self, key: str) -> Any:
        return self.defaults[key]

    def boolean(self, key: str) -> Any:
        if key not in self.data:
            return self.defaults[key]
        value = self.data[key]
        if not isinstance(value, bool):
            self.errors.add(self.where(key), f"{value!r} is not true or false")
            return self.defaults[key]
        return value

    def string(self, key: str, *, required: bool = False) -> str | None:
        default = None if required else self.defaults[key]
        if key not in self.data:
            if required:
                self.errors.add(self.where(key), "is required")
            return default
        value = self.data[key]
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            self.errors.add(self.where(key), f"{value!r} is not a non-empty string")
            return default
        return value

    def number(self, key: str, *, minimum: float = 0.0, strict: bool = True, required: bool = False) -> float:
        # A required key has no default; only ever returned for an error, which throws the
        # whole config away.
        default = 1.0 if required else self.defaults[key]
        if required and key not in self.data:
            self.errors.add(self.where(key), "is required")
            return default
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.errors.add(self.where(key), f"{value!r} is not a number")
            return float(default)
        if value < minimum or (strict and value == minimum):
            bound = "greater than" if strict else "at least"
            self.errors.add(self.where(key), f"{value!r} must be {bound} {minimum:g}")
            return float(default)
        return float(value)

    def integer(self, key: str, *, minimum: int = 1) -> int:
        # A size limit's default may be INHERIT; only ever returned for a bad value, which
        # throws the whole config away.
        default: int = self.defaults[key] if isinstance(self.defaults[key], int) else minimum
        value = self.data.get(key, self.defaults[key])
        if isinstance(value, bool) or not isinstance(value, int):
            self.errors.add(self.where(key), f"{value!r} is not an integer")
            return default
        if value < minimum:
            self.errors.add(self.where(key), f"{value!r} must be at least {minimum}")
            return default
        return value


@functools.cache
def _defaults(model: type) -> dict[str, Any]:
    """The default of every field of a config dataclass that has one."""
    defaults: dict[str, Any] = {}
    for spec in fields(model):
        if spec.default is not MISSING:
            defaults[spec.name] = spec.default
        elif spec.default_factory is not MISSING:
            defaults[spec.name] = spec.default_factory()
    return defaults


def _optional_section(reader: _Reader, key: str, on_by_default: bool) -> tuple[bool, Any]:
    """(enabled, mapping) for a section that may be omitted, null/false (off) or a mapping."""
    if not reader.has(key):
        return on_by_default, {}
    value = reader.raw(key)
    if value is None or value is False:
        return False, {}
    if value is True:
        return True, {}
    return True, value
