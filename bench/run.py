"""asgi_gateway's benchmark: the gateway beside its peers and the limit, in one command.

    python bench/run.py            # the full run, about 6 minutes
    python bench/run.py --quick    # a shorter run, about 3 minutes
    python bench/run.py --profile gateway-off   # where one proxy's CPU goes (py-spy)
    python bench/run.py --smoke    # a tiny end-to-end check (the test suite runs this)

Needs `wrk` and `nginx` (Debian/Ubuntu: `apt-get install wrk nginx`) and the bench extra
(`pip install -e '.[bench]'`). `--smoke` falls back to pure-Python stand-ins for both when
they are missing, so it runs anywhere; its figures only prove that the harness works.

The set-up: nginx serves a fixed 1 KiB body and a 1 MiB file from three server blocks. Each
proxy under test runs alone on one core (`taskset`), uvicorn with uvloop and httptools, one
worker; nginx and wrk share the other core. Every proxy runs at once, idle but for its turn;
the rounds interleave them, and the table shows the median of the rounds. Raw results go
to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loadgen import LoadResult, python_command, run_load, wrk_command

BENCH = Path(__file__).resolve().parent
APPS = BENCH / "apps"
HOST = "127.0.0.1"
KIB = 1024
MIB = 1 << 20
TIMES = "\u00d7"
INSTALL_HINT = (
    "Install them with: sudo apt-get install wrk nginx   (Debian/Ubuntu)\n"
    "and the peers with: pip install -e '.[bench]'\n"
    "or run `python bench/run.py --smoke`, which falls back to pure-Python stand-ins."
)


# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mode:
    name: str
    rounds: int
    seconds_1k: float
    seconds_1m: float
    warmup: float
    inflight: int
    cases: tuple[str, ...] | None  # None: every case
    helper_args: tuple[str, ...]


MODES = {
    "full": Mode("full", 5, 4, 2, 2, 1000, None, ()),
    "quick": Mode("quick", 2, 2, 2, 1, 1000, None, ("--quick",)),
    "smoke": Mode(
        "smoke",
        1,
        1,
        1,
        0,
        50,
        ("direct", "gateway-off", "gateway-all", "gateway-sdk", "fastapi-off", "floor-pool"),
        ("--quick", "--seconds", "0.005"),
    ),
}


@dataclass(frozen=True, slots=True)
class Case:
    key: str
    label: str
    kind: str  # "direct" | "nginx" | "uvicorn"
    app: str = ""
    env: tuple[tuple[str, str], ...] = ()
    module: str = ""  # an import that must work for the case to run
    gateway: bool = False
    #: Run unless --only names the cases; the floors run only when asked for.
    default: bool = True


CASES = (
    Case("direct", "direct to nginx (the limit)", "direct"),
    Case("nginx", "nginx proxy_pass", "nginx"),
    Case("gateway-off", "asgi_gateway, tracing off", "uvicorn", "gateway_app:app",
         (("BENCH_TRACING", "off"),), gateway=True),
    Case("gateway-sampled", "asgi_gateway, 10% sampled", "uvicorn", "gateway_app:app",
         (("BENCH_TRACING", "sampled"),), gateway=True),
    Case("gateway-all", "asgi_gateway, every request traced", "uvicorn", "gateway_app:app",
         (("BENCH_TRACING", "all"),), gateway=True),
    Case("gateway-sdk", "the SDK's own 2 spans around asgi_gateway (tracing off)", "uvicorn",
         "gateway_app:app", (("BENCH_TRACING", "sdk"),), gateway=True),
    Case("fastapi-off", "asgi_gateway in FastAPI (add_middleware), tracing off", "uvicorn", "gateway_app:app",
         (("BENCH_TRACING", "off"), ("BENCH_HOST", "fastapi")), gateway=True),
    Case("fastapi-sampled", "asgi_gateway in FastAPI, 10% sampled", "uvicorn", "gateway_app:app",
         (("BENCH_TRACING", "sampled"), ("BENCH_HOST", "fastapi")), gateway=True),
    Case("fastapi-all", "asgi_gateway in FastAPI, every request traced", "uvicorn", "gateway_app:app",
         (("BENCH_TRACING", "all"), ("BENCH_HOST", "fastapi")), gateway=True),
    Case("fastapi-all-patched", "asgi_gateway in FastAPI, every request traced, the SDK patched",
         "uvicorn", "gateway_app:app",
         (("BENCH_TRACING", "all"), ("BENCH_HOST", "fastapi"), ("BENCH_SDK_PATCH", "all")), gateway=True,
         default=False),
    Case("gateway-sdk-patched", "the SDK's own 2 spans around asgi_gateway, the SDK patched", "uvicorn",
         "gateway_app:app", (("BENCH_TRACING", "sdk"), ("BENCH_SDK_PATCH", "all")), gateway=True,
         default=False),
    Case("fastapi-front", "asgi_gateway in front of FastAPI, tracing off", "uvicorn", "gateway_app:app",
         (("BENCH_TRACING", "off"), ("BENCH_HOST", "fastapi-front")), gateway=True, default=False),
    Case("gateway-httpx", "asgi_gateway on the httpx adapter", "uvicorn", "gateway_app:app",
         (("BENCH_TRACING", "off"), ("BENCH_TRANSPORT", "httpx")), gateway=True),
    Case("asgiproxy", "asgiproxy", "uvicorn", "asgiproxy_app:app", module="asgiproxy"),
    Case("floor-uvicorn", "floor: uvicorn answering by itself", "uvicorn", "floor_app:app",
         (("BENCH_FLOOR", "uvicorn"),), default=False),
    Case("floor-pool", "floor: uvicorn + the built-in client, no gateway", "uvicorn", "floor_app:app",
         (("BENCH_FLOOR", "pool"),), default=False),
    Case("fastapi-proxy-lib", "fastapi-proxy-lib", "uvicorn", "fastapi_proxy_lib_app:app",
         module="fastapi_proxy_lib"),
)  # fmt: skip


#: The cases `--before TREE` runs again with that checkout's asgi_gateway.
BEFORE = ("gateway-off", "gateway-sampled", "gateway-all", "fastapi-off", "fastapi-sampled", "fastapi-all")


def before_cases(cases: Sequence[Case], tree: Path) -> list[Case]:
    """The same apps (bench/apps) importing asgi_gateway from `tree`: the figures before a change."""
    return [
        Case(f"{case.key}@before", f"{case.label} (before)", case.kind, case.app,
             (*case.env, ("PYTHONPATH", str(tree))), case.module, gateway=False)
        for case in cases
        if case.key in BEFORE
    ]  # fmt: skip


@dataclass(slots=True)
class Tools:
    wrk: str | None
    nginx: str | None
    fallback: bool
    proxy_core: int | None
    load_cores: tuple[int, ...] | None
    notes: list[str] = field(default_factory=list)


def find_tools(fallback: bool, smoke: bool) -> Tools:
    wrk = shutil.which("wrk")
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    notes: list[str] = []
    if not fallback and (wrk is None or nginx is None):
        missing = " and ".join(name for name, path in (("wrk", wrk), ("nginx", nginx)) if path is None)
        if not smoke:
            print(f"bench: {missing} not found.\n{INSTALL_HINT}", file=sys.stderr)
            raise SystemExit(2)
        notes.append(f"{missing} not found: pure-Python stand-ins used ({INSTALL_HINT.splitlines()[0]})")
        fallback = True
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if shutil.which("taskset") is None:
        cores = []
        notes.append("taskset not found (util-linux): nothing is pinned")
    if len(cores) >= 2:
        proxy_core: int | None = cores[1]
        load_cores: tuple[int, ...] | None = tuple(c for c in cores if c != proxy_core)
    else:
        proxy_core, load_cores = None, None
        if cores:
            notes.append("fewer than 2 cores: nothing is pinned, and the proxy shares its core with the load")
    if fallback:
        wrk = nginx = None
    return Tools(wrk, nginx, fallback, proxy_core, load_cores, notes)


# -- processes --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def pinned(command: Sequence[str], cores: Sequence[int] | None) -> list[str]:
    if not cores:
        return list(command)
    taskset = shutil.which("taskset")
    if taskset:
        return [taskset, "-c", ",".join(map(str, cores)), *command]
    return list(command)


def _raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))


class Process:
    """A child process with its log in a file, stopped at the end of the run."""

    def __init__(self, name: str, command: Sequence[str], env: dict[str, str] | None, workdir: Path) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            self.command,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, size: int = 1500) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-size:].decode("utf-8", "replace")

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()

    # Figures about the process and its children (nginx's workers).

    def _tree(self) -> list[Any]:
        import psutil  # type: ignore[import-untyped,unused-ignore]

        root = psutil.Process(self.pid)
        return [root, *root.children(recursive=True)]

    def cpu_seconds(self) -> float | None:
        try:
            return float(sum(p.cpu_times().user + p.cpu_times().system for p in self._tree()))
        except Exception:  # psutil missing, or a process gone
            return None

    def rss(self) -> int | None:
        try:
            return int(sum(p.memory_info().rss for p in self._tree()))
        except Exception:
            return None


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(process: Process, port: int, path: str, timeout: float) -> str | None:
    """None once `path` answers 200 through the process, else why not."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not process.alive():
            return f"exited with code {process.popen.returncode}:\n{process.log_tail()}"
        try:
            status, _ = http_get(port, path)
            if status == 200:
                return None
            last = f"answered {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    return f"not ready after {timeout:.0f} s ({last}):\n{process.log_tail()}"


# -- nginx -------------------------------------------------------------------------------------------

_NGINX_COMMON = """
daemon off;
worker_processes 1;
error_log {dir}/error-{name}.log warn;
pid {dir}/nginx-{name}.pid;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
    client_body_temp_path {dir}/temp-{name}/body;
    proxy_temp_path {dir}/temp-{name}/proxy;
    fastcgi_temp_path {dir}/temp-{name}/fastcgi;
    uwsgi_temp_path {dir}/temp-{name}/uwsgi;
    scgi_temp_path {dir}/temp-{name}/scgi;
{body}
}}
"""

_UPSTREAM_SERVER = """
    server {{
        listen {host}:{port} backlog=4096;
        location = /1k {{ default_type text/plain; return 200 "{kib}"; }}
        location = /1m {{ alias {dir}/1m.bin; }}
        location = /healthz {{ default_type text/plain; return 200 "ok"; }}
        location / {{ return 404; }}
    }}
"""

_PROXY_SERVER = """
    upstream backend {{
{servers}
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;
        }}
    }}
"""


def nginx_upstream_conf(workdir: Path, ports: Sequence[int]) -> Path:
    (workdir / "1m.bin").write_bytes(b"y" * MIB)
    servers = "".join(
        _UPSTREAM_SERVER.format(host=HOST, port=port, kib="x" * KIB, dir=workdir) for port in ports
    )
    path = workdir / "nginx-upstream.conf"
    path.write_text(_NGINX_COMMON.format(dir=workdir, name="upstream", body=servers))
    return path


def nginx_proxy_conf(workdir: Path, port: int, upstream_ports: Sequence[int]) -> Path:
    servers = "\n".join(f"        server {HOST}:{p};" for p in upstream_ports)
    body = _PROXY_SERVER.format(host=HOST, port=port, servers=servers)
    path = workdir / "nginx-proxy.conf"
    path.write_text(_NGINX_COMMON.format(dir=workdir, name="proxy", body=body))
    return path


def nginx_command(nginx: str, workdir: Path, conf: Path, name: str) -> list[str]:
    (workdir / f"temp-{name}").mkdir(exist_ok=True)
    return [nginx, "-p", str(workdir), "-e", str(workdir / f"error-{name}.log"), "-c", str(conf)]


# -- uvicorn -----------------------------------------------------------------------------------------


def uvicorn_command(app: str, port: int) -> list[str]:
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http_impl = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(APPS),
        app,
        "--host",
        HOST,
        "--port",
        str(port),
        "--loop",
        loop,
        "--http",
        http_impl,
        "--no-access-log",
        "--log-level",
        "warning",
        "--backlog",
        "4096",
    ]


# -- the run -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    case: str
    round: int
    size: str  # "1k" | "1m"
    connections: int
    result: dict[str, Any]
    cpu_us_per_request: float | None


@dataclass(slots=True)
class Harness:
    mode: Mode
    tools: Tools
    workdir: Path
    processes: list[Process] = field(default_factory=list)
    upstream_ports: list[int] = field(default_factory=list)
    upstream: Process | None = None
    ports: dict[str, int] = field(default_factory=dict)
    proxies: dict[str, Process] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    #: Requests each case has served, warm-up included (for spans per request).
    served: dict[str, int] = field(default_factory=dict)

    def spawn(
        self,
        name: str,
        command: Sequence[str],
        cores: Sequence[int] | None,
        env: dict[str, str] | None = None,
    ) -> Process:
        process = Process(name, pinned(command, cores), env, self.workdir)
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def proxy_core(self) -> list[int] | None:
        return [self.tools.proxy_core] if self.tools.proxy_core is not None else None

    def load_cores(self) -> list[int] | None:
        return list(self.tools.load_cores) if self.tools.load_cores else None

    def start_upstream(self) -> None:
        self.upstream_ports = [free_port() for _ in range(3)]
        if self.tools.nginx:
            conf = nginx_upstream_conf(self.workdir, self.upstream_ports)
            command = nginx_command(self.tools.nginx, self.workdir, conf, "upstream")
        else:
            command = [sys.executable, str(BENCH / "upstream.py")]
            for port in self.upstream_ports:
                command += ["--port", str(port)]
        self.upstream = self.spawn("upstream", command, self.load_cores())
        error = wait_ready(self.upstream, self.upstream_ports[0], "/1k", 20)
        if error:
            raise SystemExit(f"bench: the upstream did not start: {error}")

    def start_proxies(self, cases: Sequence[Case]) -> list[Case]:
        upstream_urls = ",".join(f"http://{HOST}:{p}" for p in self.upstream_ports)
        started: list[tuple[Case, Process]] = []
        for case in cases:
            if case.kind == "direct":
                assert self.upstream is not None
                self.ports[case.key] = self.upstream_ports[0]
                self.proxies[case.key] = self.upstream
                continue
            port = free_port()
            self.ports[case.key] = port
            if case.kind == "nginx":
                assert self.tools.nginx is not None
                conf = nginx_proxy_conf(self.workdir, port, self.upstream_ports)
                command = nginx_command(self.tools.nginx, self.workdir, conf, "proxy")
                env: dict[str, str] = {}
            else:
                command = uvicorn_command(case.app, port)
                env = {
                    **dict(case.env),
                    "BENCH_UPSTREAMS": upstream_urls,
                    "BENCH_UPSTREAM": f"http://{HOST}:{self.upstream_ports[0]}",
                    "BENCH_SPAN_COUNT_FILE": str(self.workdir / f"spans-{case.key}.json"),
                }
            process = self.spawn(case.key, command, self.proxy_core(), env)
            started.append((case, process))
        ready = [c for c in cases if c.kind == "direct"]
        for case, process in started:
            error = wait_ready(process, self.ports[case.key], "/1k", 60)
            if error is None:
                self.proxies[case.key] = process
                ready.append(case)
            else:
                self.notes.append(f"{case.label} left out: it did not start ({error.splitlines()[0]})")
                print(f"bench: {case.label} did not start: {error}", file=sys.stderr)
                if case.gateway:
                    self.failed.append(case.key)
                process.stop()
        return [c for c in cases if c in ready]

    def load(
        self, case: Case, path: str, connections: int, seconds: float
    ) -> tuple[LoadResult, float | None]:
        url = f"http://{HOST}:{self.ports[case.key]}{path}"
        if self.tools.wrk:
            command = wrk_command(self.tools.wrk, url, connections, seconds)
        else:
            command = python_command(url, connections, seconds)
        process = self.proxies[case.key]
        cpu_before = process.cpu_seconds()
        result = run_load(pinned(command, self.load_cores()), timeout=seconds + 30)
        cpu_after = process.cpu_seconds()
        self.served[case.key] = self.served.get(case.key, 0) + result.requests
        cpu_us = None
        if cpu_before is not None and cpu_after is not None and result.requests:
            cpu_us = (cpu_after - cpu_before) / result.requests * 1e6
        return result, cpu_us

    def spans_per_request(self, key: str) -> float | None:
        """Spans a traced gateway recorded per request it served (it writes the count on SIGUSR1)."""
        process = self.proxies.get(key)
        requests = self.served.get(key, 0)
        if process is None or not requests:
            return None
        path = self.workdir / f"spans-{key}.json"
        process.popen.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, KeyError):
                return float(json.loads(path.read_text())["spans"]) / requests
            time.sleep(0.02)
        return None


def interleaved_rounds(harness: Harness, cases: Sequence[Case]) -> list[Sample]:
    mode = harness.mode
    samples: list[Sample] = []
    if mode.warmup:
        for case in cases:
            harness.load(case, "/1k", 32, mode.warmup)
            harness.load(case, "/1m", 8, mode.warmup)
    for round_ in range(mode.rounds):
        # Each round starts one case further on, so no proxy always runs right after the same one.
        order = [cases[(i + round_) % len(cases)] for i in range(len(cases))]
        for case in order:
            for size, path, connections, seconds in (
                ("1k", "/1k", 32, mode.seconds_1k),
                ("1m", "/1m", 8, mode.seconds_1m),
            ):
                result, cpu_us = harness.load(case, path, connections, seconds)
                samples.append(Sample(case.key, round_, size, connections, asdict(result), cpu_us))
                print(
                    f"  round {round_ + 1}/{mode.rounds}  {case.key:<18} {size}  "
                    f"{result.rps:9.0f} req/s  p99 {result.p99_ms:7.2f} ms  {result.mib_per_s:7.1f} MiB/s"
                    + (
                        f"  errors {result.errors + result.non_2xx}"
                        if result.errors or result.non_2xx
                        else ""
                    ),
                    flush=True,
                )
    return samples


# -- memory per in-flight request --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemoryResult:
    case: str
    in_flight: int
    rss_before: int
    rss_during: int
    ok: int
    failed: int

    @property
    def per_request(self) -> float:
        return (self.rss_during - self.rss_before) / self.in_flight


def slow_count(port: int) -> int:
    try:
        status, body = http_get(port, "/count")
    except OSError:
        return -1
    return int(body) if status == 200 else -1


def memory_test(harness: Harness, cases: Sequence[Case], count: int) -> list[MemoryResult]:
    slow_port = free_port()
    slow = harness.spawn(
        "slow-upstream",
        [sys.executable, str(BENCH / "upstream.py"), "--port", str(slow_port)],
        harness.load_cores(),
    )
    if wait_ready(slow, slow_port, "/healthz", 20) is not None:
        harness.notes.append("memory test left out: the slow upstream did not start")
        return []
    results = []
    for case in cases:
        port = free_port()
        env = {
            **dict(case.env),
            "BENCH_UPSTREAMS": f"http://{HOST}:{harness.upstream_ports[0]}",
            "BENCH_UPSTREAM": f"http://{HOST}:{slow_port}",
            "BENCH_SLOW": f"http://{HOST}:{slow_port}",
            # The pool's default of 100 connections per server would queue the rest.
            "BENCH_MAX_CONNECTIONS": str(count + 100),
        }
        process = Process(
            f"memory-{case.key}",
            pinned(uvicorn_command(case.app, port), harness.proxy_core()),
            env,
            harness.workdir,
        )
        try:
            if error := wait_ready(process, port, "/1k" if case.gateway else "/healthz", 60):
                harness.notes.append(f"memory test of {case.label} left out: {error.splitlines()[0]}")
                if case.gateway:
                    harness.failed.append(f"memory-{case.key}")
                continue
            # A small wave first, so lazily built things exist before the baseline.
            hold_wave(harness, process, port, slow_port, min(count, 20))
            before = process.rss() or 0
            wave = hold_wave(harness, process, port, slow_port, count)
            results.append(MemoryResult(case.key, count, before, wave["rss"], wave["ok"], wave["failed"]))
            print(
                f"  memory  {case.key:<18} {results[-1].per_request / 1024:6.1f} KiB per in-flight request"
                f"  ({wave['ok']} ok, {wave['failed']} failed)",
                flush=True,
            )
        finally:
            process.stop()
    return results


def hold_wave(
    harness: Harness, process: Process, proxy_port: int, slow_port: int, count: int
) -> dict[str, Any]:
    """`count` requests in flight through the proxy: the proxy's RSS once all are held upstream."""
    timeout = 60.0
    command = [
        sys.executable,
        str(BENCH / "inflight.py"),
        f"http://{HOST}:{proxy_port}/slow",
        "--count",
        str(count),
        "--timeout",
        str(timeout),
    ]
    client = subprocess.Popen(
        pinned(command, harness.load_cores()), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    rss = held = 0
    out = ""
    http_get(slow_port, "/hold")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and client.poll() is None:
            held = slow_count(slow_port)
            if held >= count:
                break
            time.sleep(0.05)
        # Let the proxy settle (socket buffers drained, the GC run) before reading its memory.
        time.sleep(0.2)
        rss = process.rss() or 0
        http_get(slow_port, "/release")
        out, _ = client.communicate(timeout=timeout)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    result: dict[str, Any] = {"ok": 0, "failed": count}
    for line in out.splitlines():
        if line.startswith("BENCH_JSON "):
            result = json.loads(line[len("BENCH_JSON ") :])
    return {**result, "rss": rss, "held": held}


# -- helpers' tables ---------------------------------------------------------------------------------


def run_helper(script: str, args: Sequence[str], cores: Sequence[int] | None, timeout: float) -> str | None:
    path = BENCH / script
    if not path.exists():
        return None
    done = subprocess.run(
        pinned([sys.executable, str(path), *args], cores), capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        return f"(bench/{script} failed: {done.stderr.strip()[-300:]})"
    return done.stdout.strip()


def span_cost(cores: Sequence[int] | None, seconds: float) -> float | None:
    out = run_helper("otel_cost.py", ["--json", "--seconds", str(seconds)], cores, 60)
    try:
        return float(json.loads(out or "")["us_per_span"])
    except (ValueError, KeyError, TypeError):
        return None


# -- report ------------------------------------------------------------------------------------------


def versions(tools: Tools) -> dict[str, str]:
    found: dict[str, str] = {}
    for dist in (
        "asgi-gateway",
        "uvicorn",
        "httptools",
        "uvloop",
        "httpx",
        "opentelemetry-sdk",
        "aiohttp",
        "asgiproxy",
        "fastapi-proxy-lib",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[dist] = importlib.metadata.version(dist)
    if tools.nginx:
        done = subprocess.run([tools.nginx, "-v"], capture_output=True, text=True)
        found["nginx"] = done.stderr.strip().rpartition("/")[2]
    if tools.wrk:
        done = subprocess.run([tools.wrk, "--version"], capture_output=True, text=True)
        found["wrk"] = (done.stdout or done.stderr).split()[1] if (done.stdout or done.stderr) else "?"
    return found


def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "load average at start": " ".join(f"{x:.2f}" for x in load),
    }


@dataclass(slots=True)
class Summary:
    case: Case
    rps: float
    p50: float
    p99: float
    cpu_us: float | None
    mib_s: float | None
    errors: int


def summarize(cases: Sequence[Case], samples: Sequence[Sample]) -> list[Summary]:
    out = []
    for case in cases:
        small = [s for s in samples if s.case == case.key and s.size == "1k"]
        large = [s for s in samples if s.case == case.key and s.size == "1m"]
        if not small:
            continue
        cpus = [s.cpu_us_per_request for s in small if s.cpu_us_per_request is not None]
        rps = [s.result["requests"] / s.result["duration"] for s in small]
        mib = [s.result["bytes"] / s.result["duration"] / MIB for s in large]
        out.append(
            Summary(
                case,
                statistics.median(rps),
                statistics.median(s.result["p50_ms"] for s in small),
                statistics.median(s.result["p99_ms"] for s in small),
                statistics.median(cpus) if cpus else None,
                statistics.median(mib) if mib else None,
                sum(s.result["errors"] + s.result["non_2xx"] for s in [*small, *large]),
            )
        )
    return out


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def results_table(summaries: Sequence[Summary]) -> str:
    peer = next((s for s in summaries if s.case.key == "asgiproxy"), None)
    lines = [
        f"| proxy (one core) | req/s, 1 KiB, 32 conn | {TIMES} asgiproxy | p50 | p99 | CPU per request | "
        "MiB/s, 1 MiB, 8 conn |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        ratio = f"{s.rps / peer.rps:.2f}{TIMES}" if peer and peer.rps else "n/a"
        errors = f" ({s.errors} errors)" if s.errors else ""
        lines.append(
            f"| {s.case.label}{errors} | {s.rps:,.0f} | {ratio} | {s.p50:.2f} ms | {s.p99:.2f} ms | "
            f"{_fmt(s.cpu_us, ',.0f', ' µs')} | {_fmt(s.mib_s, ',.0f')} |"
        )
    return "\n".join(lines)


def targets(
    summaries: Sequence[Summary],
    memory: Sequence[MemoryResult],
    sdk_us_per_span: float | None,
    span_rates: dict[str, float | None],
    balancer_json: str | None,
    routing_json: str | None,
) -> list[tuple[str, str, bool | None]]:
    by = {s.case.key: s for s in summaries}
    peer = by.get("asgiproxy")
    rows: list[tuple[str, str, bool | None]] = []
    hosted = (("fastapi-off", 2.5), ("fastapi-sampled", 1.5), ("fastapi-all", 1.1))
    # With the SDK change of bench/apps/sdk_patch.py: only when asked for (--only).
    patched = (("fastapi-all-patched", 1.1),) if "fastapi-all-patched" in by else ()
    for key, factor in (
        ("gateway-off", 2.5),
        ("gateway-sampled", 1.5),
        ("gateway-all", 1.1),
        *hosted,
        *patched,
    ):
        gateway = by.get(key)
        name = f"{gateway.case.label if gateway else key}: ≥ {factor}{TIMES} asgiproxy req/s"
        if gateway and peer:
            ratio = gateway.rps / peer.rps
            rows.append((name, f"{ratio:.2f}{TIMES}", ratio >= factor))
        else:
            rows.append((name, "not measured", None))
    off, traced, sdk = by.get("gateway-off"), by.get("gateway-all"), by.get("gateway-sdk")
    name = f"every request traced: tracing CPU ≤ {OWN_TRACING} {TIMES} the SDK's own cost per span"
    spans = span_rates.get("gateway-all") or 2.0
    if off and traced and off.cpu_us is not None and traced.cpu_us is not None:
        per_span = (traced.cpu_us - off.cpu_us) / spans
        if sdk and sdk.cpu_us is not None:
            # The yardstick under the same load in the same kind of process: the SDK's calls
            # alone, making the same spans around the same gateway with its tracing off.
            sdk_per_span = (sdk.cpu_us - off.cpu_us) / (span_rates.get("gateway-sdk") or 2.0)
            where = "the SDK's own spans around the gateway under the same load"
        else:
            sdk_per_span = sdk_us_per_span or 0.0
            where = "bench/otel_cost.py's tight loop"
        if sdk_per_span <= 0 and sdk is not None:
            # A run too short for the yardstick's spans to stand out of the noise (--smoke).
            rows.append(
                (
                    name,
                    f"not measurable in this run: {sdk_per_span:.1f} µs per span for {where}",
                    None,
                )
            )
        elif sdk_per_span > 0:
            ratio = per_span / sdk_per_span
            extra = (
                f"; in a tight loop the SDK costs {sdk_us_per_span:.1f} µs per span"
                if sdk and sdk_us_per_span
                else ""
            )
            rows.append(
                (
                    name,
                    f"{per_span:.1f} µs per span ({spans:.2f} spans per request) vs {sdk_per_span:.1f} µs "
                    f"for {where}: {ratio:.2f}{TIMES}{extra}",
                    ratio <= OWN_TRACING,
                )
            )
        else:
            rows.append((name, "not measured", None))
    else:
        rows.append((name, "not measured", None))
    for key in (
        "gateway-off",
        "gateway-sampled",
        "gateway-all",
        "fastapi-off",
        "fastapi-sampled",
        "fastapi-all",
    ):
        gateway = by.get(key)
        name = f"{gateway.case.label if gateway else key}: p99 ≤ asgiproxy's"
        if gateway and peer:
            rows.append((name, f"{gateway.p99:.2f} ms vs {peer.p99:.2f} ms", gateway.p99 <= peer.p99))
        else:
            rows.append((name, "not measured", None))
    nginx, gateway = by.get("nginx"), by.get("gateway-off")
    name = "1 MiB MiB/s ≥ nginx proxy_pass's"
    if nginx and gateway and nginx.mib_s and gateway.mib_s is not None:
        rows.append((name, f"{gateway.mib_s:,.0f} vs {nginx.mib_s:,.0f} MiB/s", gateway.mib_s >= nginx.mib_s))
    else:
        rows.append((name, "not measured", None))
    gateway_memory = next((m for m in memory if m.case == "gateway-off"), None)
    name = "memory per in-flight request < 64 KiB"
    if gateway_memory and not gateway_memory.failed:
        kib = gateway_memory.per_request / 1024
        rows.append((name, f"{kib:.1f} KiB ({gateway_memory.in_flight:,} in flight)", kib < 64))
    else:
        rows.append((name, "not measured", None))
    rows.append(
        _flatness(
            "balancer pick cost flat from 3 to 1,000 servers",
            balancer_json,
            "balancer",
            "servers",
            "picks_per_second",
            higher_is_better=True,
        )
    )
    rows.append(
        _flatness(
            "router match cost flat from 3 to 1,000 routes",
            routing_json,
            "case",
            "routes",
            "ns_per_match",
            higher_is_better=False,
        )
    )
    return rows


#: The gateway's tracing may cost at most this factor of the SDK's own calls making the same spans.
OWN_TRACING = 1.05

#: "Flat": the cost at 1,000 is within this factor of the cost at 3.
FLAT = 1.5


def _flatness(
    name: str, json_lines: str | None, key: str, size: str, value: str, *, higher_is_better: bool
) -> tuple[str, str, bool | None]:
    if not json_lines:
        return name, "not measured", None
    try:
        rows = [json.loads(line) for line in json_lines.splitlines() if line.startswith("{")]
    except ValueError:
        return name, "not measured", None
    worst = 0.0
    worst_kind = ""
    for kind in dict.fromkeys(row[key] for row in rows):
        cells = {row[size]: row[value] for row in rows if row[key] == kind}
        if 3 not in cells or 1000 not in cells:
            continue
        cost_ratio = cells[3] / cells[1000] if higher_is_better else cells[1000] / cells[3]
        if cost_ratio > worst:
            worst, worst_kind = cost_ratio, kind
    if not worst_kind:
        return name, "not measured", None
    return (
        name,
        f"worst: {worst_kind}, 1,000 costs {worst:.2f}{TIMES} 3 (flat: ≤ {FLAT}{TIMES})",
        worst <= FLAT,
    )


def targets_table(rows: Sequence[tuple[str, str, bool | None]]) -> str:
    lines = ["| target | measured | result |", "|---|---|---|"]
    for name, measured, ok in rows:
        verdict = "—" if ok is None else ("pass" if ok else "**FAIL**")
        lines.append(f"| {name} | {measured} | {verdict} |")
    return "\n".join(lines)


def memory_table(memory: Sequence[MemoryResult]) -> str:
    lines = [
        "| proxy | in flight | RSS before | RSS with all in flight | per request |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in memory:
        failed = f" ({m.failed} failed)" if m.failed else ""
        lines.append(
            f"| {m.case}{failed} | {m.in_flight:,} | {m.rss_before / MIB:.1f} MiB | "
            f"{m.rss_during / MIB:.1f} MiB | {m.per_request / 1024:.1f} KiB |"
        )
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def harness_for(mode: Mode, tools: Tools) -> Iterator[Harness]:
    workdir = Path(tempfile.mkdtemp(prefix="asgi-gateway-bench-"))
    # nginx's workers drop root and still read the 1 MiB file here.
    workdir.chmod(0o755)
    harness = Harness(mode, tools, workdir)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield harness
    finally:
        harness.stop_all()
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="asgi_gateway's benchmark against its peers and the limit.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer, shorter rounds (about 3 minutes)")
    size.add_argument("--smoke", action="store_true", help="a tiny end-to-end check (a few seconds of load)")
    parser.add_argument(
        "--fallback",
        action="store_true",
        help="with --smoke: use the pure-Python stand-ins even where wrk and nginx exist",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 5, --quick 2, --smoke 1)")
    parser.add_argument("--seconds", type=float, help="length of each 1 KiB run")
    parser.add_argument("--only", help="comma-separated cases: " + ", ".join(c.key for c in CASES))
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="where raw results are written")
    parser.add_argument(
        "--before",
        type=Path,
        metavar="TREE",
        help="also run the gateway's cases with asgi_gateway imported from TREE (a checkout, e.g. "
        "`git worktree add /tmp/gw-before HEAD`), in the same rounds: a before/after table",
    )
    parser.add_argument(
        "--sdk-patch",
        metavar="PARTS",
        help="the parts of bench/apps/sdk_patch.py's SDK change the *-patched cases apply "
        "(comma-separated; default: all)",
    )
    parser.add_argument(
        "--profile",
        metavar="CASE",
        help="instead of the table: profile one case with py-spy under the 1 KiB load (--seconds long)",
    )
    args = parser.parse_args(argv)
    if args.fallback and not args.smoke:
        parser.error("--fallback is for --smoke only: the stand-ins are far slower than wrk and nginx")
    if args.profile:
        case = next((c for c in CASES if c.key == args.profile), None)
        if case is None or case.kind != "uvicorn":
            parser.error(f"--profile takes one of: {', '.join(c.key for c in CASES if c.kind == 'uvicorn')}")
        return profile(case, find_tools(False, False), args.seconds or 10.0, args.out)

    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.rounds or args.seconds:
        mode = Mode(
            mode.name,
            args.rounds or mode.rounds,
            args.seconds or mode.seconds_1k,
            args.seconds or mode.seconds_1m,
            mode.warmup,
            mode.inflight,
            mode.cases,
            mode.helper_args,
        )
    tools = find_tools(args.fallback, args.smoke)
    wanted = (
        set(args.only.split(",")) if args.only else set(mode.cases or (c.key for c in CASES if c.default))
    )
    unknown = wanted - {c.key for c in CASES}
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    notes = list(tools.notes)
    cases = []
    for case in CASES:
        if case.key not in wanted:
            continue
        if case.kind == "nginx" and tools.nginx is None:
            notes.append("nginx proxy_pass left out: nginx is not used in this run")
            continue
        if case.module and importlib.util.find_spec(case.module) is None:
            notes.append(f"{case.label} left out: not installed (pip install -e '.[bench]')")
            continue
        if args.sdk_patch and case.key.endswith("-patched"):
            env = tuple((k, args.sdk_patch if k == "BENCH_SDK_PATCH" else v) for k, v in case.env)
            case = replace(case, label=f"{case.label} ({args.sdk_patch})", env=env)
        cases.append(case)

    if args.before:
        cases += before_cases(cases, args.before.resolve())
    started = time.monotonic()
    env_info = {"machine": machine(), "versions": versions(tools)}
    print(f"asgi_gateway bench, {mode.name} run: {mode.rounds} round(s) of {', '.join(c.key for c in cases)}")
    if tools.proxy_core is not None:
        print(
            f"  proxies pinned to core {tools.proxy_core}; upstream and load generator on cores "
            f"{','.join(map(str, tools.load_cores or ()))}"
        )

    with harness_for(mode, tools) as harness:
        harness.notes.extend(notes)
        harness.start_upstream()
        cases = harness.start_proxies(cases)
        samples = interleaved_rounds(harness, cases)
        span_rates = {
            key: harness.spans_per_request(key) for key in ("gateway-sampled", "gateway-all", "gateway-sdk")
        }
        memory_cases = [c for c in cases if c.key in ("gateway-off", "asgiproxy")]
        memory = memory_test(harness, memory_cases, mode.inflight) if memory_cases else []
        harness.stop_all()
        sdk_cost = span_cost(harness.proxy_core(), 0.2 if mode.name == "smoke" else 1.0)
        balancer = run_helper("balancer.py", mode.helper_args, harness.proxy_core(), 120)
        balancer_json = run_helper("balancer.py", (*mode.helper_args, "--json"), harness.proxy_core(), 120)
        routing = run_helper("routing.py", mode.helper_args, harness.proxy_core(), 120)
        routing_json = run_helper("routing.py", (*mode.helper_args, "--json"), harness.proxy_core(), 120)
        tracing = run_helper("tracing.py", mode.helper_args, harness.proxy_core(), 120)
        tracing = "\n\n".join(
            text
            for text in (run_helper("hotpath.py", mode.helper_args, harness.proxy_core(), 300), tracing)
            if text
        )
        notes, failed = harness.notes, harness.failed

    summaries = summarize(cases, samples)
    target_rows = targets(summaries, memory, sdk_cost, span_rates, balancer_json, routing_json)
    report = render(
        mode,
        tools,
        env_info,
        summaries,
        target_rows,
        memory,
        span_rates,
        sdk_cost,
        balancer,
        routing,
        tracing,
        notes,
        args,
        time.monotonic() - started,
    )
    print()
    print(report)
    save(args.out, mode, report, env_info, samples, memory, target_rows, notes)

    broken = list(failed)
    broken += [s.case.key for s in summaries if s.case.gateway and s.errors]
    broken += [f"memory-{m.case}" for m in memory if m.failed and m.case.startswith("gateway")]
    if broken:
        print(f"bench: the gateway failed in: {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0


def profile(case: Case, tools: Tools, seconds: float, out: Path) -> int:
    """Sample one proxy with py-spy while wrk loads it; print where its CPU time goes."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(py_spy, os.X_OK):
        print("bench: py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    mode = Mode("profile", 1, seconds, seconds, 2, 0, (case.key,), ())
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw = out / f"{stamp}-profile-{case.key}.txt"
    with harness_for(mode, tools) as harness:
        harness.start_upstream()
        if not harness.start_proxies([case]):
            return 1
        harness.load(case, "/1k", 32, 2)
        wrk = subprocess.Popen(
            pinned(wrk_command(tools.wrk or "wrk", f"http://{HOST}:{harness.ports[case.key]}/1k", 32, seconds + 2),
                   harness.load_cores()),
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            command = [py_spy, "record", "--pid", str(harness.proxies[case.key].pid), "--rate", "500",
                       "--duration", str(round(seconds)), "--format", "raw", "--nonblocking", "--full-filenames",
                       "-o", str(raw)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
        finally:
            wrk.wait(seconds + 30)
    if done.returncode != 0 or not raw.exists():
        print(f"bench: py-spy failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
        return 1
    print(f"{case.label}: CPU by function (self time), from {raw}")
    print("(a flame graph: `py-spy record --format flamegraph`, or load the file into speedscope)")
    for share, name in self_time(raw)[:30]:
        print(f"{share:6.1f}%  {name}")
    print("\nCPU by package (self time):")
    for share, name in by_package(raw)[:12]:
        print(f"{share:6.1f}%  {name}")
    return 0


def _package_of(filename: str) -> str:
    parts = Path(filename).parts
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
        if parts[:2] == ("opentelemetry", "sdk"):
            return "opentelemetry SDK"
        return parts[0] if parts else "?"
    if "asgi_gateway" in parts:
        return "asgi_gateway"
    # The standard library: the module or package name.
    return Path(parts[-1]).stem if len(parts) < 2 or parts[-2].startswith("python3") else parts[-2]


def _shares(raw: Path, key_of: Callable[[str, str], str]) -> list[tuple[float, str]]:
    """Share of py-spy's raw samples per `key_of(function, filename)` of the innermost frame."""
    counts: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        name, _, where = stack.rsplit(";", 1)[-1].partition(" (")
        key = key_of(name, where.rsplit(":", 1)[0])
        counts[key] = counts.get(key, 0) + int(count)
    return sorted(((100 * n / total, key) for key, n in counts.items()), reverse=True) if total else []


def by_package(raw: Path) -> list[tuple[float, str]]:
    """Per-package share of the samples: whose code was running (the event loop's own C code,
    system calls included, counts as the asyncio frame that called into it)."""
    return _shares(raw, lambda name, filename: _package_of(filename))


def self_time(raw: Path) -> list[tuple[float, str]]:
    """Per-function share of the samples in which it was the innermost frame."""

    def key_of(name: str, filename: str) -> str:
        path = "/".join(Path(filename).parts[-2:])
        return f"{name} ({path})" if path else name

    return _shares(raw, key_of)


def render(
    mode: Mode,
    tools: Tools,
    env_info: dict[str, dict[str, str]],
    summaries: Sequence[Summary],
    target_rows: Sequence[tuple[str, str, bool | None]],
    memory: Sequence[MemoryResult],
    span_rates: dict[str, float | None],
    sdk_cost: float | None,
    balancer: str | None,
    routing: str | None,
    tracing: str | None,
    notes: Sequence[str],
    args: argparse.Namespace,
    elapsed: float,
) -> str:
    command = "python bench/run.py" + " ".join(["", *(argv_of(args))])
    m, v = env_info["machine"], env_info["versions"]
    parts = [
        f"### Results ({mode.name} run: median of {mode.rounds} interleaved round(s), "
        f"{mode.seconds_1k:g} s per 1 KiB run, {mode.seconds_1m:g} s per 1 MiB run)",
        "",
        results_table(summaries),
        "",
        "### Targets",
        "",
        targets_table(target_rows),
        "",
    ]
    if memory:
        parts += ["### Memory with slow requests in flight", "", memory_table(memory), ""]
    traced = [f"{k}: {r:.2f} spans per request" for k, r in span_rates.items() if r is not None]
    by = {s.case.key: s for s in summaries}
    sdk, peer, all_traced = by.get("gateway-sdk"), by.get("asgiproxy"), by.get("gateway-all")
    if sdk and peer and peer.rps:
        ceiling = (
            f"The SDK's own two spans around the gateway with its tracing off: {sdk.rps / peer.rps:.2f}{TIMES} "
            "asgiproxy's req/s, p99 "
            f"{sdk.p99:.2f} ms: the ceiling for tracing every request through the SDK"
        )
        if all_traced:
            ceiling += f" (the gateway's own tracing: {all_traced.rps / peer.rps:.2f}{TIMES}, p99 {all_traced.p99:.2f} ms)"
        traced.append(ceiling + ".")
    if sdk_cost is not None or traced:
        parts += ["### Tracing", ""]
        if sdk_cost is not None:
            parts.append(
                f"- The OpenTelemetry SDK alone: {sdk_cost:.1f} µs CPU per recorded span "
                "(bench/otel_cost.py)."
            )
        parts += [f"- {line}" for line in traced]
        parts.append("")
    for title, text in (
        ("Balancer picks", balancer),
        ("Router match cost", routing),
        ("The gateway's own work and tracing, in-process (bench/hotpath.py, bench/tracing.py)", tracing),
    ):
        if text:
            parts += [f"### {title}", "", "```", text, "```", ""]
    parts += [
        "### Machine and versions",
        "",
        f"- {m['cpu']}, {m['cores']} cores, {m['os']}, Python {m['python']}; load average at start "
        f"{m['load average at start']}",
        "- " + ", ".join(f"{name} {version}" for name, version in v.items()),
        "- Pinning: "
        + (
            f"each proxy alone on core {tools.proxy_core}; nginx (upstream) and the load generator share "
            f"core(s) {','.join(map(str, tools.load_cores or ()))}, so the direct figure is bounded "
            "by that core, and every proxy's by its own"
            if tools.proxy_core is not None
            else "none (see the notes)"
        ),
        "- Load: "
        + ("wrk -t1 (one thread), --latency" if tools.wrk else "the pure-Python stand-in (bench/loadgen.py)")
        + "; upstream: "
        + ("nginx, one worker" if tools.nginx else "bench/upstream.py (pure Python)"),
        "- asgi_gateway: round-robin over 3 nginx server blocks, outlier detection on, active health checks "
        "every hour, 3 attempts; tracing spans go to a BatchSpanProcessor whose exporter drops them. "
        "Peers: one upstream server each; asgiproxy's semaphore raised from 20 to 4,096.",
        f"- Command: `{command}` ({elapsed:.0f} s)",
    ]
    if notes:
        parts += ["", "Notes:", *(f"- {note}" for note in notes)]
    return "\n".join(parts)


def argv_of(args: argparse.Namespace) -> list[str]:
    out = []
    for flag in ("quick", "smoke", "fallback"):
        if getattr(args, flag):
            out.append(f"--{flag}")
    for flag in ("rounds", "seconds", "only", "before"):
        if getattr(args, flag):
            out.append(f"--{flag} {getattr(args, flag)}")
    return out


def save(
    out: Path,
    mode: Mode,
    report: str,
    env_info: dict[str, Any],
    samples: Sequence[Sample],
    memory: Sequence[MemoryResult],
    target_rows: Sequence[tuple[str, str, bool | None]],
    notes: Sequence[str],
) -> None:
    with contextlib.suppress(OSError):
        out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        (out / f"{stamp}-{mode.name}.md").write_text(report + "\n")
        raw = {
            "mode": asdict(mode),
            **env_info,
            "samples": [asdict(s) for s in samples],
            "memory": [{**asdict(m), "per_request": m.per_request} for m in memory],
            "targets": [{"target": n, "measured": v, "ok": ok} for n, v, ok in target_rows],
            "notes": list(notes),
        }
        (out / f"{stamp}-{mode.name}.json").write_text(json.dumps(raw, indent=1) + "\n")
        print(f"\nraw results: {out / f'{stamp}-{mode.name}.json'}")


if __name__ == "__main__":
    sys.exit(main())
