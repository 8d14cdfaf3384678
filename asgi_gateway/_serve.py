"""`asgi-gateway serve`: uvicorn, run so that a config change or a shutdown loses no request.

```
serve(options)
 ├─ workers == 1: run_worker() in this process
 └─ workers > 1:  Supervisor ── one listening socket, bound here ──► N run_worker() processes
                    SIGHUP            ─► "reload"   to every worker  (over its control socket)
                    SIGTERM / SIGINT  ─► "drain"    (a second one: "exit now")
                    a worker that dies is started again

run_worker(): a Gateway under GatewayServer (a uvicorn.Server)
  SIGHUP, --watch, "reload"  ─► gateway.reload(): in-process, nothing restarts
  SIGTERM / SIGINT, "drain"  ─► readiness 503 and `Connection: close` for drain_delay, still serving
                                ─► listeners closed, idle connections closed
                                ─► gateway.drain(drain_timeout): requests in flight end, then
                                   WebSocket sessions close with 1001 ─► lifespan shutdown, exit
  a second SIGTERM / SIGINT, "exit now" ─► exit at once
```

uvicorn's own supervisor restarts every worker on SIGHUP, and its server closes the listeners at
the first SIGTERM and ends WebSocket sessions with 1012: both lose requests that need not be lost.
The supervisor is in `_supervisor`, the file watcher of --watch in `_watch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from ._exceptions import ConfigError
from ._hosting import freeze_heap
from ._supervisor import DRAIN, EXIT_NOW, RELOAD, STARTED, Supervisor, bind, shared_metrics
from ._watch import watch_config

__all__ = ["GatewayServer", "ServeOptions", "run_worker", "serve"]

logger = logging.getLogger("asgi_gateway")

#: uvicorn's own wait for the tasks left once `gateway.drain()` has returned (s): the drain
#: already waited `drain_timeout` for them, so what is left now is cancelled soon.
_AFTER_DRAIN_GRACE = 1


@dataclass(frozen=True)
class ServeOptions:
    """What `serve` was asked for (sent to each worker process, so plain data)."""

    config_path: str
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    log_level: str = "info"
    #: "level:format:access": the log level, text or json, the access log on or off.
    logging: str = "info:text:on"
    watch: bool = False


def serve(options: ServeOptions) -> int:
    """Serve until stopped; the exit status."""
    if options.workers <= 1:
        run_worker(options)
        return 0
    _configure_logging(options.logging)
    try:
        listener = bind(options.host, options.port)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", options.host, options.port, exc)
        return STARTUP_FAILURE
    logger.info("listening on %s:%d", options.host, listener.getsockname()[1])
    with shared_metrics():
        worker = functools.partial(run_worker, options)
        return Supervisor(worker, listener, workers=options.workers, config_path=options.config_path).run()


def _configure_logging(spec: str) -> None:
    """Send the gateway's own logs (access, health, errors) to stderr, as text or JSON."""
    level_name, fmt, access = spec.split(":", 2)
    level = logging.getLevelName(level_name.upper())
    if not isinstance(level, int):
        level = logging.INFO
    handler = logging.StreamHandler()
    if fmt == "json":
        from ._logging import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("asgi_gateway")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    logging.getLogger("asgi_gateway.access").setLevel(logging.INFO if access == "on" else logging.WARNING)


# -- a worker ------------------------------------------------------------------------------


def run_worker(
    options: ServeOptions, listener: socket.socket | None = None, control: socket.socket | None = None
) -> None:
    """Build the gateway and serve it (on `listener` if given, else on host and port)."""
    # A SIGHUP before the server is up would end the process (its default action); keep it
    # for when the server can reload.
    early: list[int] = []
    if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda sig, frame: early.append(sig))
    _configure_logging(options.logging)
    from ._middleware import Gateway
    from ._otel_setup import configure_from_environment

    providers = configure_from_environment()
    try:
        gateway = Gateway(options.config_path, **providers)
    except ConfigError as exc:
        # The file was valid when `serve` started; it may have changed since (a worker started
        # again later reads it anew).
        logger.error("invalid config %s:\n%s", options.config_path, exc)
        sys.exit(STARTUP_FAILURE)
    # What exists now lives as long as the process: keeping it out of the collector's
    # generations spares the full collections that otherwise show in the tail latency (and
    # the gateway collects and freezes again after reloads).
    freeze_heap()
    config = uvicorn.Config(
        gateway,
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        access_log=False,
        lifespan="on",
        # The gateway applies `trusted_proxies` itself; uvicorn must not rewrite the client first.
        proxy_headers=False,
        # The upstream's Server header is relayed; uvicorn's own would make a second one.
        server_header=False,
        timeout_graceful_shutdown=_AFTER_DRAIN_GRACE,
    )
    server = GatewayServer(config, gateway, watch=options.watch, control=control, reload_pending=bool(early))
    server.run(sockets=[listener] if listener is not None else None)


class GatewayServer(uvicorn.Server):
    """A uvicorn server that reloads its gateway in-process and drains it before it exits.

    `serve()`'s shutdown is uvicorn's, preceded by the drain: on SIGTERM/SIGINT the gateway
    fails its readiness check and answers every response with `Connection: close` for
    `drain_delay` while still serving, then the listeners and idle connections close, then
    `gateway.drain(drain_timeout)` waits for the requests in flight and closes the WebSocket
    sessions with 1001, and only then does uvicorn shut down. A second SIGTERM/SIGINT exits at
    once. SIGHUP (and a change of the file, with `watch`) calls `gateway.reload()`.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        gateway: Any,
        *,
        watch: bool = False,
        control: socket.socket | None = None,
        reload_pending: bool = False,
    ) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.watch = watch
        self._control = control
        self._reload_pending = reload_pending
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._signalled = False
        self._stop_watching = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- uvicorn's hooks -------------------------------------------------------------------

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = signal.signal(signal.SIGHUP, self.handle_reload)
            try:
                yield
            finally:
                signal.signal(signal.SIGHUP, previous)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        loop = asyncio.get_running_loop()
        if self._control is not None:
            self._control.setblocking(False)
            loop.add_reader(self._control.fileno(), self._on_control)
            with contextlib.suppress(OSError):
                self._control.send(STARTED)
        if self.watch:
            path = Path(self.gateway.config_path)  # absolute: `serve` made it so
            self._spawn(watch_config(path, lambda: self._reload("config file changed"), self._stop_watching))
        if self._reload_pending:
            self._reload_pending = False
            self._reload("SIGHUP")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or not self.started:
            # Not serving yet: uvicorn's own handling (it stops once started).
            super().handle_exit(sig, frame)
            return
        # uvicorn raises the captured signals again once shut down, so a supervisor above
        # sees how the process ended.
        self._captured_signals.append(sig)
        name = signal.Signals(sig).name
        # Only a second signal means "exit now": a drain the supervisor asked for first is the
        # same stop delivered twice (systemd signals every process of the service, and the
        # supervisor passes it on).
        if self._signalled:
            self._exit_now(f"{name} again")
            return
        self._signalled = True
        if not self._drain_requested:
            self._drain_requested = True
            self._loop.call_soon_threadsafe(self._begin_drain, name)

    def handle_reload(self, sig: int, frame: FrameType | None) -> None:
        """SIGHUP: reload the config file on the event loop's thread."""
        if self._loop is None or not self.started:
            self._reload_pending = True
            return
        self._loop.call_soon_threadsafe(self._reload, "SIGHUP")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._stop_watching.set()
        if self._control is not None and self._loop is not None:
            self._loop.remove_reader(self._control.fileno())
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            # The watcher's thread sees `_stop_watching` within a step.
            await asyncio.wait(tasks, timeout=2.0)
        await super().shutdown(sockets)

    # -- reload ----------------------------------------------------------------------------

    def _reload(self, why: str) -> None:
        # In a task of its own: the gateway starts the new config's background work (health
        # checks) from it, which anyio can do only from inside a task, not from a callback.
        self._spawn(self._reload_now(why))

    async def _reload_now(self, why: str) -> None:
        logger.info("%s: reloading %s", why, self.gateway.config_path, extra={"reason": "reload"})
        try:
            self.gateway.reload()
        except ConfigError:
            # The gateway logged every error with its key path; the running config stays.
            pass
        except Exception:
            logger.exception("config reload failed", extra={"reason": "reload-failed"})

    # -- drain -----------------------------------------------------------------------------

    def _begin_drain(self, why: str) -> None:
        self._spawn(self._drain(why))

    async def _drain(self, why: str) -> None:
        gateway = self.gateway
        delay: float = gateway.config.drain_delay
        timeout: float = gateway.config.drain_timeout
        logger.info(
            "%s: draining (readiness fails for drain_delay %gs while serving, then up to drain_timeout %gs"
            " for the requests in flight)",
            why,
            delay,
            timeout,
            extra={"reason": "drain"},
        )
        try:
            gateway.start_draining()
            self._close_after_response()
            if delay > 0:
                await asyncio.sleep(delay)
            self._stop_accepting()
            await gateway.drain(timeout)
        except Exception:
            logger.exception("drain failed", extra={"reason": "drain-failed"})
        finally:
            self.should_exit = True

    def _close_after_response(self) -> None:
        """From now on every HTTP response says `Connection: close`.

        A client on a keep-alive connection (one a load balancer or kube-proxy keeps sending
        to after the readiness check failed) then closes it after its response and opens its
        next one where the balancer now sends it. Closing an idle keep-alive connection
        instead races with a request the client may be sending on it, and that one is lost.
        The app is swapped only now, so serving pays nothing for this before a drain.
        """
        app = self.config.loaded_app
        closing = _connection_close(app)
        self.config.loaded_app = closing
        for connection in list(self.server_state.connections):
            if getattr(connection, "app", None) is app:
                connection.app = closing  # type: ignore[union-attr]

    def _stop_accepting(self) -> None:
        """Close the listeners, and the HTTP connections with no request on them.

        Busy HTTP connections close after their response (uvicorn's `shutdown()` of them).
        WebSocket connections are left to `gateway.drain()`, which closes their sessions with
        1001; uvicorn's own `shutdown()` of them would send 1012.
        """
        for server in getattr(self, "servers", []):
            server.close()
        for connection in list(self.server_state.connections):
            if not type(connection).__module__.startswith("uvicorn.protocols.websockets"):
                connection.shutdown()

    def _exit_now(self, why: str) -> None:
        logger.warning("%s: exiting now", why, extra={"reason": "exit-now"})
        self.force_exit = True
        self.should_exit = True

    # -- the supervisor's commands -----------------------------------------------------------

    def _on_control(self) -> None:
        assert self._control is not None and self._loop is not None
        try:
            data = self._control.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(self._control.fileno())
            if not self._drain_requested:
                self._drain_requested = True
                self._begin_drain("the supervisor is gone")
            return
        for command in (data[i : i + 1] for i in range(len(data))):
            if command == RELOAD:
                self._reload("SIGHUP")
            elif command == DRAIN and not self._drain_requested:
                self._drain_requested = True
                self._begin_drain("drain (from the supervisor)")
            elif command == EXIT_NOW:
                self._exit_now("exit now (from the supervisor)")

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _connection_close(app: Any) -> Callable[..., Any]:
    """`app`, with `Connection: close` on each HTTP response (uvicorn then closes after it)."""

    async def closing(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_closing(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        await app(scope, receive, send_closing)

    return closing
