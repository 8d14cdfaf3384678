"""WebSocket sessions relayed to an upstream chosen by the same layers."""

from __future__ import annotations

from typing import Any

from ._proxy import TrustedProxies
from ._routing import Route
from ._stack import UpstreamStack
from ._telemetry import Telemetry

__all__ = ["proxy_websocket"]


async def proxy_websocket(
    scope: dict[str, Any],
    receive: Any,
    send: Any,
    *,
    route: Route,
    path: bytes,
    stack: UpstreamStack,
    telemetry: Telemetry,
    trusted: TrustedProxies,
) -> None:
    """Relay one WebSocket session (not yet supported: the handshake is refused)."""
    await send({"type": "websocket.close", "code": 1011, "reason": "websocket proxying is not available"})
