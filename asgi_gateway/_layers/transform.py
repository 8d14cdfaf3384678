"""The transformation layer: a route's header rules, redirect and cookie rewriting, RFC 7239
`Forwarded`, and its Python hooks.

On the way up, in this order: `Forwarded` is added, the `request_headers` rules run, then the
`on_request` hook. On the way back: the `on_response` hook, then `Location`/`Set-Cookie`
rewriting and the `response_headers` rules. So a hook sees the request as the rules left it,
and an answer a hook makes itself still gets the route's response rules. Everything is
compiled when the gateway is built; a route that configures none of it has no such layer.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

from .._config import GatewayConfig, HeaderRulesConfig, RouteConfig, _Inherit, header_template
from .._edge.jwt import claim_header_value
from .._exceptions import ConfigError, GatewayError
from .._forwarded import forwarded_element, parse_forwarded
from .._types import BufferedStream, Exchange, Handler, Headers, Request, Response

__all__ = ["Hooks", "TransformLayer", "route_hooks", "transform_layer"]

logger = logging.getLogger("asgi_gateway")

OnRequest = Callable[[Request], "Request | Response | Awaitable[Request | Response | None] | None"]
OnResponse = Callable[[Request, Response], "Response | Awaitable[Response | None] | None"]


@dataclass(frozen=True, slots=True)
class Hooks:
    """Python code that runs on a route's requests: pass `hooks={"/api": Hooks(...)}` to
    `Gateway` or `GatewayMiddleware`.

    Both may be plain or `async` functions. `on_request(request)` runs once per request,
    after the route's `request_headers` rules and before the first try; it may change
    `request.headers` and `request.target` (the path and query sent upstream), and returns
    None or the request to go on, or a `Response` to answer at once (without reaching the
    upstream). `on_response(request, response)` runs once the upstream's response head is in;
    it may change `response.status` and `response.headers` and returns None or the response
    to send. A response with a new `stream` replaces the body; the upstream's own body is
    closed once the new one has been sent, so the new stream may read from it. The body
    otherwise streams through untouched.

    They run on the route's WebSocket handshakes too, where `request.upgrade` is set and
    `on_response` sees the upstream's 101. A hook cannot accept a handshake itself: an
    `on_request` answer must have a final status (200-599), else it is a hook failure.

    A hook that raises a `GatewayError` (`Forbidden("...")`, say) answers with that error; any
    other exception is logged and answered `500 internal_error` with the request id, without
    its text.
    """

    on_request: OnRequest | None = None
    on_response: OnResponse | None = None


def route_hooks(config: GatewayConfig, hooks: Mapping[str, Hooks] | None) -> tuple[Hooks | None, ...]:
    """Each route's hooks, by route index: `hooks` maps a route `path` to them (every route
    with that path gets them).

    Raises `ConfigError` for a path no route has, or a value that is not `Hooks`.
    """
    by_route: list[Hooks | None] = [None] * len(config.routes)
    if not hooks:
        return tuple(by_route)
    errors: list[tuple[str, str]] = []
    for path, value in hooks.items():
        where = f"hooks[{path!r}]"
        indexes = [i for i, route in enumerate(config.routes) if route.path == path]
        if not isinstance(value, Hooks):
            errors.append((where, f"{value!r} is not a Hooks"))
        elif not indexes:
            paths = ", ".join(sorted({route.path for route in config.routes}))
            errors.append((where, f"no route has the path {path!r} (routes: {paths})"))
        else:
            for name in ("on_request", "on_response"):
                hook = getattr(value, name)
                if hook is not None and not callable(hook):
                    errors.append((f"{where}.{name}", f"{hook!r} is not callable"))
            for i in indexes:
                by_route[i] = value
    if errors:
        raise ConfigError(*errors[0], *errors[1:])
    return tuple(by_route)


def transform_layer(inner: Handler, config: GatewayConfig, index: int, hooks: Hooks | None) -> Handler:
    """`inner` wrapped in route `index`'s transformation layer, or `inner` itself when the
    route configures no transformation.
    """
    route = config.routes[index]
    forwarded = config.forwarded if isinstance(route.forwarded, _Inherit) else route.forwarded
    if hooks is not None and hooks.on_request is None and hooks.on_response is None:
        hooks = None
    if (
        not forwarded
        and route.request_headers is None
        and route.response_headers is None
        and route.redirects == "keep"
        and route.cookies == "keep"
        and hooks is None
    ):
        return inner
    return TransformLayer(inner, config, route, forwarded=forwarded, hooks=hooks)


# -- header rules -------------------------------------------------------------------------

#: A compiled value's part: literal bytes, or a variable's value read from the exchange.
_Part = bytes | Callable[[Exchange], bytes | None]


class _Rules:
    """One direction's header rules, compiled: the names to drop, then the headers to add."""

    __slots__ = ("drop", "dynamic", "fixed")

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
        self.dynamic = tuple(dynamic)

    def apply(self, headers: Headers, exchange: Exchange) -> Headers:
        drop = self.drop
        out = headers
        if drop:
            for name, _ in headers:
                if name in drop:
                    # Only a request that has one of them pays for a new list.
                    out = [pair for pair in headers if pair[0] not in drop]
                    break
        out.extend(self.fixed)
        for name, parts in self.dynamic:
            # A value that is one variable alone (the usual) needs no joining.
            value = parts(exchange) if callable(parts) else _render(parts, exchange)
            if value is not None:
                out.append((name, value))
        return out


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


def _origins(config: GatewayConfig, route: RouteConfig) -> tuple[frozenset[bytes], frozenset[bytes]]:
    """The upstream's servers as `scheme://host[:port]` (with and without a default port),
    and their host names, lower-case.
    """
    origins: set[bytes] = set()
    hosts: set[bytes] = set()
    for server in config.upstreams[route.upstream].servers:
        parts = urlsplit(server.url)
        host = (parts.hostname or "").encode("idna")
        netloc = b"[" + host + b"]" if b":" in host else host
        scheme = parts.scheme.encode()
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
        origins.add(scheme + b"://" + netloc + b":" + str(port).encode())
        if port == _DEFAULT_PORTS[parts.scheme]:
            origins.add(scheme + b"://" + netloc)
        hosts.add(host)
    return frozenset(origins), frozenset(hosts)


def _client_facing(headers: Headers) -> tuple[bytes | None, bytes | None]:
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


def _rewrite_location(
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


def _rewrite_cookie(value: bytes, hosts: frozenset[bytes], prefix: bytes, client_host: bytes | None) -> bytes:
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


# -- the layer --------------------------------------------------------------------------


class TransformLayer(Handler):
    """A route's transformations around `inner` (see the module's docstring for the order)."""

    def __init__(
        self,
        inner: Handler,
        config: GatewayConfig,
        route: RouteConfig,
        *,
        forwarded: bool,
        hooks: Hooks | None,
    ) -> None:
        index = config.routes.index(route)
        where = f"routes[{index}]"
        self.inner = inner
        self._forwarded = forwarded
        self._request_rules = (
            _Rules(route.request_headers, route, f"{where}.request_headers")
            if route.request_headers is not None
            else None
        )
        self._response_rules = (
            _Rules(route.response_headers, route, f"{where}.response_headers")
            if route.response_headers is not None
            else None
        )
        self._redirects = route.redirects == "rewrite"
        self._cookies = route.cookies == "rewrite"
        self._origins, self._hosts = _origins(config, route)
        self._prefix = (
            b"".join(b"/" + part.encode("utf-8") for part in route.path.split("/") if part)
            if route.strip_prefix
            else b""
        )
        self._on_request = hooks.on_request if hooks is not None else None
        self._on_response = hooks.on_response if hooks is not None else None
        # Requests only: the inner handler's own coroutine, with no second one of ours.
        self._up_only = (
            self._response_rules is None
            and not self._redirects
            and not self._cookies
            and self._on_request is None
            and self._on_response is None
        )
        if self._up_only and not forwarded and self._request_rules is not None:
            # The usual case: request rules alone, with no check of what else to do.
            self.handle_request = self._rules_only  # type: ignore[method-assign]

    def _rules_only(self, request: Request) -> Awaitable[Response]:
        assert self._request_rules is not None
        request.headers = self._request_rules.apply(request.headers, request.exchange)
        return self.inner.handle_request(request)

    def handle_request(self, request: Request) -> Awaitable[Response]:
        if self._forwarded:
            request.headers = _with_forwarded(request.headers, request.exchange)
        facing = _client_facing(request.headers) if self._redirects or self._cookies else (None, None)
        if self._request_rules is not None:
            request.headers = self._request_rules.apply(request.headers, request.exchange)
        if self._up_only:
            return self.inner.handle_request(request)
        return self._exchange(request, facing)

    async def _exchange(self, request: Request, facing: tuple[bytes | None, bytes | None]) -> Response:
        response: Response | None = None
        if self._on_request is not None:
            result = await _call(self._on_request, "on_request", request.exchange, request)
            if isinstance(result, Response):
                if not 200 <= result.status <= 599:
                    # A 101 would claim an upgrade no upstream made, and no server in front can
                    # send an interim answer as the final one.
                    await result.aclose()
                    _hook_failed(
                        "on_request",
                        request.exchange,
                        ValueError(f"on_request answered {result.status}, not a final status (200-599)"),
                    )
                response = result
            elif isinstance(result, Request):
                request = result
            elif result is not None:
                _hook_failed(
                    "on_request",
                    request.exchange,
                    TypeError(f"on_request returned {type(result).__name__}, not a Request or a Response"),
                )
        if response is None:
            response = await self.inner.handle_request(request)
            if self._on_response is not None:
                response = await self._after(request, response)
        try:
            headers = response.headers
            if self._redirects:
                headers = [
                    (name, _rewrite_location(value, self._origins, self._prefix, facing[0]))
                    if name in (b"location", b"content-location")
                    else (name, value)
                    for name, value in headers
                ]
            if self._cookies:
                headers = [
                    (name, _rewrite_cookie(value, self._hosts, self._prefix, facing[1]))
                    if name == b"set-cookie"
                    else (name, value)
                    for name, value in headers
                ]
            if self._response_rules is not None:
                headers = self._response_rules.apply(
                    headers if headers is not response.headers else list(headers), request.exchange
                )
            response.headers = headers
        except BaseException as exc:
            await response.aclose(exc)
            raise
        return response

    async def _after(self, request: Request, response: Response) -> Response:
        assert self._on_response is not None
        try:
            result = await _call(self._on_response, "on_response", request.exchange, request, response)
            if result is not None and not isinstance(result, Response):
                _hook_failed(
                    "on_response",
                    request.exchange,
                    TypeError(f"on_response returned {type(result).__name__}, not a Response"),
                )
        except BaseException as exc:
            await response.aclose(exc)
            raise
        if result is None or result is response:
            return response
        if type(result.stream) is BufferedStream and result.stream is not response.stream:
            # A body already whole cannot be reading the upstream's: that one can go now.
            await response.aclose()
        else:
            result.stream = _ThenClose(result.stream, response)
        return result

    async def aclose(self) -> None:
        await self.inner.aclose()


class _ThenClose:
    """A replacement body that closes the upstream's response (and its connection) after itself."""

    __slots__ = ("_original", "_stream")

    def __init__(self, stream: Any, original: Response) -> None:
        self._stream = stream
        self._original = original

    def __aiter__(self) -> Any:
        return self._stream.__aiter__()

    async def aclose(self) -> None:
        try:
            if self._stream is not self._original.stream:
                await self._stream.aclose()
        finally:
            await self._original.aclose()


async def _call(hook: Callable[..., Any], name: str, exchange: Exchange, *args: Any) -> Any:
    try:
        result = hook(*args)
        if inspect.isawaitable(result):
            result = await result
    except GatewayError:
        raise
    except Exception as exc:
        _hook_failed(name, exchange, exc)
    return result


def _hook_failed(name: str, exchange: Exchange, exc: Exception) -> NoReturn:
    logger.error(
        "the %s hook of route %s failed",
        name,
        exchange.route,
        exc_info=exc,
        extra={"request_id": exchange.request_id, "upstream": exchange.upstream.name},
    )
    raise GatewayError(f"the route's {name} hook failed") from exc


# -- Forwarded ------------------------------------------------------------------------------


def _with_forwarded(headers: Headers, exchange: Exchange) -> Headers:
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
