"""RFC 7239 `Forwarded`: a strict parser for a chain, and the element the gateway adds to it.

    Forwarded         = 1#forwarded-element
    forwarded-element = [ forwarded-pair ] *( ";" [ forwarded-pair ] )
    forwarded-pair    = token "=" value
    value             = token / quoted-string

`for` and `by` hold a node (section 6): an IPv4 address, a bracketed IPv6 address, `unknown` or
an obfuscated identifier (`_` and letters, digits, `.`, `_`, `-`), with an optional port or
obfuscated port; `proto` a URI scheme; `host` a Host header value. A parameter appears at most
once per element (section 5). Whitespace is allowed around the commas only.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

__all__ = ["forwarded_element", "parse_forwarded"]

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_PAIR: Final = re.compile(rb"(" + _TOKEN + rb")=(" + _TOKEN + rb"|" + _QUOTED + rb")")
_OWS: Final = re.compile(rb"[ \t]*")
_QUOTED_PAIR: Final = re.compile(rb"\\(.)", re.DOTALL)
_OBFUSCATED: Final = re.compile(rb"_[A-Za-z0-9._-]+")
_PORT: Final = re.compile(rb"[0-9]{1,5}|_[A-Za-z0-9._-]+")
_SCHEME: Final = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*")
# uri-host [ ":" port ] (RFC 9110 7.2): a reg-name, an IPv4 address or an IP literal.
_HOST: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?")
_TCHAR: Final = frozenset(b"!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-")


def parse_forwarded(value: bytes) -> list[dict[bytes, bytes]] | None:
    """The elements of a `Forwarded` header value, each a mapping of lower-case parameter
    names to their (unquoted) values; None when the value does not follow the grammar.

    Empty list elements are skipped, as RFC 9110 5.6.1 asks of recipients; a value with no
    parameter at all is malformed.
    """
    elements: list[dict[bytes, bytes]] = []
    pos = 0
    end = len(value)
    element: dict[bytes, bytes] = {}
    pos = _OWS.match(value, pos).end()  # type: ignore[union-attr]  # matches the empty string
    while True:
        pair = _PAIR.match(value, pos)
        if pair is not None:
            name = pair.group(1).lower()
            raw = pair.group(2)
            text = _QUOTED_PAIR.sub(rb"\1", raw[1:-1]) if raw[:1] == b'"' else raw
            if name in element or not _valid(name, text):
                return None
            element[name] = text
            pos = pair.end()
        if pos == end:
            break
        separator = value[pos : pos + 1]
        if separator == b";":
            pos += 1
            continue
        # A comma, with whitespace around it, ends the element.
        after = _OWS.match(value, pos).end()  # type: ignore[union-attr]
        if after == end:
            break
        if value[after : after + 1] != b",":
            return None
        if element:
            elements.append(element)
        element = {}
        pos = _OWS.match(value, after + 1).end()  # type: ignore[union-attr]
        if pos == end:
            break
    if element:
        elements.append(element)
    return elements or None


def _valid(name: bytes, value: bytes) -> bool:
    if name in (b"for", b"by"):
        return _valid_node(value)
    if name == b"proto":
        return _SCHEME.fullmatch(value) is not None
    if name == b"host":
        return bool(value) and _HOST.fullmatch(value) is not None
    return True


def _valid_node(node: bytes) -> bool:
    if node.startswith(b"["):
        close = node.find(b"]")
        if close < 0:
            return False
        address, rest = node[1:close], node[close + 1 :]
        try:
            ipaddress.IPv6Address(address.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return False
    else:
        address, colon, port = node.partition(b":")
        rest = colon + port
        if address != b"unknown" and _OBFUSCATED.fullmatch(address) is None:
            try:
                ipaddress.IPv4Address(address.decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                return False
    if not rest:
        return True
    return rest[:1] == b":" and _PORT.fullmatch(rest[1:]) is not None


def forwarded_element(peer: str | None, proto: str, host: bytes | None) -> bytes:
    """`for=...;proto=...;host=...` for a request from `peer` (not an IP address: `unknown`).

    An IPv6 address is bracketed and quoted; a host that is not a token is quoted, and left
    out when it is no Host value at all.
    """
    try:
        address = ipaddress.ip_address(peer or "")
    except ValueError:
        # No address (a Unix socket, a test client's name): RFC 7239 6.2's "unknown".
        node = b"unknown"
    else:
        node = str(address).encode()
        if address.version == 6:
            node = b'"[' + node + b']"'
    element = b"for=" + node
    if _SCHEME.fullmatch(proto.encode("ascii", "replace")) is not None:
        element += b";proto=" + proto.encode()
    if host and _HOST.fullmatch(host) is not None:
        element += b";host=" + (host if all(c in _TCHAR for c in host) else b'"' + host + b'"')
    return element
