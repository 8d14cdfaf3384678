"""The transformation layer: a route's header rules, redirect and cookie rewriting, RFC 7239
`Forwarded`, and its Python hooks.

On the way up, in this order: `Forwarded` is added, the `request_headers` rules run, then the
`on_request` hook. On the way back: the `on_response` hook, then `Location`/`Set-Cookie`
rewriting and the `response_headers` rules. So a hook sees the request as the rules left it,
and an answer a hook makes itself still gets the route's response rules. Everything is
compiled when the gateway is built (the header work in `transform_rules`); a route that
configures none of it has no such layer.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from .._config import GatewayConfig, RouteConfig, _Inherit
from .._exceptions import ConfigError, GatewayError
from .._types import BufferedStream, Exchange, Handler, Request, Response
from .transform_rules import (
    HeaderRules,
    client_facing,
    rewrite_cookie,
    rewrite_location,
    upstream_origins,
    with_forwarded,
)

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
            HeaderRules(route.request_headers, route, f"{where}.request_headers")
            if route.request_headers is not None
            else None
        )
        self._response_rules = (
            HeaderRules(route.response_headers, route, f"{where}.response_headers")
            if route.response_headers is not None
            else None
        )
        self._redirects = route.redirects == "rewrite"
        self._cookies = route.cookies == "rewrite"
        self._origins, self._hosts = upstream_origins(config, route)
        self._prefix = (
            b"".join(b"/" + part.encode("utf-8") for part in route.path.split("/") if part)
            if route.strip_prefix
            else b""
        )
        self._on_request = hooks.on_request if hooks is not None else None
        self._on_response = hooks.on_response if hooks is not None else None
        # Chosen once, by what the route configures. Header rules and `Forwarded` alone (the
        # usual) add no coroutine on their way up, and with response rules one coroutine with
        # one call each way; hooks, redirects and cookies take `handle_request` below.
        if self._redirects or self._cookies or self._on_request is not None or self._on_response is not None:
            return
        if self._response_rules is not None:
            self.handle_request = self._rules_both_ways  # type: ignore[method-assign]
        else:
            self.handle_request = self._requests_only  # type: ignore[method-assign]

    def _requests_only(self, request: Request) -> Awaitable[Response]:
        """`Forwarded` and the request rules, then the inner handler's own coroutine."""
        if self._forwarded:
            request.headers = with_forwarded(request.headers, request.exchange)
        if self._request_rules is not None:
            request.headers = self._request_rules.request(request.headers, request.exchange)
        return self.inner.handle_request(request)

    async def _rules_both_ways(self, request: Request) -> Response:
        assert self._response_rules is not None
        exchange = request.exchange
        if self._forwarded:
            request.headers = with_forwarded(request.headers, exchange)
        if self._request_rules is not None:
            request.headers = self._request_rules.request(request.headers, exchange)
        response = await self.inner.handle_request(request)
        try:
            response.headers = self._response_rules.response(response.headers, exchange)
        except BaseException as exc:
            await response.aclose(exc)
            raise
        return response

    def handle_request(self, request: Request) -> Awaitable[Response]:
        if self._forwarded:
            request.headers = with_forwarded(request.headers, request.exchange)
        facing = client_facing(request.headers) if self._redirects or self._cookies else (None, None)
        if self._request_rules is not None:
            request.headers = self._request_rules.request(request.headers, request.exchange)
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
                    (name, rewrite_location(value, self._origins, self._prefix, facing[0]))
                    if name in (b"location", b"content-location")
                    else (name, value)
                    for name, value in headers
                ]
            if self._cookies:
                headers = [
                    (name, rewrite_cookie(value, self._hosts, self._prefix, facing[1]))
                    if name == b"set-cookie"
                    else (name, value)
                    for name, value in headers
                ]
            if self._response_rules is not None:
                headers = self._response_rules.response(headers, request.exchange)
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
