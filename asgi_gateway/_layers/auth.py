"""The authentication layer: a route's JWT check, and the claims it sends upstream."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from .._config import JwtConfig
from .._edge.jwt import JwtVerifier, KeyUnknown, TokenRefused, bearer_token, claim_header_value
from .._exceptions import Unauthorized
from .._types import Exchange, Handler, Request, Response

__all__ = ["AuthLayer"]


class AuthLayer(Handler):
    """401 `unauthorized` unless the request carries a valid `Authorization: Bearer` JWT.

    A verified token's claims go on `exchange.claims`; `claims_to_headers` are set on the
    request after any copy the client sent is removed, and `Authorization` itself is
    removed when the route does not forward it.
    """

    def __init__(self, inner: Handler, verifier: JwtVerifier, config: JwtConfig) -> None:
        self.inner = inner
        self.verifier = verifier
        self._claims = tuple(
            (claim, header.encode("ascii")) for claim, header in config.claims_to_headers.items()
        )
        removed = {header for _, header in self._claims}
        if not config.forward_authorization:
            removed.add(b"authorization")
        self._removed = frozenset(removed)

    def handle_request(self, request: Request) -> Awaitable[Response]:
        exchange = request.exchange
        token = None
        sent = 0
        for name, value in request.headers:
            if name == b"authorization":
                sent += 1
                token = bearer_token(value)
        if token is None or sent > 1:
            # Two Authorization headers: the upstream might read the other one.
            _refuse(
                exchange, "missing" if sent == 0 or token is None else "invalid", "a bearer token is required"
            )
        assert token is not None
        try:
            claims = self.verifier.verify(token)
        except KeyUnknown as exc:
            if self.verifier.jwks is None:
                _refuse(exchange, exc.reason, exc.detail)
            return self._after_refetch(request, token)
        except TokenRefused as exc:
            _refuse(exchange, exc.reason, exc.detail)
        self._admit(request, claims)
        return self.inner.handle_request(request)

    async def _after_refetch(self, request: Request, token: str) -> Response:
        # Only a token naming a key the set does not have waits here (a rotation, most likely).
        assert self.verifier.jwks is not None
        exchange = request.exchange
        if not await self.verifier.jwks.refetch():
            _refuse(exchange, "unknown_key", "no key for the token (the key set was fetched recently)")
        try:
            claims = self.verifier.verify(token)
        except TokenRefused as exc:
            _refuse(exchange, exc.reason, exc.detail)
        self._admit(request, claims)
        return await self.inner.handle_request(request)

    def _admit(self, request: Request, claims: dict[str, Any]) -> None:
        exchange = request.exchange
        exchange.claims = claims
        exchange.auth_result = "allowed"
        span = exchange.span
        if span is not None and span.is_recording():
            span.set_attribute("gateway.auth.result", "allowed")
        if self._removed:
            removed = self._removed
            headers = [pair for pair in request.headers if pair[0] not in removed]
            for claim, header in self._claims:
                if claim in claims:
                    value = claim_header_value(claims[claim])
                    if value is not None:
                        headers.append((header, value))
            request.headers = headers


def _refuse(exchange: Exchange, reason: str, detail: str) -> Any:
    exchange.auth_result = reason
    span = exchange.span
    if span is not None and span.is_recording():
        span.set_attribute("gateway.auth.result", reason)
    raise Unauthorized(detail, token_sent=reason != "missing")
