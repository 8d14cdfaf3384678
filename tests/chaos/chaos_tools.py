"""Tools for the chaos and security suites: a real gateway process, a scripted misbehaving
upstream, an upstream that counts its requests across SIGKILLs, a bounded load loop, resource
snapshots with a leak check, and the recovery-time record.

Import as `from chaos.chaos_tools import ...` (tests/ is on sys.path; tests/chaos is a
namespace package), so every module shares one copy of the record.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import psutil  # type: ignore[import-untyped]
import servers
from servers import HOST, TESTS_DIR, RawResponse, UpstreamProcess, free_port, wait_until

CHAOS_DIR = Path(__file__).resolve().parent
MiB = 1024 * 1024

# -- the gateway process -------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The gateway process's resources at one moment (tasks and pool seen from inside)."""

    rss: int
    fds: int
    tasks: int
    pool: dict[str, int]
    in_flight: dict[str, int]
    servers_in_flight: int
    #: TCP sockets of the process by state (psutil's names: ESTABLISHED, CLOSE_WAIT, ...).
    tcp: dict[str, int]
    #: Sockets to anything but the gateway's own listening port (upstream connections).
    outbound: int
    #: Client connections to the gateway's port, open on its side.
    inbound: int

    def describe(self) -> str:
        return (
            f"rss={self.rss / MiB:.1f}MiB fds={self.fds} tasks={self.tasks} pool={self.pool} "
            f"in_flight={self.in_flight} servers_in_flight={self.servers_in_flight} tcp={self.tcp} "
            f"outbound={self.outbound} inbound={self.inbound}"
        )


class GatewayProcess:
    """A real gateway in a subprocess on 127.0.0.1.

    `mode="app"` runs `chaos_app:make_app` (GatewayMiddleware around a host app with
    `/__chaos/state`) under `python -m uvicorn` with the given `http` implementation;
    `mode="cli"` runs the project's own `asgi-gateway serve` command.
    """

    def __init__(self, config: dict[str, Any], *, mode: str = "app", http: str = "auto") -> None:
        self.config = config
        self.mode = mode
        self.http = http
        self.port = free_port()
        handle, name = tempfile.mkstemp(prefix="chaos-gateway-", suffix=".json")
        with os.fdopen(handle, "w") as file:
            json.dump(config, file)
        self.config_path = Path(name)
        self._log = tempfile.NamedTemporaryFile(prefix="chaos-gateway-", suffix=".log", delete=False)
        self.process: subprocess.Popen[bytes] | None = None
        self._ps: psutil.Process | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _command(self) -> list[str]:
        if self.mode == "cli":
            return [
                sys.executable,
                "-m",
                "asgi_gateway",
                "serve",
                str(self.config_path),
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ]
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "chaos_app:make_app",
            "--factory",
            "--app-dir",
            str(CHAOS_DIR),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--http",
            self.http,
            "--no-proxy-headers",
            "--no-access-log",
            "--log-level",
            "warning",
            "--lifespan",
            "on",
            "--timeout-graceful-shutdown",
            "2",
        ]

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        for attempt in range(3):
            env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
            env.update({"CHAOS_GATEWAY_CONFIG": str(self.config_path), "PYTHONUNBUFFERED": "1"})
            self.process = subprocess.Popen(
                self._command(),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                cwd=str(TESTS_DIR),
            )
            self._ps = psutil.Process(self.process.pid)
            if self._wait_ready(timeout):
                return self
            self._stop_process()
            if attempt < 2:
                self.port = free_port()  # lost the race for the port, most likely
        raise RuntimeError(f"the gateway process did not start:\n{self.log_text()[-3000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
                try:
                    conn.request("GET", "/__chaos/state")
                    response = conn.getresponse()
                    response.read()
                    if self.mode == "cli" or response.status == 200:
                        return True
                finally:
                    conn.close()
            time.sleep(0.02)
        return False

    def _stop_process(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def close(self) -> None:
        self._stop_process()
        with contextlib.suppress(OSError):
            self._log.close()
            os.unlink(self._log.name)
        with contextlib.suppress(OSError):
            self.config_path.unlink()

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def log_text(self) -> str:
        try:
            return Path(self._log.name).read_text(errors="replace")
        except OSError:
            return ""

    @property
    def ps(self) -> psutil.Process:
        assert self._ps is not None
        return self._ps

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- looking inside and outside --

    def state(self) -> dict[str, Any]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            conn.request("GET", "/__chaos/state", headers={"Connection": "close"})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        assert response.status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def snapshot(self) -> Snapshot:
        state = self.state()
        ps = self.ps
        tcp: collections.Counter[str] = collections.Counter()
        outbound = inbound = 0
        for conn in ps.net_connections(kind="tcp"):
            tcp[conn.status] += 1
            if conn.status == psutil.CONN_LISTEN or not conn.laddr:
                continue
            if conn.laddr.port == self.port:
                inbound += 1
            else:
                outbound += 1
        return Snapshot(
            rss=int(ps.memory_info().rss),
            fds=int(ps.num_fds()),
            tasks=int(state["tasks"]),
            pool=dict(state["pool"]),
            in_flight=dict(state["in_flight"]),
            servers_in_flight=sum(int(s["in_flight"]) for s in state["servers"].values()),
            tcp=dict(tcp),
            outbound=outbound,
            inbound=inbound,
        )

    def baseline(self, timeout: float = 10.0) -> Snapshot:
        """A snapshot once no client connection is left open (warm-up clients closed)."""
        return wait_until(
            lambda: (
                (snap := self.snapshot()).inbound == 0 and not snap.tcp.get(psutil.CONN_CLOSE_WAIT) and snap
            ),
            timeout,
            interval=0.05,
            message="the gateway's client connections to close",
        )

    def settled(
        self,
        baseline: Snapshot,
        *,
        timeout: float = 15.0,
        rss_growth: int = 48 * MiB,
        task_slack: int = 0,
        fd_slack: int = 2,
    ) -> Snapshot:
        """Poll until nothing the test did is left over; the final snapshot, or AssertionError.

        Left over: asyncio tasks over the baseline, busy or waiting pool connections, requests
        or servers still counted in flight, sockets in CLOSE_WAIT (a peer closed, we never
        did), file descriptors beyond the baseline plus the extra idle pool connections (kept
        on purpose, bounded by `max_idle_per_host`), outbound sockets the pool does not know
        about, or RSS grown by more than `rss_growth`.
        """
        last: list[Snapshot] = []
        problems: list[str] = []

        def clean() -> bool:
            snap = self.snapshot()
            last[:] = [snap]
            problems.clear()
            if snap.tasks > baseline.tasks + task_slack:
                problems.append(f"tasks {baseline.tasks} -> {snap.tasks}")
            if snap.pool["busy"] or snap.pool["waiters"]:
                problems.append(f"pool {snap.pool}")
            if snap.pool["slots"] != snap.pool["connections"]:
                problems.append(f"pool slots {snap.pool['slots']} != connections {snap.pool['connections']}")
            if any(snap.in_flight.values()) or snap.servers_in_flight:
                problems.append(f"in flight {snap.in_flight} servers={snap.servers_in_flight}")
            if snap.inbound:
                problems.append(f"{snap.inbound} client connection(s) still open")
            if snap.tcp.get(psutil.CONN_CLOSE_WAIT, 0):
                problems.append(f"{snap.tcp[psutil.CONN_CLOSE_WAIT]} socket(s) in CLOSE_WAIT")
            kept = max(0, snap.pool["connections"] - baseline.pool["connections"])
            if snap.fds > baseline.fds + kept + fd_slack:
                problems.append(f"fds {baseline.fds} -> {snap.fds} (pool kept {kept} more)")
            if snap.outbound > snap.pool["connections"] + fd_slack:
                problems.append(f"{snap.outbound} outbound sockets, pool knows {snap.pool['connections']}")
            if snap.rss > baseline.rss + rss_growth:
                problems.append(f"rss {baseline.rss / MiB:.1f} -> {snap.rss / MiB:.1f} MiB")
            return not problems

        try:
            wait_until(clean, timeout, interval=0.05, message="the gateway to settle")
        except AssertionError:
            raise AssertionError(
                f"gateway resources did not settle within {timeout}s: {problems}\n"
                f"  before: {baseline.describe()}\n  after:  {last[0].describe()}"
            ) from None
        return last[0]


# -- an upstream that counts its requests across its lives ----------------------------------


class CountingUpstream(UpstreamProcess):
    """`UpstreamProcess` whose request count (`received()`) survives kill and restart."""

    def __init__(self, name: str, port: int | None = None) -> None:
        handle, count_file = tempfile.mkstemp(prefix=f"chaos-count-{name}-")
        os.close(handle)
        self.count_file = Path(count_file)
        super().__init__(name, port)

    def _spawn(self) -> None:
        env = {
            **os.environ,
            "UPSTREAM_NAME": self.name,
            "PYTHONUNBUFFERED": "1",
            "CHAOS_COUNT_FILE": str(self.count_file),
        }
        self.process = subprocess.Popen(
            [sys.executable, str(CHAOS_DIR / "counting_upstream.py"), "--port", str(self.port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            cwd=str(TESTS_DIR),
        )
        self._stopped = False

    def received(self) -> int:
        return self.count_file.stat().st_size

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OSError):
            self.count_file.unlink()


# -- a scripted misbehaving upstream --------------------------------------------------------

Script = Callable[[socket.socket], None]


def send_then_reset(data: bytes) -> Script:
    """Send `data`, then abort the connection with a TCP RST."""

    def script(conn: socket.socket) -> None:
        conn.sendall(data)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    return script


def send(data: bytes) -> Script:
    """Send `data`, then close cleanly (FIN)."""

    def script(conn: socket.socket) -> None:
        conn.sendall(data)

    return script


def drip(data: bytes, *, step: int, interval: float, stop: threading.Event) -> Script:
    """Send `data` `step` bytes every `interval` seconds (until the peer or the server goes)."""

    def script(conn: socket.socket) -> None:
        for start in range(0, len(data), step):
            if stop.wait(interval if start else 0):
                return
            conn.sendall(data[start : start + step])

    return script


class ScriptedServer(servers.ScriptedServer):
    """A raw TCP upstream on 127.0.0.1 that answers each request path with exact bytes.

    `scripts` maps a request path (the target without its query) to a `Script`, which
    writes whatever it wants to the socket; the connection is closed afterwards. Every
    request is counted by path in `requests`. Unknown paths get a plain 200.
    """

    def __init__(self, scripts: dict[str, Script]) -> None:
        self.scripts = scripts
        self.requests: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        super().__init__(self._dispatch, timeout=5.0)

    def _dispatch(self, conn: socket.socket, number: int) -> None:
        data = servers.read_head(conn)
        if not data:
            return
        target = data.split(b"\r\n", 1)[0].split(b" ")[1]
        path = target.split(b"?", 1)[0].decode("latin-1")
        with self._lock:
            self.requests[path] += 1
        script = self.scripts.get(path, send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
        script(conn)


# -- a bounded load loop ---------------------------------------------------------------------


@dataclass
class LoadResult:
    """What a load loop saw. `answered` counts responses read to their end."""

    sent: int = 0
    answered: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    by_server: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Responses whose head came but whose body broke off (visibly: the read failed), by server.
    cut: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Responses whose echoed X-Request-Id was not the request's own.
    crossed: int = 0
    latencies: list[float] = field(default_factory=list)
    #: (monotonic time, status or -1, answering server or "") of every request, for recovery times.
    timeline: list[tuple[float, int, str]] = field(default_factory=list)
    elapsed: float = 0.0

    def max_latency(self) -> float:
        return max(self.latencies, default=0.0)

    def summary(self) -> str:
        return (
            f"sent={self.sent} answered={self.answered} statuses={dict(self.statuses)} "
            f"errors={dict(self.errors)} cut={dict(self.cut)} by_server={dict(self.by_server)} crossed={self.crossed} "
            f"max_latency={self.max_latency():.3f}s elapsed={self.elapsed:.2f}s"
        )


def run_load(
    url: str,
    path: str,
    *,
    total: int,
    concurrency: int = 4,
    time_limit: float = 60.0,
    stop: threading.Event | None = None,
    check_echo: bool = False,
    timeout: float = 10.0,
    id_prefix: str = "load",
    pause: float = 0.0,
    result: LoadResult | None = None,
) -> LoadResult:
    """Send up to `total` GETs of `path` from `concurrency` keep-alive connections.

    Ends when `total` were sent, `time_limit` passed or `stop` is set, whichever comes first.
    With `check_echo` every 200 must be an echo of the request's own X-Request-Id. Each
    connection waits `pause` seconds between requests. `result` is filled as requests end,
    so another thread can watch it.
    """
    host, port = url.removeprefix("http://").split(":")
    result = result if result is not None else LoadResult()
    lock = threading.Lock()
    counter = iter(range(total))
    started = time.monotonic()
    deadline = started + time_limit

    def next_index() -> int | None:
        if time.monotonic() > deadline or (stop is not None and stop.is_set()):
            return None
        with lock:
            index = next(counter, None)
            if index is not None:
                result.sent += 1
            return index

    def worker() -> None:
        conn: http.client.HTTPConnection | None = None
        while (index := next_index()) is not None:
            request_id = f"{id_prefix}-{index}"
            begin = time.monotonic()
            status, server, crossed, error, headed = -1, "", False, "", False
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
                conn.request("GET", path, headers={"X-Request-Id": request_id})
                response = conn.getresponse()
                headed = True
                server = response.getheader("x-upstream-name") or ""
                body = response.read()
                status = response.status
                if check_echo and status == 200:
                    echoed = dict((k, v) for k, v in json.loads(body)["headers"]).get("x-request-id")
                    crossed = echoed != request_id or response.getheader("x-request-id") != request_id
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                error = type(exc).__name__
                if conn is not None:
                    conn.close()
                    conn = None
            end = time.monotonic()
            with lock:
                result.latencies.append(end - begin)
                result.timeline.append((end, status, server))
                if error and headed:
                    result.cut[server] += 1
                elif error:
                    result.errors[error] += 1
                else:
                    result.answered += 1
                    result.statuses[status] += 1
                    if server:
                        result.by_server[server] += 1
                    result.crossed += crossed
            if pause:
                if stop is not None:
                    stop.wait(pause)
                else:
                    time.sleep(pause)
        if conn is not None:
            conn.close()

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    result.elapsed = time.monotonic() - started
    return result


@contextlib.contextmanager
def background_load(url: str, path: str, **kwargs: Any) -> Iterator[LoadResult]:
    """`run_load` in a thread while the block runs, yielding its live result; stopped and
    joined when the block ends (its `elapsed` is set then)."""
    stop = threading.Event()
    result = LoadResult()
    kwargs.setdefault("total", 1_000_000)
    kwargs.setdefault("time_limit", 60.0)
    thread = threading.Thread(
        target=run_load, args=(url, path), kwargs={**kwargs, "stop": stop, "result": result}, daemon=True
    )
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join(kwargs["time_limit"] + 15)
        assert not thread.is_alive(), "the load loop did not stop"


def wait_for_answers(
    result: LoadResult, count: int, after: float | None = None, timeout: float = 15.0
) -> None:
    """Wait until the live `result` has `count` more answers (after `after`, if given)."""
    start = len(result.timeline) if after is None else 0

    def enough() -> bool:
        timeline = result.timeline[start:]
        return sum(1 for t, status, _ in timeline if status > 0 and (after is None or t >= after)) >= count

    wait_until(enough, timeout, message=f"{count} more answers from the load loop")


def first_success_after(result: LoadResult, moment: float, server: str | None = None) -> float | None:
    """Seconds from `moment` to the first 200 answered after it (by `server`, if given), if any."""
    times = [t for t, status, by in result.timeline if status == 200 and t >= moment and server in (None, by)]
    return min(times) - moment if times else None


def window(result: LoadResult, start: float, end: float) -> LoadResult:
    """The part of `result` answered between `start` and `end` (statuses, errors, servers)."""
    part = LoadResult()
    for t, status, by in result.timeline:
        if start <= t <= end:
            part.timeline.append((t, status, by))
            part.sent += 1
            if status < 0:
                part.errors["error"] += 1
            else:
                part.answered += 1
                part.statuses[status] += 1
                if by:
                    part.by_server[by] += 1
    return part


# -- gateway configs for the chaos tests ----------------------------------------------------

HEALTH = {
    "path": "/healthz",
    "interval": 0.25,
    "timeout": 0.25,
    "healthy_threshold": 1,
    "unhealthy_threshold": 1,
}
OUTLIER = {"consecutive_failures": 3, "base_ejection_time": 1.0, "max_ejection_time": 4.0}


def upstream(
    *urls: str,
    attempts: int = 3,
    read: float = 1.0,
    health: bool = True,
    outlier: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "servers": [{"url": url} for url in urls],
        "retry": {"attempts": attempts, "backoff_base": 0.01, "backoff_max": 0.05},
        "timeouts": {"connect": 0.5, "read": read, "total": 10.0},
        "health_check": HEALTH if health else None,
        "outlier_detection": OUTLIER if outlier else None,
        **extra,
    }


def config(**upstreams: dict[str, Any]) -> dict[str, Any]:
    """Route `/NAME` (prefix kept) to upstream NAME, for each one given."""
    return {
        "routes": [{"path": f"/{name}", "upstream": name} for name in upstreams],
        "upstreams": upstreams,
        "max_body_size": None,
    }


def warm(gateway: GatewayProcess, *paths: str, n: int = 20) -> None:
    for path in paths:
        result = run_load(gateway.url, path, total=n, concurrency=2, time_limit=10)
        assert result.statuses == {200: n}, result.summary()


def assert_nothing_lost(result: LoadResult, *, cut_from: str | None = None, max_cut: int = 0) -> None:
    """Every request answered 200 with its own echo, but for at most `max_cut` responses of the
    server `cut_from` that broke off after their head (visibly: the client's read failed).

    Those are the requests a server died in the middle of answering: once the head has gone to
    the client, the gateway cannot retry them (see the notes on committing at the head)."""
    cut = sum(result.cut.values())
    assert not result.errors and result.answered + cut == result.sent, result.summary()
    assert cut <= max_cut and set(result.cut) <= {cut_from}, result.summary()
    assert set(result.statuses) == {200}, result.summary()
    assert result.crossed == 0, result.summary()


# -- the record of faults and recovery times ------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    fault: str
    client_sees: str
    recovery: float | None
    note: str = ""


RECORD: list[Outcome] = []


def record(fault: str, client_sees: str, recovery: float | None, note: str = "") -> None:
    """Remember a fault's outcome for the summary at the end of the run (and $CHAOS_REPORT)."""
    outcome = Outcome(fault, client_sees, recovery, note)
    RECORD.append(outcome)
    path = os.environ.get("CHAOS_REPORT")
    if path:
        with open(path, "a") as file:
            file.write(json.dumps(outcome.__dict__) + "\n")


# -- a streaming raw client ----------------------------------------------------------------


class RawStream:
    """One request on a raw socket whose response is read piece by piece.

    `rcvbuf` shrinks the socket's receive buffer (set before connecting), so that a client
    that stops reading pushes back on the gateway quickly.
    """

    def __init__(self, url: str, request: bytes, *, timeout: float = 10.0, rcvbuf: int | None = None) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, int(port)))
        self.sock.sendall(request)
        self._parser = h11.Connection(h11.CLIENT)
        method = request.split(b" ", 1)[0]
        self._parser.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x")]))
        self._parser.send(h11.EndOfMessage())
        self.head: h11.Response | None = None
        self.received = 0
        self.digest = hashlib.sha256()
        self.complete = False
        self.error: str | None = None
        self.recv_size = 65536

    @property
    def ended(self) -> bool:
        return self.complete or self.error is not None

    def header(self, name: bytes) -> bytes | None:
        assert self.head is not None
        for key, value in self.head.headers:
            if key == name:
                return bytes(value)
        return None

    def _event(self) -> Any:
        while True:
            try:
                event = self._parser.next_event()
            except h11.RemoteProtocolError as exc:
                self.error = f"protocol error: {exc}"
                return None
            if event is not h11.NEED_DATA:
                return event
            try:
                data = self.sock.recv(self.recv_size)
            except (ConnectionResetError, BrokenPipeError) as exc:
                self.error = f"reset: {exc}"
                return None
            except TimeoutError:
                self.error = "timed out"
                return None
            self._parser.receive_data(data)

    def read_head(self) -> h11.Response:
        while self.head is None:
            event = self._event()
            if event is None or isinstance(event, h11.ConnectionClosed):
                raise AssertionError(f"no response head: {self.error or 'connection closed'}")
            if isinstance(event, h11.Response):
                self.head = event
        return self.head

    def read_body(self, limit: int | None = None) -> int:
        """Read body bytes until `limit` more arrived, or the body ended (cleanly or not)."""
        if self.head is None:
            self.read_head()
        got = 0
        while not self.ended and (limit is None or got < limit):
            event = self._event()
            if event is None:
                break
            if isinstance(event, h11.Data):
                got += len(event.data)
                self.received += len(event.data)
                self.digest.update(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.complete = True
            elif isinstance(event, h11.ConnectionClosed):
                self.error = "connection closed"
        return got

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def peak_rss(process: GatewayProcess, interval: float = 0.02) -> Iterator[list[int]]:
    """Sample the gateway's RSS while the block runs: yields [baseline, peak] (peak kept updated)."""
    result = [process.rss()] * 2
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            with contextlib.suppress(psutil.Error):
                result[1] = max(result[1], process.rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join(5)


# -- small raw-socket helpers ---------------------------------------------------------------


def read_all(sock: socket.socket, timeout: float = 5.0, limit: int = 1 << 24) -> bytes:
    """Every byte until the peer closes, the limit, or `timeout` seconds of silence."""
    sock.settimeout(timeout)
    data = bytearray()
    while len(data) < limit:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_responses(
    sock: socket.socket, *, limit: int = 2, silence: float = 0.5
) -> tuple[list[RawResponse], bool]:
    """Read up to `limit` responses off `sock`: (responses, whether the server closed).

    Stops at the limit, when the server closes, or after `silence` seconds without a byte
    (the server keeps the connection open and has nothing more to say).
    """
    parser = h11.Connection(h11.CLIENT)
    responses: list[RawResponse] = []
    sock.settimeout(silence)
    while len(responses) < limit:
        if parser.our_state is h11.DONE and parser.their_state is h11.DONE:
            parser.start_next_cycle()
        elif parser.their_state is not h11.IDLE:
            # The last response said the connection closes: only EOF can follow.
            return responses, _closes(sock)
        parser.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        parser.send(h11.EndOfMessage())
        head: h11.Response | None = None
        body = bytearray()
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                raise AssertionError(f"unparseable bytes from the gateway: {exc}") from None
            if event is h11.NEED_DATA:
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    return responses, False
                except ConnectionResetError:
                    data = b""
                parser.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if head is None:
            return responses, True
        responses.append(
            RawResponse(
                status=head.status_code,
                headers=[(bytes(k), bytes(v)) for k, v in head.headers.raw_items()],
                body=bytes(body),
                complete=isinstance(event, h11.EndOfMessage),
            )
        )
        if isinstance(event, h11.ConnectionClosed):
            return responses, True
    return responses, False


def _closes(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def head_lines(data: bytes) -> list[bytes]:
    """The status line and header lines of the first response in `data`, split on CRLF only."""
    head = data.split(b"\r\n\r\n", 1)[0]
    return head.split(b"\r\n")
