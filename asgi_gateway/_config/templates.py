"""Header rule values and rewrite replacements, parsed into their parts."""

from __future__ import annotations

import re
from typing import Final

from .models import RewriteConfig

#: Variables a header rule's value may hold; `server` only on the way back (it is chosen
#: after the request's headers are final, once per try).
HEADER_VARIABLES: Final = ("client_ip", "request_id", "route", "upstream", "server")
_TEMPLATE_PART = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_CLAIM_NAME = re.compile(r"^[^\s{}]+$")


def header_template(value: str) -> tuple[str | tuple[str, str], ...]:
    """A header rule's value as its parts: literal text, or `(kind, name)` for a variable.

    `kind` is `var` (`{client_ip}`, ...) or `claim` (`{claim:NAME}`). Raises ValueError
    naming what is wrong.
    """
    parts: list[str | tuple[str, str]] = []
    literal: list[str] = []
    pos = 0
    for match in _TEMPLATE_PART.finditer(value):
        literal.append(value[pos : match.start()])
        pos = match.end()
        text = match.group(0)
        if text in ("{{", "}}"):
            literal.append(text[0])
            continue
        name = match.group(1)
        if name is None:
            raise ValueError(f"{text!r} without its pair (write {text * 2!r} for a literal {text!r})")
        if name.startswith("claim:") and _CLAIM_NAME.match(name[6:]):
            variable = ("claim", name[6:])
        elif name in HEADER_VARIABLES:
            variable = ("var", name)
        else:
            raise ValueError(
                f"{{{name}}} is not a variable ({', '.join('{' + v + '}' for v in HEADER_VARIABLES)},"
                " {claim:NAME})"
            )
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(variable)
    literal.append(value[pos:])
    if "".join(literal):
        parts.append("".join(literal))
    return tuple(parts)


_GROUP_REFERENCE = re.compile(r"\$(?:(\$)|(\d+)|\{(\w+)\}|)")


def rewrite_template(replacement: str, pattern: re.Pattern[bytes]) -> tuple[bytes | int | str, ...]:
    """A rewrite's replacement as its parts: literal bytes, or a group's number or name.

    Raises ValueError naming a reference the pattern has no group for.
    """
    parts: list[bytes | int | str] = []
    literal = bytearray()
    pos = 0
    for match in _GROUP_REFERENCE.finditer(replacement):
        literal += replacement[pos : match.start()].encode("ascii")
        pos = match.end()
        dollar, number, name = match.groups()
        if dollar:
            literal += b"$"
            continue
        if number is None and name is None:
            raise ValueError("'$' that names no group (write '$$' for a literal '$')")
        group: int | str
        if name is not None and not name.isdigit():
            if name not in pattern.groupindex:
                raise ValueError(f"${{{name}}}: the pattern has no group of that name")
            group = name
        else:
            group = int(number or name)
            if group > pattern.groups:
                raise ValueError(f"${group}: the pattern has {pattern.groups} group(s)")
        if literal:
            parts.append(bytes(literal))
            literal = bytearray()
        parts.append(group)
    literal += replacement[pos:].encode("ascii")
    if literal:
        parts.append(bytes(literal))
    return tuple(parts)


def compile_rewrite(rewrite: RewriteConfig) -> tuple[re.Pattern[bytes], tuple[bytes | int | str, ...]]:
    """The rewrite's compiled pattern and replacement; ValueError (with `.key`) when invalid."""
    if not isinstance(rewrite.pattern, str) or not rewrite.pattern.isascii():
        raise _KeyedError("pattern", "must be ASCII (write other characters percent-encoded)")
    try:
        pattern = re.compile(rewrite.pattern.encode("ascii"))
    except re.error as exc:
        raise _KeyedError(
            "pattern", f"{rewrite.pattern!r} is not a valid regular expression: {exc}"
        ) from None
    if not isinstance(rewrite.replacement, str) or not rewrite.replacement.isascii():
        raise _KeyedError("replacement", "must be ASCII (write other characters percent-encoded)")
    try:
        return pattern, rewrite_template(rewrite.replacement, pattern)
    except ValueError as exc:
        raise _KeyedError("replacement", f"{rewrite.replacement!r}: {exc}") from None


class _KeyedError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
