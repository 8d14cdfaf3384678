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
The supervisor talks to its workers over a socket pair rather than with signals so that a signal
delivered to the whole process group (Ctrl+C in a terminal, systemd's stop) and the supervisor's
forwarding of it count as one, not as the "second signal" that means "exit now"; and so that a
worker notices its supervisor is gone (end of file) and drains instead of serving on as an orphan.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import multiprocessing
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from ._config import load_config
from ._exceptions import ConfigError

__all__ = ["GatewayServer", "ServeOptions", "Supervisor", "run_worker", "serve"]

logger = logging.getLogger("asgi_gateway")

# One byte per command on a worker's control socket.
_RELOAD = b"r"  # supervisor → worker: reload the config file
_DRAIN = b"d"  # supervisor → worker: drain and exit
_EXIT_NOW = b"x"  # supervisor → worker: exit at once
_STARTED = b"s"  # worker → supervisor: serving

#: --watch: reload once the directory has been quiet this long (ms), at most this late (ms).
_WATCH_STEP_MS = 200
_WATCH_DEBOUNCE_MS = 1600

#: uvicorn's own wait for the tasks left once `gateway.drain()` has returned (s): the drain
#: already waited `drain_timeout` for them, so what is left now is cancelled soon.
_AFTER_DRAIN_GRACE = 1

#: Past drain_delay + drain_timeout, the supervisor waits this long (s) for its workers to
#: exit before it kills them.
_SUPERVISOR_MARGIN = 10.0


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
        listener = _bind(options.host, options.port)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", options.host, options.port, exc)
        return STARTUP_FAILURE
    logger.info("listening on %s:%d", options.host, listener.getsockname()[1])
    with _shared_metrics():
        return Supervisor(options, listener).run()


@contextlib.contextmanager
def _shared_metrics() -> Iterator[None]:
    """Let `{admin.path}/metrics`, whichever worker answers, sum every worker's counters:
    prometheus_client's multiprocess mode, in a directory of this supervisor's own (unless
    the environment names one already)."""
    from ._prometheus import MULTIPROC_DIR

    if os.environ.get(MULTIPROC_DIR):
        yield
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="asgi-gateway-metrics-") as directory:
        os.environ[MULTIPROC_DIR] = directory
        try:
            yield
        finally:
            del os.environ[MULTIPROC_DIR]


def _forget_gauges(pid: int | None) -> None:
    """A dead worker's open WebSocket sessions are open no more (its counts stay counted)."""
    from ._prometheus import MULTIPROC_DIR

    directory = os.environ.get(MULTIPROC_DIR)
    if pid is None or not directory:
        return
    with contextlib.suppress(ImportError, OSError):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def _bind(host: str, port: int) -> socket.socket:
    """The one listening socket every worker accepts on (each calls listen() on its copy)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _configure_logging(spec: str) -> None:
    """Send the gateway's own logs (access, health, errors) to stderr, as text or JSON."""
    level_name, fmt, access = spec.split(":", 2)
    level = logging.getLevelName(level_name.upper())
    if not isinstance(level, int):
        level = logging.INFO
    handler = logging.StreamHandler()
    if fmt == "json":
        from ._telemetry import JsonFormatter

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
    # generations spares the full collections that otherwise show in the tail latency.
    gc.collect()
    gc.freeze()
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
                self._control.send(_STARTED)
        if self.watch:
            self._spawn(self._watch_config())
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
            return
        except Exception:
            logger.exception("config reload failed", extra={"reason": "reload-failed"})
            return
        # The state built at start-up was frozen out of the collector (`run_worker`); let a
        # collection see the replaced one, then freeze what is live now. Without this the
        # old state's reference cycles would stay frozen, and so uncollected, for good.
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    async def _watch_config(self) -> None:
        """Reload when the config file's content changes (--watch).

        The directories are watched, not the file: editors save by writing a new file and
        renaming it over the old one, and a Kubernetes ConfigMap volume swaps a `..data`
        symlink, so the file's own inode may never change. Any change in them counts only
        if the file's bytes differ from what was last seen.
        """
        from watchfiles import awatch

        path = Path(self.gateway.config_path)  # absolute: `serve` made it so
        last = _digest(path)
        while not self._stop_watching.is_set():
            watched = _watched_dirs(path)
            try:
                async for _ in awatch(
                    *watched,
                    watch_filter=None,
                    recursive=False,
                    step=_WATCH_STEP_MS,
                    debounce=_WATCH_DEBOUNCE_MS,
                    stop_event=self._stop_watching,
                ):
                    digest = _digest(path)
                    if digest is not None and digest != last:
                        last = digest
                        self._reload("config file changed")
                    if _watched_dirs(path) != watched:
                        break  # the file now resolves elsewhere: watch there
            except Exception as exc:
                # A watched directory that went away, too many inotify watches, ...: keep serving
                # (SIGHUP still reloads) and try again.
                logger.error(
                    "cannot watch %s: %s; trying again in 5s", path, exc, extra={"reason": "watch-failed"}
                )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop_watching.wait(), 5.0)

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
            if command == _RELOAD:
                self._reload("SIGHUP")
            elif command == _DRAIN and not self._drain_requested:
                self._drain_requested = True
                self._begin_drain("drain (from the supervisor)")
            elif command == _EXIT_NOW:
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


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None  # mid-swap, or gone: nothing to reload yet


def _watched_dirs(path: Path) -> tuple[str, ...]:
    """The file's directory and, for a symlink to elsewhere, its target's directory.

    A target inside the file's own directory tree (a ConfigMap's `..2024_…/gateway.yaml`) is
    not watched: that directory is replaced on each update, while the rename of `..data`
    shows in the file's directory.
    """
    here = path.parent
    there = Path(os.path.realpath(path)).parent
    if there == here or here in there.parents:
        return (str(here),)
    return (str(here), str(there))


# -- the supervisor ------------------------------------------------------------------------


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    control: socket.socket
    started_at: float
    serving: bool = False
    eof: bool = False


@dataclass
class _Slot:
    worker: _Worker | None = None
    not_before: float = 0.0
    failures: int = 0


class Supervisor:
    """N worker processes serving one listening socket; restarts those that die.

    SIGHUP is passed on as "reload" (each worker reloads in-process: nothing restarts);
    SIGTERM/SIGINT as "drain", and a second one as "exit now".
    """

    def __init__(self, options: ServeOptions, listener: socket.socket) -> None:
        self.options = options
        self.listener = listener
        self._slots = [_Slot() for _ in range(options.workers)]
        self._signals: list[int] = []
        self._draining_since: float | None = None
        self._ever_served = False
        self._drain_budget = 30.0

    def run(self) -> int:
        self._read_drain_budget()
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        handled = [signal.SIGHUP, signal.SIGINT, signal.SIGTERM]
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        # A signal then wakes the select() below at once.
        previous_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        logger.info("supervisor [%d]: starting %d workers", os.getpid(), self.options.workers)
        try:
            return self._loop(wake_r)
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()
            with contextlib.suppress(OSError):
                self.listener.close()

    def _loop(self, wake: socket.socket) -> int:
        while True:
            self._handle_signals()
            status = self._tend_workers()
            if status is not None:
                return status
            controls = [
                slot.worker.control for slot in self._slots if slot.worker is not None and not slot.worker.eof
            ]
            readable, _, _ = select.select([wake, *controls], [], [], 0.5)
            for sock in readable:
                if sock is wake:
                    with contextlib.suppress(OSError):
                        wake.recv(4096)
                else:
                    self._read_control(sock)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        # Handled in the loop, where the worker list is not being changed.
        self._signals.append(sig)

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if sig == signal.SIGHUP:
                logger.info("supervisor: SIGHUP: every worker reloads %s", self.options.config_path)
                self._read_drain_budget()
                self._send(_RELOAD)
            elif self._draining_since is None:
                logger.info("supervisor: %s: the workers drain", signal.Signals(sig).name)
                self._draining_since = time.monotonic()
                # The workers' copies keep the socket listening until each has drained; this
                # one must not keep it open (and queuing connections) after the last has.
                self.listener.close()
                self._send(_DRAIN)
            else:
                logger.warning("supervisor: %s again: the workers exit now", signal.Signals(sig).name)
                self._send(_EXIT_NOW)

    def _tend_workers(self) -> int | None:
        """Reap the workers that exited and start their replacements; the status to exit with."""
        now = time.monotonic()
        for slot in self._slots:
            worker = slot.worker
            if worker is None or worker.process.is_alive():
                continue
            worker.process.join()
            worker.control.close()
            slot.worker = None
            _forget_gauges(worker.process.pid)
            if self._draining_since is not None:
                continue
            code = worker.process.exitcode
            if not worker.serving and not self._ever_served:
                # Broken from the start (the app, the config): every new one would fail alike.
                logger.error("worker [%s] failed to start (exit code %s)", worker.process.pid, code)
                self._stop_all()
                return STARTUP_FAILURE
            # One that keeps dying soon after it started is started again ever later.
            lived = now - worker.started_at
            slot.failures = 0 if worker.serving and lived > 10 else slot.failures + 1
            slot.not_before = now + min(30.0, 0.5 * (2**slot.failures - 1))
            logger.error("worker [%s] exited (code %s); starting another", worker.process.pid, code)
        if self._draining_since is not None:
            if all(slot.worker is None for slot in self._slots):
                return 0
            if now > self._draining_since + self._drain_budget + _SUPERVISOR_MARGIN:
                logger.error("supervisor: workers still running past the drain time; killing them")
                self._stop_all(kill=True)
            return None
        for slot in self._slots:
            if slot.worker is None and now >= slot.not_before:
                slot.worker = self._start()
        return None

    def _start(self) -> _Worker:
        ours, theirs = socket.socketpair()
        context = multiprocessing.get_context("spawn")
        process = context.Process(
            target=run_worker, args=(self.options, self.listener, theirs), name="asgi-gateway worker"
        )
        process.start()
        theirs.close()
        ours.setblocking(False)
        return _Worker(process, ours, time.monotonic())

    def _read_control(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        for slot in self._slots:
            worker = slot.worker
            if worker is not None and worker.control is sock:
                if _STARTED in data:
                    worker.serving = True
                    self._ever_served = True
                # End of file: the worker is exiting; its process is reaped in the loop.
                worker.eof = not data

    def _send(self, command: bytes) -> None:
        for slot in self._slots:
            if slot.worker is not None:
                with contextlib.suppress(OSError):
                    slot.worker.control.send(command)

    def _stop_all(self, kill: bool = False) -> None:
        for slot in self._slots:
            worker = slot.worker
            if worker is None:
                continue
            if kill:
                worker.process.kill()
            else:
                with contextlib.suppress(OSError):
                    worker.control.send(_EXIT_NOW)
            worker.process.join(10.0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5.0)
            worker.control.close()
            slot.worker = None

    def _read_drain_budget(self) -> None:
        """How long the workers may take to drain: the file's drain_delay + drain_timeout."""
        try:
            config = load_config(self.options.config_path)
        except ConfigError:
            return  # the workers say why; keep the last known numbers
        self._drain_budget = config.drain_delay + config.drain_timeout
