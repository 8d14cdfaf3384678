"""A gateway's life beside its requests: its start, its reloads and the end of its sessions.

`Gateway` keeps the public methods (`running`, `lifespan`, `reload`, `drain`) and the
request path; its `Lifecycle` does the rest of their work:

- While the gateway runs (from the first `running()` to the end of the last), the serving
  state's background work runs (active health checks, DNS re-resolution, JWKS refresh),
  and after a reload the new state's, once it is swapped in. The shared transport opens
  with the first `running()` and closes after the last.
- A reload builds and validates the next state off to the side (`build`); the gateway
  swaps it in with one assignment, as its request path reads it, and the replaced state
  then hands over what stays and stops (`swapped`).
- The drain's last step: every WebSocket session open is closed with 1001.

And the ASGI lifespan in both forms: the gateway's own when it is served as the app
(`serve_lifespan`), the host app's when `GatewayMiddleware` wraps one (`wrap_lifespan`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from ._config import GatewayConfig, load_with_digest
from ._exceptions import ConfigError
from ._hosting import freeze_heap, refreeze_heap
from ._state import build_state, removed_servers
from ._transports.websocket import CLOSE_TIMEOUT

if TYPE_CHECKING:
    from ._layers.transform import Hooks
    from ._state import GatewayState
    from ._telemetry import Telemetry
    from ._transports.auto import AutoTransport

__all__ = ["Lifecycle", "serve_lifespan", "wrap_lifespan"]

logger = logging.getLogger("asgi_gateway")

#: Seconds without a reload after which a frozen heap is collected and frozen again.
_REFREEZE_AFTER = 1.0
Running = Callable[[], contextlib.AbstractAsyncContextManager[None]]


class Lifecycle:
    """One gateway's background work, reloads and WebSocket sessions (see the module)."""

    def __init__(
        self,
        state: GatewayState,
        transport: AutoTransport,
        telemetry: Telemetry,
        hooks: Mapping[str, Hooks] | None,
    ) -> None:
        self._transport = transport
        self._telemetry = telemetry
        self._hooks = hooks
        #: The state swapped in last: the one serving, the one whose background work runs,
        #: and the one the next reload builds on.
        self._state = state
        #: Why the last reload failed, until one succeeds.
        self.last_error: str | None = None
        self._running = 0
        #: Set by `swapped()` while the gateway runs: the new state's background work starts.
        self._reloaded: anyio.Event | None = None
        self._sessions: set[anyio.CancelScope] = set()
        self._sessions_ended: anyio.Event | None = None

    # -- running -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        self._transport.open()
        self._running += 1
        try:
            async with anyio.create_task_group() as tg:
                if self._running == 1:
                    from ._websocket import warn_if_unavailable

                    warn_if_unavailable()
                    # The first JWKS fetches (each within its timeout) come before serving.
                    await tg.start(self._run_background, name="gateway background")
                try:
                    yield
                finally:
                    self._reloaded = None
                    tg.cancel_scope.cancel()
        finally:
            self._running -= 1
            if self._running == 0:
                with anyio.CancelScope(shield=True):
                    await self._transport.aclose()

    @contextlib.asynccontextmanager
    async def hosted(self) -> AsyncIterator[None]:
        """`running()` for a whole app's lifespan: the heap built by start-up is frozen."""
        async with self.running():
            freeze_heap()
            yield

    async def _run_background(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Run the current state's background work, and each new state's after a reload.

        `swapped()` only sets an event: a reload may come from a plain callback of the
        event loop (a signal handler), where no task could be started.
        """
        async with anyio.create_task_group() as tg:
            started = self._state
            await tg.start(started.run)
            task_status.started()
            refreeze = False
            while True:
                if self._state is started:
                    reloaded = self._reloaded = anyio.Event()
                    if refreeze:
                        # One full collection for a burst of reloads, once they have been
                        # quiet for a while, never on the reload's own path.
                        with anyio.move_on_after(_REFREEZE_AFTER):
                            await reloaded.wait()
                        if not reloaded.is_set():
                            refreeze_heap()
                            refreeze = False
                            continue
                    else:
                        await reloaded.wait()
                # Only the latest: a state replaced before it ran has been stopped anyway. A
                # reload during the first state's start (its DNS lookups, JWKS fetches) is
                # seen here too, though no one was waiting for it yet.
                started = self._state
                tg.start_soon(started.run, name="gateway background")
                refreeze = True

    # -- reload ------------------------------------------------------------------------

    def build(self, source: GatewayConfig | Mapping[str, Any] | str | os.PathLike[str]) -> GatewayState:
        """The state `source` describes, built on the serving one; nothing is swapped yet.

        Raises `ConfigError`, counted and logged, with the serving state left as it was.
        """
        old = self._state
        try:
            loaded, digest = load_with_digest(source)
            return build_state(loaded, digest, self._transport, self._telemetry, self._hooks, previous=old)
        except ConfigError as exc:
            self.last_error = str(exc)
            self._telemetry.config_reloaded("failure")
            logger.error(
                "config reload failed; the running config (version %d) keeps serving:\n%s",
                old.version,
                exc,
                extra={"reason": "reload-failed"},
            )
            raise

    def swapped(self, state: GatewayState) -> None:
        """The gateway serves `state` (from `build`) now: the state it replaced hands over
        what stays, stops, and its removed servers retire."""
        old, self._state = self._state, state
        self.last_error = None
        state.watch_servers()
        state.adopt()
        old.stop()
        for name in old.stacks.keys() - state.stacks.keys():
            # An upstream gone from the config leaves the available-servers gauge with it.
            self._telemetry.available.pop(name, None)
        self._transport.retire(removed_servers(old, state))
        self._telemetry.config_reloaded("success")
        logger.info(
            "config reloaded: version %d (sha256 %s), %d routes, %d upstreams",
            state.version,
            state.sha256[:12],
            len(state.config.routes),
            len(state.config.upstreams),
            extra={"reason": "reloaded"},
        )
        if self._reloaded is not None:
            self._reloaded.set()
        else:
            # Not running, so no background work to do it later: a heap frozen at start-up
            # (`_hosting.freeze_heap`) lets the old state go now.
            del old
            refreeze_heap()

    # -- WebSocket sessions ------------------------------------------------------------

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Around one WebSocket session: `close_sessions()` cancels it, and both ends then
        hear 1001 (going away)."""
        with anyio.CancelScope() as scope:
            self._sessions.add(scope)
            try:
                yield
            finally:
                self._sessions.discard(scope)
                if self._sessions_ended is not None and not self._sessions:
                    self._sessions_ended.set()

    async def close_sessions(self) -> bool:
        """Close every WebSocket session open and wait for them to end; True when they did
        in time."""
        if not self._sessions:
            return True
        if self._sessions_ended is None or self._sessions_ended.is_set():
            self._sessions_ended = anyio.Event()
        logger.info(
            "draining: closing %d WebSocket session(s) with 1001",
            len(self._sessions),
            extra={"reason": "draining"},
        )
        for session in list(self._sessions):
            session.cancel()
        # Each session closes both ends within its own close timeout; a bound on top of it.
        with anyio.move_on_after(CLOSE_TIMEOUT + 2.0) as closing:
            await self._sessions_ended.wait()
        return not closing.cancelled_caught


# -- the ASGI lifespan -------------------------------------------------------------------


async def serve_lifespan(hosted: Running, receive: Any, send: Any) -> None:
    """The lifespan of a gateway served as the app itself, `hosted` from startup to shutdown."""
    message = await receive()
    assert message["type"] == "lifespan.startup"
    try:
        async with hosted():
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
    except Exception as exc:
        logger.exception("gateway lifespan failed")
        await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
        return
    await send({"type": "lifespan.shutdown.complete"})


async def wrap_lifespan(
    app: Any,
    scope: dict[str, Any],
    receive: Any,
    send: Any,
    *,
    running: Running,
    started: Callable[[dict[str, Any]], None],
) -> None:
    """The lifespan of `app`, with the gateway `running` from its startup until after its
    shutdown; `started(scope)` once `app` has started."""
    # The gateway runs in a task of its own, so its task group is entered and left in
    # one place.
    stop = anyio.Event()
    stopped = anyio.Event()
    begun = False

    async def run_gateway(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with running():
                task_status.started()
                await stop.wait()
        finally:
            stopped.set()

    async with anyio.create_task_group() as tg:

        async def wrapped_receive() -> Any:
            nonlocal begun
            message = await receive()
            if message["type"] == "lifespan.startup" and not begun:
                begun = True
                await tg.start(run_gateway)
            return message

        async def wrapped_send(message: Any) -> None:
            if message["type"] == "lifespan.startup.complete":
                started(scope)
            elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                stop.set()
                if begun:
                    await stopped.wait()
            await send(message)

        try:
            await app(scope, wrapped_receive, wrapped_send)
        finally:
            stop.set()
