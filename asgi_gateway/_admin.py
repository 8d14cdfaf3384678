"""The operator's endpoints under `admin.path`: the status page, status JSON, Prometheus
metrics, readiness, reload, and draining or enabling a server.

They are answered by the gateway itself, before any route is matched: an admin path
never reaches an upstream or the wrapped app. `{path}/ready` is a load balancer's or
kubelet's probe, so it needs no token and answers any address, and says nothing but
200 or 503. Everything else needs the client within `allow_ips` (after
`trusted_proxies`), the token when one is set, and, for a POST, a request that a
browser did not send from another site: a page elsewhere could otherwise make an
operator's browser reload the gateway.

The page's buttons are plain HTML forms (a same-origin POST, which browsers send with the
gateway's own `Origin`): they work without JavaScript, and a POST that asks for HTML is
answered with a redirect back to the page. With a token set, the page and its forms need the
`Authorization` header like every other endpoint: a page script cannot know a bearer token,
and taking it in a query string or a cookie would put it in logs, history or within reach of
cross-site requests. An operator's browser sends it through a header-setting extension or a
local proxy (`docs/admin.md`).
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import unquote

from ._admin_stats import AdminRecords, ServerStats
from ._config import AdminConfig
from ._edge.ip_rules import AddressSet
from ._exceptions import (
    ConfigError,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
)
from ._proxy import TrustedProxies, send_error

if TYPE_CHECKING:
    from ._stack import UpstreamStack
    from ._telemetry import Telemetry

__all__ = ["Admin"]

logger = logging.getLogger("asgi_gateway")

_JSON: Final = (b"content-type", b"application/json")
_NO_STORE: Final = (b"cache-control", b"no-store")


class _Gateway(Protocol):
    """What the admin endpoints need of the gateway."""

    @property
    def draining(self) -> bool: ...

    @property
    def stacks(self) -> Mapping[str, UpstreamStack]: ...

    @property
    def admin_records(self) -> AdminRecords: ...

    @property
    def telemetry(self) -> Telemetry: ...

    def status(self) -> dict[str, Any]: ...

    def reload(self, config: Any = None) -> None: ...


class Admin:
    """The admin endpoints of one config: `handles(path)` tells, `__call__` answers."""

    __slots__ = ("_allowed", "_routes", "_token", "_trace_url", "_trusted", "prefix")

    def __init__(self, config: AdminConfig, trusted: TrustedProxies) -> None:
        assert config.path is not None
        self.prefix = config.path.encode()
        self._token = f"Bearer {config.token}".encode() if config.token is not None else None
        self._allowed = AddressSet(config.allow_ips)
        self._trusted = trusted
        self._trace_url = config.trace_url
        self._routes: dict[bytes, tuple[tuple[str, ...], Callable[..., Any]]] = {
            b"": (("GET", "HEAD"), self._page),
            b"/": (("GET", "HEAD"), self._page),
            b"/status": (("GET", "HEAD"), self._status),
            b"/metrics": (("GET", "HEAD"), self._metrics),
            b"/reload": (("POST",), self._reload),
        }

    def handles(self, raw_path: bytes) -> bool:
        prefix = self.prefix
        return raw_path.startswith(prefix) and (len(raw_path) == len(prefix) or raw_path[len(prefix)] == 0x2F)

    async def __call__(
        self, scope: dict[str, Any], send: Any, raw_path: bytes, gateway: _Gateway, request_id: str
    ) -> None:
        sub = raw_path[len(self.prefix) :].split(b"?", 1)[0]
        method: str = scope["method"]
        if sub == b"/ready":
            if method not in ("GET", "HEAD"):
                await send_error(send, MethodNotAllowed("use GET"), request_id)
                return
            # Nothing but the status: a probe needs no more, and anyone may send one.
            await _send(send, 503 if gateway.draining else 200, b"", [(b"content-length", b"0"), _NO_STORE])
            return
        try:
            client = self._check_access(scope)
            methods, endpoint = self._routes.get(sub, ((), None))
            if endpoint is None:
                endpoint = self._server_action(sub)
                methods = ("POST",)
            if method not in methods:
                raise MethodNotAllowed(f"use {' or '.join(methods)}")
            if method == "POST" and _cross_site(scope):
                raise Forbidden("cross-site admin requests are refused")
            if method == "POST" and _wants_html(scope):
                # A form on the page: act, then show the page again (its actions list says how it went).
                await endpoint(_discard, gateway, request_id, method, client)
                location = self.prefix + b"/"
                await _send(send, 303, b"", [(b"location", location), (b"content-length", b"0"), _NO_STORE])
                return
            await endpoint(send, gateway, request_id, method, client)
        except GatewayError as exc:
            await send_error(send, exc, request_id)

    def _server_action(self, sub: bytes) -> Callable[..., Any]:
        """`/servers/{upstream}/{index}/drain` or `/enable`; 404 for any other path."""
        parts = sub.split(b"/")
        if (
            len(parts) == 5
            and parts[1] == b"servers"
            and parts[4] in (b"drain", b"enable")
            and parts[3].isdigit()
        ):
            upstream = unquote(parts[2].decode("latin-1"))
            index = int(parts[3])
            drained = parts[4] == b"drain"

            async def act(
                send: Any, gateway: _Gateway, request_id: str, method: str, client: str | None
            ) -> None:
                await self._set_drained(send, gateway, request_id, client, upstream, index, drained)

            return act
        raise NotFound(f"no admin endpoint {sub.decode('latin-1') or '/'}")

    def _check_access(self, scope: dict[str, Any]) -> str | None:
        """The client's address, once it may use the admin endpoints; else raises."""
        client = scope.get("client")
        peer: str | None = client[0] if client else None
        trusted = self._trusted
        if trusted and peer in trusted:
            forwarded = next((value for name, value in scope["headers"] if name == b"x-forwarded-for"), None)
            peer = trusted.client_address(peer, forwarded)
        if peer is None or peer not in self._allowed:
            raise Forbidden("this address may not use the admin endpoints")
        token = self._token
        if token is None:
            return peer
        sent = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        # A constant-time comparison: the token must not leak one byte at a time.
        if sent is None or not hmac.compare_digest(sent, token):
            raise Unauthorized("the admin endpoints need the admin token", token_sent=sent is not None)
        return peer

    # -- endpoints ---------------------------------------------------------------------

    @staticmethod
    def _full_status(gateway: _Gateway) -> dict[str, Any]:
        stacks = gateway.stacks
        # Servers that discovery added since the last look start their figures now.
        for stack in stacks.values():
            for server in stack.failover.servers:
                if server.stats is None:
                    server.stats = ServerStats()
        return {**gateway.status(), "admin": gateway.admin_records.status()}

    async def _status(
        self, send: Any, gateway: _Gateway, request_id: str, method: str, client: str | None
    ) -> None:
        body = json.dumps(self._full_status(gateway), default=str).encode()
        await _send(send, 200, b"" if method == "HEAD" else body, _json_headers(body, request_id))

    async def _page(
        self, send: Any, gateway: _Gateway, request_id: str, method: str, client: str | None
    ) -> None:
        from ._admin_page import render_page

        nonce = secrets.token_urlsafe(16)
        prefix = self.prefix.decode()
        body = render_page(prefix, self._full_status(gateway), self._trace_url, nonce).encode()
        policy = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; form-action 'self'; img-src 'self'; "
            "base-uri 'none'; frame-ancestors 'none'"
        )
        headers = [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"content-security-policy", policy.encode()),
            (b"x-content-type-options", b"nosniff"),
            # Not `no-referrer`: with it a browser sends `Origin: null` on the page's own form POSTs.
            (b"referrer-policy", b"same-origin"),
            (b"x-frame-options", b"DENY"),
            (b"x-request-id", request_id.encode()),
            _NO_STORE,
        ]
        await _send(send, 200, b"" if method == "HEAD" else body, headers)

    async def _metrics(
        self, send: Any, gateway: _Gateway, request_id: str, method: str, client: str | None
    ) -> None:
        prometheus = gateway.telemetry.prometheus
        if prometheus is None:
            from ._prometheus import available, install_hint

            detail = (
                install_hint()
                if not available()
                else "admin.path was off when the gateway started; metrics are collected from the start: restart it"
            )
            raise ServiceUnavailable(detail)
        body, content_type = prometheus.exposition()
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            _NO_STORE,
        ]
        await _send(send, 200, b"" if method == "HEAD" else body, headers)

    async def _set_drained(
        self,
        send: Any,
        gateway: _Gateway,
        request_id: str,
        client: str | None,
        upstream: str,
        index: int,
        drained: bool,
    ) -> None:
        action = "drain" if drained else "enable"
        stack = gateway.stacks.get(upstream)
        if stack is None:
            raise NotFound(f"no upstream {upstream!r}")
        if not 0 <= index < len(stack.config.servers):
            raise NotFound(
                f"upstream {upstream!r} has no server {index} (it has {len(stack.config.servers)})"
            )
        # With DNS discovery one entry is every address its name resolved to: all of them.
        servers = [server for server in stack.failover.servers if server.index == index]
        for server in servers:
            server.drained = drained
        stack.failover.refresh()
        target = f"{upstream}/{index}"
        urls = sorted({server.url for server in servers}) or [stack.config.servers[index].url]
        gateway.admin_records.action(client, action, target, f"{len(servers)} server(s): {', '.join(urls)}")
        logger.info(
            "admin: %s server %d of upstream %r (%s) by %s",
            "drained" if drained else "enabled",
            index,
            upstream,
            ", ".join(urls),
            client,
            extra={"upstream": upstream, "server": urls[0], "reason": f"admin-{action}", "client": client},
        )
        result = {
            "result": "drained" if drained else "enabled",
            "upstream": upstream,
            "index": index,
            "servers": len(servers),
        }
        body = json.dumps(result).encode()
        await _send(send, 200, body, _json_headers(body, request_id))

    async def _reload(
        self, send: Any, gateway: _Gateway, request_id: str, method: str, client: str | None
    ) -> None:
        try:
            gateway.reload()
        except ConfigError as exc:
            gateway.admin_records.action(client, "reload", None, "failed: invalid config")
            logger.info(
                "admin: reload requested by %s failed",
                client,
                extra={"reason": "admin-reload", "client": client},
            )
            result: dict[str, Any] = {
                "error": "invalid_config",
                "detail": "the config was not reloaded; the running one keeps serving",
                "errors": [{"key": where, "message": message} for where, message in exc.errors],
                "request_id": request_id,
            }
            status = 422
        else:
            result = {"result": "reloaded"}
            status = 200
            version = gateway.status()["config"]["version"]
            gateway.admin_records.action(client, "reload", None, f"version {version}")
            logger.info(
                "admin: reload requested by %s", client, extra={"reason": "admin-reload", "client": client}
            )
        result["config"] = gateway.status()["config"]
        body = json.dumps(result).encode()
        await _send(send, status, body, _json_headers(body, request_id))


def _cross_site(scope: dict[str, Any]) -> bool:
    """Whether a browser sent this request from another site (Fetch Metadata, else `Origin`)."""
    origin = host = None
    for name, value in scope["headers"]:
        if name == b"sec-fetch-site":
            if value == b"cross-site":
                return True
        elif name == b"origin":
            origin = value
        elif name == b"host":
            host = value
    if origin is None:
        return False
    if origin == b"null" or host is None:
        return True
    # The origin's authority must be this gateway's own (scheme aside: a TLS terminator in front).
    authority: bytes = origin.partition(b"://")[2].rstrip(b"/").lower()
    return authority != bytes(host).lower()


def _wants_html(scope: dict[str, Any]) -> bool:
    """Whether the request came from a page's form (a browser asking for HTML back)."""
    accept = next((value for name, value in scope["headers"] if name == b"accept"), b"")
    return b"text/html" in accept


async def _discard(message: Any) -> None:
    """A `send` for an action whose answer is a redirect instead."""


def _json_headers(body: bytes, request_id: str) -> list[tuple[bytes, bytes]]:
    return [
        _JSON,
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        _NO_STORE,
    ]


async def _send(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
