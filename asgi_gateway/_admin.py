"""The operator's endpoints under `admin.path`: readiness, status, reload.

They are answered by the gateway itself, before any route is matched: an admin path
never reaches an upstream or the wrapped app. `{path}/ready` is a load balancer's or
kubelet's probe, so it needs no token and answers any address, and says nothing but
200 or 503. Everything else needs the client within `allow_ips` (after
`trusted_proxies`), the token when one is set, and, for a POST, a request that a
browser did not send from another site: a page elsewhere could otherwise make an
operator's browser reload the gateway.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any, Final, Protocol

from ._config import AdminConfig
from ._edge.ip_rules import AddressSet
from ._exceptions import ConfigError, Forbidden, GatewayError, NotFound, Unauthorized
from ._proxy import TrustedProxies, send_error

__all__ = ["Admin"]

_JSON: Final = (b"content-type", b"application/json")
_NO_STORE: Final = (b"cache-control", b"no-store")


class _Gateway(Protocol):
    """What the admin endpoints need of the gateway."""

    @property
    def draining(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def reload(self, config: Any = None) -> None: ...


class MethodNotAllowed(GatewayError):
    status = 405
    code = "method_not_allowed"


class Admin:
    """The admin endpoints of one config: `handles(path)` tells, `__call__` answers."""

    __slots__ = ("_allowed", "_routes", "_token", "_trusted", "prefix")

    def __init__(self, config: AdminConfig, trusted: TrustedProxies) -> None:
        assert config.path is not None
        self.prefix = config.path.encode()
        self._token = f"Bearer {config.token}".encode() if config.token is not None else None
        self._allowed = AddressSet(config.allow_ips)
        self._trusted = trusted
        self._routes: dict[bytes, tuple[tuple[str, ...], Callable[..., Any]]] = {
            b"/status": (("GET", "HEAD"), self._status),
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
            self._check_access(scope)
            methods, endpoint = self._routes.get(sub, ((), None))
            if endpoint is None:
                raise NotFound(f"no admin endpoint {sub.decode('latin-1') or '/'}")
            if method not in methods:
                raise MethodNotAllowed(f"use {' or '.join(methods)}")
            if method == "POST" and _cross_site(scope):
                raise Forbidden("cross-site admin requests are refused")
        except GatewayError as exc:
            await send_error(send, exc, request_id)
            return
        await endpoint(send, gateway, request_id, method)

    def _check_access(self, scope: dict[str, Any]) -> None:
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
            return
        sent = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        # A constant-time comparison: the token must not leak one byte at a time.
        if sent is None or not hmac.compare_digest(sent, token):
            raise Unauthorized("the admin endpoints need the admin token", token_sent=sent is not None)

    # -- endpoints ---------------------------------------------------------------------

    @staticmethod
    async def _status(send: Any, gateway: _Gateway, request_id: str, method: str) -> None:
        body = json.dumps(gateway.status(), default=str).encode()
        await _send(send, 200, b"" if method == "HEAD" else body, _json_headers(body, request_id))

    @staticmethod
    async def _reload(send: Any, gateway: _Gateway, request_id: str, method: str) -> None:
        try:
            gateway.reload()
        except ConfigError as exc:
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
