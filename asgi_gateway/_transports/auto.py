"""The one place the gateway's transport is chosen, once the async library is known.

A `Transport` given by the user is used as it is, and an httpx client or transport through
the httpx adapter. Otherwise the built-in HTTP/1.1 pool, which runs on asyncio; under trio
the httpx adapter takes its place.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Iterable

import httpx
import sniffio

from .._types import Request, Response, Server, Transport
from .httpx import HttpxTransport

__all__ = ["AutoTransport", "UserTransport"]

logger = logging.getLogger("asgi_gateway")

UserTransport = httpx.AsyncClient | httpx.AsyncBaseTransport | Transport


class AutoTransport(Transport):
    """Opens the real transport on first use (or at `open()`), and closes it at `aclose()`."""

    def __init__(self, user: UserTransport | None) -> None:
        self._user = user
        self._inner: Transport | None = None

    def _open(self) -> Transport:
        if isinstance(self._user, Transport):
            self._inner = self._user
        elif self._user is not None:
            self._inner = HttpxTransport(self._user)
        elif sniffio.current_async_library() == "asyncio":
            from .pool import PoolTransport

            self._inner = PoolTransport()
        else:
            logger.warning("the built-in HTTP/1.1 pool needs asyncio; using the httpx transport under trio")
            self._inner = HttpxTransport()
        # Once open, the layer above calls the real transport's method itself: an instance
        # attribute found before this class's method, so no call of this layer per attempt.
        self.handle_request = self._inner.handle_request  # type: ignore[method-assign]
        return self._inner

    def handle_request(self, request: Request) -> Awaitable[Response]:
        # Until opened. The inner transport's own awaitable: no coroutine of this layer
        # between the relay and the socket, to be resumed at each wake-up of the exchange.
        return (self._inner or self._open()).handle_request(request)

    def open(self) -> None:
        if self._inner is None:
            self._open()

    def retire(self, servers: Iterable[Server]) -> None:
        """`servers` are gone from their upstreams: see `PoolTransport.retire`.

        Only the built-in pool keeps connections per server object; the httpx adapter and a
        transport of the user's own are left to expire their idle connections themselves.
        """
        retire = getattr(self._inner, "retire", None)
        if retire is not None:
            retire(servers)

    async def aclose(self) -> None:
        inner, self._inner = self._inner, None
        self.__dict__.pop("handle_request", None)
        if inner is not None:
            await inner.aclose()
