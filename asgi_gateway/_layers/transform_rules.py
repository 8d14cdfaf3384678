"""What the transformation layer does to headers, compiled once per route: the header rules
and their variables, `Location` and `Set-Cookie` rewriting, and the RFC 7239 `Forwarded`
element. The layer itself (its order, its hooks) is in `transform`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Final
from urllib.parse import urlsplit

from .._config import GatewayConfig, HeaderRulesConfig, RouteConfig, header_template
from .._edge.jwt import claim_header_value
from .._exceptions import ConfigError
from .._forwarded import forwarded_element, parse_forwarded
from .._types import Exchange, Headers

__all__ = [
    "HeaderRules",
    "client_facing",
    "rewrite_cookie",
    "rewrite_location",
    "upstream_origins",
    "with_forwarded",
]

logger = logging.getLogger("asgi_gateway")

# -- header rules -------------------------------------------------------------------------

#: A compiled value's part: literal bytes, or a variable's value read from the exchange.
_Part = bytes | Callable[[Exchange], bytes | None]


class HeaderRules:
    """One direction's header rules, compiled: the names to drop, then the headers to add.

    `request` may change the list it is given (the gateway's own, made for this request);
    `response` never does: a response's list may be a hook's, which it may use again.
    """

    __slots__ = ("_fixed_list", "drop", "dynamic", "fixed")

    def __init__(self, rules: HeaderRulesConfig, route: RouteConfig, where: str) -> None:
        constants = {"route": route.path, "upstream": route.upstream}
        self.drop = frozenset(name.lower().encode("ascii") for name in (*rules.remove, *rules.set))
        fixed: list[tuple[bytes, bytes]] = []
        dynamic: list[tuple[bytes, tuple[_Part, ...] | Callable[[Exchange], bytes | None]]] = []
        for kind in ("set", "add"):
            for name, value in getattr(rules, kind).items():
                header = name.lower().encode("ascii")
                parts = _compile_value(value, constants, f"{where}.{kind}.{name}")
                # Adjacent literals are merged: more than one part means a variable among them.
                first = parts[0] if parts else b""
                if len(parts) > 1:
                    dynamic.append((header, parts))
                elif isinstance(first, bytes):
                    fixed.append((header, first))
                else:
                    dynamic.append((header, first))
        self.fixed = tuple(fixed)
        self._fixed_list = fixed
        self.dynamic = tuple(dynamic)

    def request(self, headers: Headers, exchange: Exchange) -> Headers:
        drop = self.drop
        if drop:
            for name, _ in headers:
                if name in drop:
                    # Only a request that has one of them pays for a new list.
                    headers = [pair for pair in headers if pair[0] not in drop]
                    break
        headers.extend(self.fixed)
        if self.dynamic:
            self._add_dynamic(headers, exchange)
        return headers

    def response(self, headers: Headers, exchange: Exchange) -> Headers:
        drop = self.drop
        if drop:
            # A response usually has the headers a rule removes (Server, X-Powered-By): the
            # new list is made in the pass that looks for them.
            out = []
            for pair in headers:
                if pair[0] not in drop:
                    out.append(pair)
            out.extend(self.fixed)
        else:
            out = headers + self._fixed_list
        if self.dynamic:
            self._add_dynamic(out, exchange)
        return out

    def _add_dynamic(self, headers: Headers, exchange: Exchange) -> None:
        for name, parts in self.dynamic:
            # A value that is one variable alone (the usual) needs no joining.
            value = parts(exchange) if callable(parts) else _render(parts, exchange)
            if value is not None:
                headers.append((name, value))


def _compile_value(value: str, constants: Mapping[str, str], where: str) -> tuple[_Part, ...]:
    parts: list[_Part] = []
    for item in header_template(value):
        piece: _Part
        if isinstance(item, str):
            piece = item.encode("ascii")
        elif item[0] == "var" and item[1] in constants:
            # Known for the whole route: written in now.
            piece = constants[item[1]].encode("utf-8")
            if any(c < 0x20 or c == 0x7F for c in piece):
                raise ConfigError(where, f"{{{item[1]}}} is {constants[item[1]]!r}: not a header value")
        else:
            piece = _claim(item[1]) if item[0] == "claim" else _VARIABLES[item[1]]
        last = parts[-1] if parts else None
        if isinstance(piece, bytes) and isinstance(last, bytes):
            parts[-1] = last + piece
        else:
            parts.append(piece)
    return tuple(parts)


def _render(parts: tuple[_Part, ...], exchange: Exchange) -> bytes | None:
    """The value for this exchange; None when a variable has no value (the header is not sent)."""
    out = []
    for part in parts:
        if type(part) is bytes:
            out.append(part)
            continue
        value = part(exchange)  # type: ignore[operator]
        if value is None:
            return None
        out.append(value)
    return b"".join(out)


def _client_ip(exchange: Exchange) -> bytes | None:
    return exchange.client_ip.encode("latin-1") if exchange.client_ip else None


def _request_id(exchange: Exchange) -> bytes | None:
    return exchange.request_id.encode("ascii")


def _server(exchange: Exchange) -> bytes | None:
    return exchange.server.url.encode("ascii") if exchange.server is not None else None


def _claim(name: str) -> Callable[[Exchange], bytes | None]:
    def claim(exchange: Exchange) -> bytes | None:
        claims = exchange.claims
        return claim_header_value(claims[name]) if claims is not None and name in claims else None

    return claim


_VARIABLES: Final[Mapping[str, Callable[[Exchange], bytes | None]]] = {
    "client_ip": _client_ip,
    "request_id": _request_id,
    "server": _server,
}


# -- redirects and cookies ------------------------------------------------------------------

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def upstream_origins(config: GatewayConfig, route: RouteConfig) -> tuple[frozenset[bytes], frozenset[bytes]]:
    """The upstream's servers as `scheme://host[:port]` (with and without a default port),
    and their host names, lower-case.
    """
    found: set[bytes] = set()
    hosts: set[bytes] = set()
    for server in config.upstreams[route.upstream].servers:
        parts = urlsplit(server.url)
        host = (parts.hostname or "").encode("idna")
        netloc = b"[" + host + b"]" if b":" in host else host
        scheme = parts.scheme.encode()
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
        found.add(scheme + b"://" + netloc + b":" + str(port).encode())
        if port == _DEFAULT_PORTS[parts.scheme]:
            found.add(scheme + b"://" + netloc)
        hosts.add(host)
    return frozenset(found), frozenset(hosts)


def client_facing(headers: Headers) -> tuple[bytes | None, bytes | None]:
    """(`proto://host`, host without port) of the URL the client used, as the gateway tells
    the upstream in X-Forwarded-Proto and X-Forwarded-Host (a trusted proxy's, or its own).
    """
    proto = host = None
    # The gateway's own are the last ones added: found from the end in a few steps.
    for name, value in reversed(headers):
        if name == b"x-forwarded-host" and host is None:
            host = value
        elif name == b"x-forwarded-proto" and proto is None:
            proto = value
        if proto is not None and host is not None:
            break
    if host is None or proto not in (b"http", b"https") or not host or any(c in host for c in b"/\\@ ,"):
        return None, None
    if host.startswith(b"["):
        bare = host[: host.find(b"]") + 1]
    else:
        bare = host.rsplit(b":", 1)[0]
    assert proto is not None
    return proto + b"://" + host, bare.lower()


def rewrite_location(
    value: bytes, origins: frozenset[bytes], prefix: bytes, client_origin: bytes | None
) -> bytes:
    if value[:1] == b"/" and value[1:2] not in (b"/", b"\\"):
        # An absolute path: relative to the upstream's root, which is `prefix` to the client.
        return prefix + value if prefix else value
    scheme_end = value.find(b"://")
    if scheme_end <= 0:
        return value
    end = len(value)
    for mark in (b"/", b"?", b"#"):
        found = value.find(mark, scheme_end + 3)
        if 0 <= found < end:
            end = found
    if value[:end].lower() not in origins:
        return value
    rest = value[end:]
    if rest[:1] != b"/":
        rest = b"/" + rest
    path = prefix + rest
    return client_origin + path if client_origin is not None else path


def rewrite_cookie(value: bytes, hosts: frozenset[bytes], prefix: bytes, client_host: bytes | None) -> bytes:
    attributes = value.split(b";")
    changed = False
    out = [attributes[0]]
    for attribute in attributes[1:]:
        name, _equals, text = attribute.partition(b"=")
        key = name.strip().lower()
        if key == b"path" and prefix and text.strip().startswith(b"/"):
            path = text.strip()
            attribute = b" Path=" + prefix + (b"" if path == b"/" else path)
            changed = True
        elif key == b"domain" and text.strip().lstrip(b".").lower() in hosts:
            changed = True
            if client_host is None:
                # The cookie is then the client-facing host's alone.
                continue
            attribute = b" Domain=" + client_host
        out.append(attribute)
    return b";".join(out) if changed else value


# -- Forwarded ------------------------------------------------------------------------------


def with_forwarded(headers: Headers, exchange: Exchange) -> Headers:
    """`headers` with the gateway's element added to a trusted proxy's `Forwarded` chain.

    The chain is only there when the peer is a trusted proxy (the gateway removes an untrusted
    client's); one that does not follow RFC 7239 is dropped, not passed on. The element
    describes the hop into the gateway, as RFC 7239 section 4 asks of each proxy: the peer it
    came from, the scheme of that connection and the Host it carried, all as `prepare` saw
    them. None of it is read back from the headers: a trusted proxy's X-Forwarded-Host names
    the host of the hop before, and its own element says so.
    """
    chain: list[bytes] | None = None
    for name, value in headers:
        if name == b"forwarded":
            if chain is None:
                chain = [value]
            else:
                chain.append(value)
    element = forwarded_element(exchange.peer, exchange.scheme, exchange.host)
    if chain is None:
        headers.append((b"forwarded", element))
        return headers
    kept = [pair for pair in headers if pair[0] != b"forwarded"]
    incoming = b", ".join(chain)
    if parse_forwarded(incoming) is not None:
        element = incoming + b", " + element
    else:
        logger.debug(
            "a trusted proxy's Forwarded header does not follow RFC 7239; dropped",
            extra={"request_id": exchange.request_id},
        )
    kept.append((b"forwarded", element))
    return kept
