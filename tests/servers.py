"""Real servers for the tests: upstream subprocesses, in-process gateways, a raw HTTP client.

- `UpstreamProcess`: `tests/upstream_app.py` under uvicorn in a subprocess on 127.0.0.1, with
  kill/terminate/stop/cont/restart and its admin endpoints (`stats`, `reset`, `fail`, ...).
- `GatewayServer` / `serve_app(app)`: any ASGI app under uvicorn in a background thread with its
  own event loop; `serve_app` is a context manager yielding the base URL.
- `RawConnection` / `raw_request`: send exact bytes, parse the response with h11 and say whether
  it ended cleanly (`complete`) or the connection was cut mid-body.
- `ScriptedServer(script)`: a raw TCP server playing `script(conn, n)` on each connection, for
  exact bytes and failures at exact points (`read_head`, `reset_close` help).
- `wait_until(predicate, timeout)`: poll with a deadline instead of sleeping and hoping.

Nothing here imports asgi_gateway at module level, so helpers can import it before the
package exists.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

import h11
import httpx

__all__ = [
    "HOST",
    "UPSTREAM_APP",
    "BrokenServer",
    "FileGateway",
    "GatewayServer",
    "RawConnection",
    "RawResponse",
    "ScriptedServer",
    "UpstreamProcess",
    "Upstreams",
    "free_port",
    "http_client",
    "make_host_app",
    "transport_kwargs",
    "raw_request",
    "read_head",
    "reset_close",
    "serve_app",
    "start_upstreams",
    "wait_until",
]

HOST = "127.0.0.1"
TESTS_DIR = Path(__file__).resolve().parent
UPSTREAM_APP = TESTS_DIR / "upstream_app.py"

T = TypeVar("T")


def free_port() -> int:
    """A port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def listening_socket(backlog: int) -> socket.socket:
    """A TCP socket listening on HOST (any free port), whose accept() wakes every 0.1 s."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, 0))
    listener.listen(backlog)
    listener.settimeout(0.1)
    return listener


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str = "condition",
) -> T:
    """Call `predicate` until it returns something truthy; return that, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    last: T = predicate()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message} (last value: {last!r})")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.1)
        last = predicate()
    return last


_SSL_CONTEXT: Any = None


def http_client(base_url: str = "", *, timeout: float | httpx.Timeout = 10.0, **kwargs: Any) -> httpx.Client:
    """An `httpx.Client` that skips loading the CA bundle again (about 0.1 s per client)."""
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    kwargs.setdefault("verify", _SSL_CONTEXT)
    return httpx.Client(base_url=base_url, timeout=timeout, **kwargs)


# -- upstream subprocesses ---------------------------------------------------------------

# Strong references: a process nobody closed must still be killed at exit.
_LIVE: set[UpstreamProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    for upstream in list(_LIVE):
        upstream.close()


class UpstreamStartError(RuntimeError):
    pass


class UpstreamProcess:
    """`tests/upstream_app.py` under uvicorn in a subprocess on 127.0.0.1.

    Use as a context manager or call `start()` and `close()`. The port is chosen here (and
    re-chosen if the child loses the race for it) and kept across `restart()`.
    """

    def __init__(self, name: str, port: int | None = None, *, ready_timeout: float = 20.0) -> None:
        self.name = name
        self.host = HOST
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix=f"upstream-{name}-", suffix=".log", delete=False)
        self._stopped = False
        _LIVE.add(self)

    # -- lifecycle --

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def __repr__(self) -> str:
        return f"UpstreamProcess({self.name!r}, {self.url!r}, pid={self.pid})"

    def __enter__(self) -> UpstreamProcess:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self, wait: bool = True) -> UpstreamProcess:
        """Start the process (retrying on a port collision unless the port was fixed)."""
        for attempt in range(5):
            self._spawn()
            if not wait:
                return self
            try:
                self.wait_ready()
                return self
            except UpstreamStartError:
                self._reap()
                if self._fixed_port or attempt == 4:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        env = {**os.environ, "UPSTREAM_NAME": self.name, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(UPSTREAM_APP), "--port", str(self.port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            cwd=str(TESTS_DIR),
        )
        self._stopped = False

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        while True:
            if self.process is None or self.process.poll() is not None:
                raise UpstreamStartError(f"{self!r} exited at start-up:\n{self.log_text()[-2000:]}")
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=1.0)
                try:
                    conn.request("GET", "/__admin/ping")
                    response = conn.getresponse()
                    if response.status == 200 and response.read() == b"pong":
                        return
                finally:
                    conn.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise UpstreamStartError(f"{self!r} not ready after {timeout or self.ready_timeout}s")
            time.sleep(0.02)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _signal(self, sig: signal.Signals) -> None:
        if self.is_running():
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def _reap(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the server vanishes at once; its port refuses connections."""
        self._signal(signal.SIGKILL)
        self._reap()
        self._stopped = False

    def terminate(self) -> None:
        """SIGTERM: uvicorn's graceful shutdown."""
        if self._stopped:
            self.cont()
        self._signal(signal.SIGTERM)
        self._reap()

    def stop(self) -> None:
        """SIGSTOP: the port still accepts connections (kernel backlog) but nothing answers."""
        self._signal(signal.SIGSTOP)
        self._stopped = True

    def cont(self) -> None:
        """SIGCONT after `stop()`."""
        self._signal(signal.SIGCONT)
        self._stopped = False

    def restart(self) -> None:
        """Kill the process if it runs, then start it again on the same port and wait until ready."""
        if self.is_running():
            if self._stopped:
                self.cont()
            self.kill()
        self._spawn()
        try:
            self.wait_ready()
        except UpstreamStartError:
            # The old socket may linger a moment; one more try on the same port.
            self._reap()
            self._spawn()
            self.wait_ready()

    def ensure_running(self) -> None:
        """Undo whatever a test did to the process: continue it, or restart it if it died."""
        if self._stopped:
            self.cont()
        if not self.is_running():
            self.restart()

    def close(self) -> None:
        """Stop the process for good (whatever its state) and remove its log."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
                self.process.kill()
            self._reap()
        self._stopped = False
        with contextlib.suppress(OSError):
            self._log.close()
            os.unlink(self._log.name)
        _LIVE.discard(self)

    def log_text(self) -> str:
        try:
            return Path(self._log.name).read_text(errors="replace")
        except OSError:
            return ""

    # -- admin endpoints --

    def admin(self, op: str, timeout: float = 5.0, **params: Any) -> dict[str, Any]:
        """GET /__admin/<op>?params on this server, JSON decoded."""
        target = f"/__admin/{op}"
        if params:
            target += "?" + urlencode({k: v for k, v in params.items() if v is not None})
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", target)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise AssertionError(f"{self.name} admin {op}: {response.status} {body!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    def stats(self) -> dict[str, Any]:
        """`{requests: {op: n}, disconnects: {op: n}, in_flight: {op: n}, completed: {op: n}, total}`."""
        return self.admin("stats")

    def reset(self) -> None:
        """Zero the counters, fail mode off, health on."""
        self.admin("reset")

    def fail(
        self,
        status: int = 503,
        *,
        count: int | None = None,
        retry_after: int | None = None,
        mode: str = "status",
    ) -> None:
        """Answer `status` to every request (or the next `count`); `mode="hang"` hangs them."""
        self.admin("fail", status=status, count=count, retry_after=retry_after, mode=mode)

    def fail_off(self) -> None:
        self.admin("fail", mode="off")

    def set_healthy(self, ok: bool) -> None:
        """What `/healthz` answers: 200 or 503."""
        self.admin("health", ok=1 if ok else 0)

    def release(self, key: str, n: int = 1) -> None:
        """Let `n` more gated SSE events of `key` go."""
        self.admin("release", key=key, n=n)

    def requests(self, op: str = "echo") -> int:
        return int(self.stats()["requests"].get(op, 0))

    def disconnects(self, op: str) -> int:
        return int(self.stats()["disconnects"].get(op, 0))

    def wait_disconnects(self, op: str, count: int = 1, timeout: float = 10.0) -> int:
        """Poll stats until `op` has seen at least `count` client disconnects."""
        return wait_until(
            lambda: self.disconnects(op) >= count and self.disconnects(op),
            timeout,
            message=f"{self.name} to see {count} disconnect(s) on {op!r}",
        )


@dataclass(frozen=True)
class Upstreams:
    """The three session upstreams: `.u1`, `.u2`, `.u3`, iterable, indexable by name."""

    u1: UpstreamProcess
    u2: UpstreamProcess
    u3: UpstreamProcess

    def __iter__(self) -> Iterator[UpstreamProcess]:
        return iter((self.u1, self.u2, self.u3))

    def __getitem__(self, name: str) -> UpstreamProcess:
        return {"u1": self.u1, "u2": self.u2, "u3": self.u3}[name]

    def by_name(self) -> dict[str, UpstreamProcess]:
        return {upstream.name: upstream for upstream in self}

    def reset(self) -> None:
        """Make every one run again and forget what earlier tests did to it."""
        for upstream in self:
            upstream.ensure_running()
            upstream.reset()


def start_upstreams(*names: str) -> list[UpstreamProcess]:
    """Start several upstreams at once (spawn all, then wait for all)."""
    upstreams = [UpstreamProcess(name) for name in names]
    try:
        for upstream in upstreams:
            upstream.start(wait=False)
        for upstream in upstreams:
            try:
                upstream.wait_ready()
            except UpstreamStartError:
                upstream._reap()
                upstream.port = free_port()
                upstream.start()
    except BaseException:
        for upstream in upstreams:
            upstream.close()
        raise
    return upstreams


# -- in-process servers for ASGI apps ----------------------------------------------------


class GatewayServer:
    """Run any ASGI app under uvicorn in a background thread with its own event loop.

    The listening socket is bound here on 127.0.0.1 (port 0 unless given) and handed to
    uvicorn, so there is no port race. `uvicorn_kwargs` go to `uvicorn.Config`.
    """

    def __init__(
        self, app: Any, port: int = 0, *, startup_timeout: float = 20.0, **uvicorn_kwargs: Any
    ) -> None:
        import uvicorn

        self.app = app
        self.startup_timeout = startup_timeout
        options: dict[str, Any] = {
            "host": HOST,
            "port": port,
            "lifespan": "on",
            "log_level": "warning",
            "access_log": False,
            "timeout_graceful_shutdown": 2,
            # The gateway's own trusted_proxies decide about X-Forwarded-*; uvicorn's proxy
            # headers (on by default for 127.0.0.1) would rewrite the client address first.
            "proxy_headers": False,
            # uvicorn's default ("auto": uvloop when installed) is what users run; the variable
            # lets a run pin "asyncio" or "uvloop" to compare.
            "loop": os.environ.get("GATEWAY_TEST_LOOP", "auto"),
        }
        options.update(uvicorn_kwargs)
        self.config = uvicorn.Config(app, **options)
        self.server = uvicorn.Server(self.config)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((HOST, port))
        self.port: int = self.socket.getsockname()[1]
        self.thread = threading.Thread(target=self._run, name=f"gateway-server-{self.port}", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except BaseException as exc:
            self.error = exc

    def start(self) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the app under test failed to start on {self.url}: {self.error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the app under test did not start within {self.startup_timeout}s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout)
        with contextlib.suppress(OSError):
            self.socket.close()
        if self.thread.is_alive():
            raise RuntimeError(f"the server on {self.url} did not shut down within {2 * timeout}s")

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class FileGateway:
    """A `Gateway` built from a JSON config file (so `reload()` re-reads it), under uvicorn in a
    thread of this process: a test can write the file, reload, and look at the gateway's objects."""

    def __init__(self, path: Path, cfg: dict[str, Any], **kwargs: Any) -> None:
        import asyncio

        from asgi_gateway import Gateway

        self.path = path
        self.write(cfg)
        self.gateway = Gateway(str(path), **kwargs)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server = GatewayServer(self._app, interface="asgi3")

    async def _app(self, scope: Any, receive: Any, send: Any) -> None:
        import asyncio

        self.loop = asyncio.get_running_loop()
        await self.gateway(scope, receive, send)

    async def in_gateway(self, coroutine: Any) -> Any:
        """Run `coroutine` on the gateway's own event loop; wait for its result here."""
        import asyncio

        assert self.loop is not None
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return await asyncio.wrap_future(future)

    def write(self, cfg: dict[str, Any]) -> None:
        self.path.write_text(json.dumps(cfg))

    @property
    def url(self) -> str:
        return self.server.url

    def pool(self) -> Any:
        """The built-in pool the gateway opened."""
        return self.gateway._transport._inner


@contextlib.contextmanager
def serve_app(app: Any, port: int = 0, **uvicorn_kwargs: Any) -> Iterator[str]:
    """Serve `app` under uvicorn in a background thread; yield its base URL."""
    with GatewayServer(app, port, **uvicorn_kwargs) as server:
        yield server.url


def transport_kwargs(kind: str) -> dict[str, Any]:
    """Gateway keyword arguments selecting a built-in transport: "pool" (the default) or "httpx"."""
    if kind == "httpx":
        import httpx

        return {"transport": httpx.AsyncHTTPTransport()}
    return {}


def make_host_app(config: Any, **gateway_kwargs: Any) -> Any:
    """A Starlette app with its own routes, wrapped by `GatewayMiddleware(config=..., **kwargs)`.

    Local routes: `/local` answers "local"; anything else falls to a catch-all that answers
    JSON `{"host_app": true, method, path, raw_path, query_string, headers}`, so a test can
    prove an unmatched request reached the host app untouched.
    """
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from asgi_gateway import GatewayMiddleware

    async def local(request: Request) -> Response:
        return PlainTextResponse("local")

    async def catch_all(request: Request) -> Response:
        body = await request.body()
        scope = request.scope
        return JSONResponse(
            {
                "host_app": True,
                "method": request.method,
                "path": scope["path"],
                "raw_path": (scope.get("raw_path") or b"").decode("latin-1"),
                "query_string": scope.get("query_string", b"").decode("latin-1"),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
                "body_length": len(body),
            }
        )

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(
        routes=[
            Route("/local", local, methods=methods),
            Route("/{path:path}", catch_all, methods=methods),
        ],
        middleware=[Middleware(GatewayMiddleware, config=config, **gateway_kwargs)],
    )


def read_head(conn: socket.socket, limit: int = 1 << 20) -> bytes:
    """Read from `conn` until a blank line ends a request head: that head and whatever came with
    it; b"" if the peer closed first."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < limit:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    return data


def reset_close(conn: socket.socket) -> None:
    """Close `conn` with a TCP RST instead of a FIN (SO_LINGER 0)."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def answer_each(response: bytes) -> Callable[[socket.socket, int], None]:
    """A `ScriptedServer` script answering every request head on the connection with `response`."""

    def script(conn: socket.socket, number: int) -> None:
        while read_head(conn):
            conn.sendall(response)

    return script


class ScriptedServer:
    """A TCP server on 127.0.0.1 that plays `script(conn, number)` on each connection it accepts.

    For exact bytes and failures at exact points of an exchange: the script reads and writes
    the raw socket (`read_head`, `reset_close` help), each connection in a thread of its own so a
    script may wait on an event the test sets. `connections` counts the accepted connections;
    `errors` keeps what a script raised other than OSError, for the test to check. On exit every
    connection still open is closed (a script blocked on it then gets an OSError).
    """

    def __init__(self, script: Callable[[socket.socket, int], None], *, timeout: float = 10.0) -> None:
        self.script = script
        self.timeout = timeout
        self.listener = listening_socket(64)
        self.port: int = self.listener.getsockname()[1]
        self.connections = 0
        self.errors: list[BaseException] = []
        self._open: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"scripted-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _serve(self) -> None:
        while not self._done.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.settimeout(self.timeout)
            self._open.append(conn)
            thread = threading.Thread(
                target=self._play,
                args=(conn, self.connections),
                name=f"scripted-{self.port}-{self.connections}",
            )
            thread.daemon = True
            self._threads.append(thread)
            thread.start()

    def _play(self, conn: socket.socket, number: int) -> None:
        try:
            self.script(conn, number)
        except OSError:
            pass
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join(5)
        self.listener.close()
        for conn in self._open:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        for thread in self._threads:
            thread.join(5)


class BrokenServer(ScriptedServer):
    """A TCP server on 127.0.0.1 that misbehaves in one way, for the error paths.

    Modes, applied to every connection after it has read the request head:
    - "close": close the connection without a byte;
    - "reset": abort it with a TCP RST (SO_LINGER 0);
    - "garbage": answer bytes that are not HTTP, then close;
    - "silent": keep the connection open and never answer (until the server stops).
    """

    def __init__(self, mode: str) -> None:
        if mode not in ("close", "reset", "garbage", "silent"):
            raise ValueError(mode)
        self.mode = mode
        super().__init__(self._misbehave, timeout=2.0)

    def _misbehave(self, conn: socket.socket, number: int) -> None:
        read_head(conn)
        if self.mode == "silent":
            self._done.wait()
        elif self.mode == "reset":
            reset_close(conn)
        elif self.mode == "garbage":
            conn.sendall(b"THIS IS NOT HTTP\r\n\r\n")


# -- raw HTTP ------------------------------------------------------------------------------


@dataclass
class RawResponse:
    """A response read off a raw socket."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    #: True when the body ended as framed (Content-Length reached / last chunk seen).
    complete: bool
    #: Why it did not complete, if it did not.
    error: str | None = None
    http_version: bytes = b"1.1"
    extra: dict[str, Any] = field(default_factory=dict)

    def header(self, name: str | bytes) -> bytes | None:
        key = name.lower().encode() if isinstance(name, str) else name.lower()
        for k, v in self.headers:
            if k == key:
                return v
        return None

    def header_list(self, name: str | bytes) -> list[bytes]:
        key = name.lower().encode() if isinstance(name, str) else name.lower()
        return [v for k, v in self.headers if k == key]

    def json(self) -> Any:
        return json.loads(self.body)


class RawConnection:
    """A plain socket to a server: send exact bytes, read one response with h11."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._parser = h11.Connection(h11.CLIENT)
        self._request_method: bytes = b"GET"

    @classmethod
    def to(cls, url: str, timeout: float = 10.0) -> RawConnection:
        parts = urlsplit(url)
        return cls(parts.hostname or HOST, parts.port or 80, timeout)

    def send(self, data: bytes) -> None:
        """Send `data` as is. The request line's method is remembered (HEAD has no body)."""
        if data[:5].upper() == b"HEAD ":
            self._request_method = b"HEAD"
        self.sock.sendall(data)

    def _feed_request_to_parser(self) -> None:
        # h11 needs to have "sent" a request before it parses a response; the bytes on the
        # wire were written by hand, so tell it a matching request without body.
        if self._parser.our_state is h11.DONE and self._parser.their_state is h11.DONE:
            self._parser.start_next_cycle()
        self._parser.send(
            h11.Request(
                method=self._request_method, target=b"/", headers=[(b"host", b"x"), (b"content-length", b"0")]
            )
        )
        self._parser.send(h11.EndOfMessage())

    def read_response(self, max_body: int | None = None) -> RawResponse:
        """Read one response. An early close yields `complete=False` instead of raising."""
        self._feed_request_to_parser()
        head: h11.Response | None = None
        body = bytearray()
        error: str | None = None
        complete = False
        while True:
            try:
                event = self._parser.next_event()
            except h11.RemoteProtocolError as exc:
                error = f"protocol error: {exc}"
                break
            if event is h11.NEED_DATA:
                try:
                    data = self.sock.recv(65536)
                except (ConnectionResetError, BrokenPipeError) as exc:
                    error = f"connection reset: {exc}"
                    break
                except TimeoutError:
                    error = "timed out"
                    break
                self._parser.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if max_body is not None and len(body) >= max_body:
                    break
            elif isinstance(event, h11.EndOfMessage):
                complete = True
                break
            elif isinstance(event, h11.ConnectionClosed):
                error = "connection closed"
                break
        if head is None:
            raise ConnectionError(f"no response head ({error}); got {bytes(body)!r}")
        return RawResponse(
            status=head.status_code,
            headers=[(bytes(k), bytes(v)) for k, v in head.headers.raw_items()],
            body=bytes(body),
            complete=complete,
            error=error,
            http_version=head.http_version,
        )

    def read_until_closed(self, limit: int = 1 << 24) -> bytes:
        """Every byte until the server closes (or `limit`)."""
        data = bytearray()
        while len(data) < limit:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def raw_request(
    url: str,
    data: bytes | None = None,
    *,
    method: str = "GET",
    target: str | bytes = "/",
    headers: Mapping[str, str] | list[tuple[str, str]] | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
) -> RawResponse:
    """Send one request over a fresh socket and read the response.

    Either pass `data` (the exact bytes to send) or let it build
    `METHOD target HTTP/1.1` with Host, the given headers, Content-Length (when there is a body)
    and `Connection: close`.
    """
    parts = urlsplit(url)
    if data is None:
        raw_target = target if isinstance(target, bytes) else target.encode("latin-1")
        pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers or [])
        names = {k.lower() for k, _ in pairs}
        lines = [method.encode() + b" " + raw_target + b" HTTP/1.1"]
        if "host" not in names:
            lines.append(b"Host: " + (parts.netloc or HOST).encode())
        lines += [f"{k}: {v}".encode("latin-1") for k, v in pairs]
        if body and "content-length" not in names and "transfer-encoding" not in names:
            lines.append(b"Content-Length: " + str(len(body)).encode())
        if "connection" not in names:
            lines.append(b"Connection: close")
        data = b"\r\n".join(lines) + b"\r\n\r\n" + body
    with RawConnection(parts.hostname or HOST, parts.port or 80, timeout) as conn:
        conn.send(data)
        return conn.read_response()
