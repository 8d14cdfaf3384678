"""The IP rules layer: refuses clients outside a route's `allow_ips` or inside its `deny_ips`."""

from __future__ import annotations

from collections.abc import Awaitable

from .._edge.ip_rules import IpRules
from .._exceptions import Forbidden
from .._types import Handler, Request, Response

__all__ = ["IpRulesLayer"]


class IpRulesLayer(Handler):
    """403 `forbidden` for a client address the rules refuse; the rest goes to `inner`.

    The address is `exchange.client_ip`: the peer's, or with `trusted_proxies` the first
    untrusted hop of its `X-Forwarded-For`, so an untrusted client cannot choose it.
    """

    def __init__(self, inner: Handler, rules: IpRules) -> None:
        self.inner = inner
        self.rules = rules

    def handle_request(self, request: Request) -> Awaitable[Response]:
        # A plain function handing back the inner coroutine: no coroutine of its own to
        # resume on each wake-up of the exchange. A refusal raises here, at the await.
        exchange = request.exchange
        if not self.rules.allows(exchange.client_ip):
            span = exchange.span
            if span is not None and span.is_recording():
                span.set_attribute("gateway.ip_rules.result", "denied")
            raise Forbidden("the client address is not allowed on this route")
        return self.inner.handle_request(request)
