"""`serve --workers N`: N worker processes on one listening socket, tended by a supervisor.

The supervisor talks to its workers over a socket pair rather than with signals so that a signal
delivered to the whole process group (Ctrl+C in a terminal, systemd's stop) and the supervisor's
forwarding of it count as one, not as the "second signal" that means "exit now"; and so that a
worker notices its supervisor is gone (end of file) and drains instead of serving on as an orphan.
The worker's side of the conversation is `GatewayServer` in `_serve`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

from uvicorn.config import STARTUP_FAILURE

from ._config import load_config
from ._exceptions import ConfigError

__all__ = ["DRAIN", "EXIT_NOW", "RELOAD", "STARTED", "Supervisor", "bind", "shared_metrics"]

logger = logging.getLogger("asgi_gateway")

# One byte per command on a worker's control socket.
RELOAD = b"r"  # supervisor → worker: reload the config file
DRAIN = b"d"  # supervisor → worker: drain and exit
EXIT_NOW = b"x"  # supervisor → worker: exit at once
STARTED = b"s"  # worker → supervisor: serving

#: Past drain_delay + drain_timeout, the supervisor waits this long (s) for its workers to
#: exit before it kills them.
_SUPERVISOR_MARGIN = 10.0


@contextlib.contextmanager
def shared_metrics() -> Iterator[None]:
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


def bind(host: str, port: int) -> socket.socket:
    """The one listening socket every worker accepts on (each calls listen() on its copy)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


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
    SIGTERM/SIGINT as "drain", and a second one as "exit now". Each worker process runs
    `target(listener, control)`, `control` being its end of the socket pair; `target` is sent
    to a spawned process, so it must pickle (a module-level function, or a partial of one).
    `config_path` is read for the drain budget only: the workers load the config themselves.
    """

    def __init__(
        self,
        target: Callable[[socket.socket, socket.socket], None],
        listener: socket.socket,
        *,
        workers: int,
        config_path: str,
    ) -> None:
        self.target = target
        self.listener = listener
        self.workers = workers
        self.config_path = config_path
        self._slots = [_Slot() for _ in range(workers)]
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
        logger.info("supervisor [%d]: starting %d workers", os.getpid(), self.workers)
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
                logger.info("supervisor: SIGHUP: every worker reloads %s", self.config_path)
                self._read_drain_budget()
                self._send(RELOAD)
            elif self._draining_since is None:
                logger.info("supervisor: %s: the workers drain", signal.Signals(sig).name)
                self._draining_since = time.monotonic()
                # The workers' copies keep the socket listening until each has drained; this
                # one must not keep it open (and queuing connections) after the last has.
                self.listener.close()
                self._send(DRAIN)
            else:
                logger.warning("supervisor: %s again: the workers exit now", signal.Signals(sig).name)
                self._send(EXIT_NOW)

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
            target=self.target, args=(self.listener, theirs), name="asgi-gateway worker"
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
                if STARTED in data:
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
                    worker.control.send(EXIT_NOW)
            worker.process.join(10.0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5.0)
            worker.control.close()
            slot.worker = None

    def _read_drain_budget(self) -> None:
        """How long the workers may take to drain: the file's drain_delay + drain_timeout."""
        try:
            config = load_config(self.config_path)
        except ConfigError:
            return  # the workers say why; keep the last known numbers
        self._drain_budget = config.drain_delay + config.drain_timeout
