"""`asgi-gateway serve` as a real process: SIGHUP and --watch reload in-process, --workers, the
SIGTERM drain. Real uvicorn upstreams (`tests/upstream_app.py`, and the WebSocket upstream of
`test_websocket.py`), real signals, real sockets on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import HOST, RawConnection, Upstreams, free_port, http_client, wait_until
from test_websocket import WsUpstream

ADMIN = "/-/gateway"


def gateway_config(upstreams: Upstreams, *routes: dict[str, Any], **top: Any) -> dict[str, Any]:
    """/api/users → u1, then `routes`; u2 as upstream "orders"; the admin endpoints on."""
    return {
        "admin": {"path": ADMIN},
        "routes": [{"path": "/api/users", "upstream": "users"}, *routes],
        "upstreams": {
            "users": {"servers": [{"url": upstreams.u1.url}]},
            "orders": {"servers": [{"url": upstreams.u2.url}]},
        },
        **top,
    }


ORDERS_ROUTE = {"path": "/api/orders", "upstream": "orders"}


def write(path: Path, data: dict[str, Any]) -> Path:
    """Write the way an editor saves: a new file renamed over the old one."""
    fresh = path.with_name(path.name + ".tmp")
    fresh.write_text(json.dumps(data))
    os.replace(fresh, path)
    return path


class Served:
    """An `asgi-gateway serve` process (in a session of its own) and its combined output."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.log = log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def count(self, text: str) -> int:
        return self.log_text().count(text)

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def status(self, client: httpx.Client | None = None) -> dict[str, Any]:
        if client is None:
            # A fresh connection: with several workers, whichever accepts it answers.
            with http_client(self.url, timeout=5) as fresh:
                response = fresh.get(f"{ADMIN}/status")
        else:
            response = client.get(f"{ADMIN}/status")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def children(self) -> set[int]:
        """The worker processes (multiprocessing's resource tracker left out)."""
        pids: set[int] = set()
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                pids.update(int(pid) for pid in (task / "children").read_text().split())
        workers = set()
        for pid in pids:
            with contextlib.suppress(OSError):
                if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    workers.add(pid)
        return workers

    def refuses_connections(self) -> bool:
        try:
            socket.create_connection((HOST, self.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout)


@contextlib.contextmanager
def serving(tmp_path: Path, config: Path, *args: str) -> Iterator[Served]:
    """Start `python -m asgi_gateway serve CONFIG ARGS` on a free port; yield once it is ready."""
    for attempt in range(3):  # the port is chosen here, so another process may take it first
        port = free_port()
        log = tmp_path / f"serve-{port}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "asgi_gateway", "serve", str(config), "--port", str(port), *args],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        served = Served(process, port, log)
        try:
            if _wait_ready(served):
                yield served
                return
            if "address already in use" not in served.log_text().lower() or attempt == 2:
                raise AssertionError(f"serve exited at start-up:\n{served.log_text()}")
        finally:
            _stop(process)
    raise AssertionError("unreachable")


def _wait_ready(served: Served) -> bool:
    deadline = time.monotonic() + 30
    with http_client(served.url, timeout=2) as client:
        while time.monotonic() < deadline:
            if served.process.poll() is not None:
                return False
            try:
                if client.get(f"{ADMIN}/ready").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise AssertionError(f"serve not ready within 30s:\n{served.log_text()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Whatever a test left running: the whole session (workers too), killed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


class Load:
    """`tasks` threads, each with a keep-alive client, sending GET `path` until `stop()` or
    `per_task` requests each; every failure (error or status other than 200) is kept."""

    def __init__(self, url: str, path: str, *, tasks: int = 4, per_task: int = 1000) -> None:
        self.url = url
        self.path = path
        self.per_task = per_task
        self.done = 0
        self.failures: list[str] = []
        #: (time, the response's Connection header) of every response.
        self.answers: list[tuple[float, str | None]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(tasks)]

    def _run(self) -> None:
        with http_client(self.url, timeout=10) as client:
            for _ in range(self.per_task):
                if self._stop.is_set():
                    return
                try:
                    response = client.get(self.path)
                    failure = (
                        None if response.status_code == 200 else f"{response.status_code} {response.text}"
                    )
                except httpx.HTTPError as exc:
                    failure, response = f"{type(exc).__name__}: {exc}", None
                with self._lock:
                    self.done += 1
                    if failure is not None:
                        self.failures.append(failure)
                    elif response is not None:
                        self.answers.append((time.monotonic(), response.headers.get("connection")))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 30) -> None:
        for thread in self._threads:
            thread.join(timeout)
        assert not any(thread.is_alive() for thread in self._threads), "load threads did not finish"

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self.join()


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def answers(url: str, path: str, server: str) -> Callable[[], bool]:
    def check() -> bool:
        with http_client(url, timeout=5) as client:
            response = client.get(path)
        return response.status_code == 200 and response.json().get("server") == server

    return check


# -- SIGHUP -------------------------------------------------------------------------------------


def test_sighup_reloads_in_process_and_the_load_sees_no_failure(tmp_path: Path, upstreams: Upstreams) -> None:
    path = write(tmp_path / "gateway.json", gateway_config(upstreams))
    with serving(tmp_path, path, "--no-access-log") as served:
        # A keep-alive connection opened before the reload: it stays, so nothing restarted.
        with RawConnection.to(served.url) as kept:
            kept.send(b"GET /api/users/echo HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert kept.read_response().status == 200
            with http_client(served.url, timeout=5) as client:
                assert client.get("/api/orders/echo").status_code == 404
            with Load(served.url, "/api/users/echo", tasks=4, per_task=100) as load:
                wait_until(lambda: load.done >= 100, timeout=20, message="the load under way")
                write(path, gateway_config(upstreams, ORDERS_ROUTE))
                served.send(signal.SIGHUP)
                wait_until(answers(served.url, "/api/orders/echo", "u2"), timeout=15, message="the new route")
                load.join()
            assert load.failures == []
            assert load.done == 400
            kept.send(b"GET /api/orders/echo HTTP/1.1\r\nHost: gw\r\n\r\n")
            response = kept.read_response()
            assert response.status == 200 and response.json()["server"] == "u2"
        config = served.status()["config"]
        assert config["version"] == 2
        assert config["last_error"] is None
        assert served.process.poll() is None


def test_sighup_with_an_invalid_file_logs_the_key_path_and_keeps_serving(
    tmp_path: Path, upstreams: Upstreams
) -> None:
    path = write(tmp_path / "gateway.json", gateway_config(upstreams))
    with serving(tmp_path, path) as served:
        broken = gateway_config(upstreams, {"path": "/api/orders", "upstream": "nope"})
        write(path, broken)
        served.send(signal.SIGHUP)
        wait_until(lambda: "routes[1].upstream" in served.log_text(), timeout=15, message="the error logged")
        line = next(line for line in served.log_text().splitlines() if "routes[1].upstream" in line)
        error_line = next(
            line for line in served.log_text().splitlines() if "reload failed" in line or "routes[1]" in line
        )
        assert "ERROR" in error_line, served.log_text()
        assert "'nope' is not a configured upstream" in line
        with http_client(served.url, timeout=5) as client:
            assert client.get("/api/users/echo").json()["server"] == "u1"
            assert client.get("/api/orders/echo").status_code == 404
            config = served.status(client)["config"]
            assert config["version"] == 1
            assert "routes[1].upstream" in config["last_error"]
            # Fixed: the next SIGHUP loads it, and the error is gone.
            write(path, gateway_config(upstreams, ORDERS_ROUTE))
            served.send(signal.SIGHUP)
            wait_until(
                lambda: served.status(client)["config"]["version"] == 2, timeout=15, message="version 2"
            )
            assert served.status(client)["config"]["last_error"] is None
            assert client.get("/api/orders/echo").json()["server"] == "u2"


# -- --watch ------------------------------------------------------------------------------------


def _configmap(directory: Path, generation: int, data: dict[str, Any]) -> None:
    """Publish `data` the way the kubelet updates a ConfigMap volume: a new timestamped directory,
    a `..data` symlink swapped to it by rename, the old directory removed; the file itself
    (`gateway.json` → `..data/gateway.json`) never changes."""
    fresh = directory / f"..2026_01_0{generation}"
    fresh.mkdir()
    (fresh / "gateway.json").write_text(json.dumps(data))
    link = directory / "..data_tmp"
    link.symlink_to(fresh.name)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    os.replace(link, directory / "..data")
    if old is not None:
        for item in (directory / old).iterdir():
            item.unlink()
        (directory / old).rmdir()
    if not (directory / "gateway.json").is_symlink():
        (directory / "gateway.json").symlink_to("..data/gateway.json")


@pytest.mark.parametrize("how", ["editor", "configmap"])
def test_watch_reloads_when_the_file_changes(tmp_path: Path, upstreams: Upstreams, how: str) -> None:
    directory = tmp_path / "config"
    directory.mkdir()
    path = directory / "gateway.json"
    publish: Callable[[int, dict[str, Any]], object]
    if how == "editor":
        publish = lambda generation, data: write(path, data)  # noqa: E731
    else:
        publish = lambda generation, data: _configmap(directory, generation, data)  # noqa: E731
    publish(1, gateway_config(upstreams))
    with serving(tmp_path, path, "--watch") as served, http_client(served.url, timeout=5) as client:
        publish(2, gateway_config(upstreams, ORDERS_ROUTE))
        wait_until(answers(served.url, "/api/orders/echo", "u2"), timeout=15, message="the watched change")
        assert served.status(client)["config"]["version"] == 2
        # A broken file is refused (logged, old config kept); the fix after it is loaded.
        publish(3, gateway_config(upstreams, {"path": "/api/x", "upstream": "nope"}))
        wait_until(lambda: served.status(client)["config"]["last_error"], timeout=15, message="the refusal")
        assert client.get("/api/orders/echo").status_code == 200
        publish(4, gateway_config(upstreams, {"path": "/api/orders", "upstream": "users"}))
        wait_until(answers(served.url, "/api/orders/echo", "u1"), timeout=15, message="the fixed file")
        assert served.status(client)["config"]["version"] == 3


def test_watch_without_watchfiles_says_what_to_install(tmp_path: Path, upstreams: Upstreams) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "watchfiles.py").write_text("raise ImportError('No module named watchfiles')\n")
    path = write(tmp_path / "gateway.json", gateway_config(upstreams))
    result = subprocess.run(
        [sys.executable, "-m", "asgi_gateway", "serve", str(path), "--port", str(free_port()), "--watch"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(shadow)},
    )
    assert result.returncode == 2
    assert "pip install 'asgi-gateway[watch]'" in result.stderr
    assert "Traceback" not in result.stderr


# -- --workers ----------------------------------------------------------------------------------


def test_workers_each_reload_on_sighup_without_restarting(tmp_path: Path, upstreams: Upstreams) -> None:
    path = write(tmp_path / "gateway.json", gateway_config(upstreams, drain_timeout=5))
    with serving(tmp_path, path, "--workers", "2") as served:
        wait_until(lambda: served.count("Application startup complete") == 2, timeout=30, message="2 workers")
        workers = wait_until(
            lambda: len(served.children()) == 2 and served.children(), message="2 worker pids"
        )
        with Load(served.url, "/api/users/echo", tasks=4, per_task=50) as load:
            wait_until(lambda: load.done >= 40, timeout=20, message="the load under way")
            write(path, gateway_config(upstreams, ORDERS_ROUTE, drain_timeout=5))
            served.send(signal.SIGHUP)
            # Each worker logs its own reload.
            wait_until(
                lambda: served.count("config reloaded: version 2") == 2, timeout=15, message="2 reloads"
            )
            load.join()
        assert load.failures == []
        assert served.children() == workers  # reloaded in-process: the same processes
        versions = {served.status()["config"]["version"] for _ in range(20)}
        assert versions == {2}

        # A worker that dies is replaced, and the replacement reads the file as it is now.
        os.kill(min(workers), signal.SIGKILL)
        wait_until(
            lambda: len(served.children()) == 2 and served.children() != workers,
            timeout=20,
            message="a new worker",
        )
        wait_until(lambda: served.count("Application startup complete") == 3, timeout=30, message="it serves")
        for _ in range(10):
            assert answers(served.url, "/api/orders/echo", "u2")()

        served.send(signal.SIGTERM)
        assert served.wait_exit(15) == 0
        assert served.count("SIGTERM: the workers drain") == 1
        assert served.count("drain (from the supervisor): draining") == 2


def test_workers_a_sigterm_to_every_process_drains_once(tmp_path: Path, upstreams: Upstreams) -> None:
    """systemd stops a service by signalling each of its processes, and Ctrl+C signals the whole
    foreground group: a worker gets the supervisor's "drain" and the signal itself, in either
    order, and neither is the second signal that means "exit now"."""
    path = write(tmp_path / "gateway.json", gateway_config(upstreams, drain_delay=2, drain_timeout=5))
    with serving(tmp_path, path, "--workers", "2") as served:
        wait_until(lambda: served.count("Application startup complete") == 2, timeout=30, message="2 workers")
        workers = wait_until(
            lambda: len(served.children()) == 2 and served.children(), message="2 worker pids"
        )
        served.send(signal.SIGTERM)
        # The supervisor's word first (the order that could be mistaken for a second signal) ...
        wait_until(lambda: served.count("drain (from the supervisor): draining") == 2, message="2 drains")
        for pid in workers:
            os.kill(pid, signal.SIGTERM)  # ... then each worker's own signal, within drain_delay
        assert served.wait_exit(15) == 0
        assert "exiting now" not in served.log_text()
        assert served.count("SIGTERM: draining") == 0  # no second drain either


def test_workers_drain_and_exit_when_the_supervisor_dies(tmp_path: Path, upstreams: Upstreams) -> None:
    path = write(tmp_path / "gateway.json", gateway_config(upstreams, drain_timeout=5))
    with serving(tmp_path, path, "--workers", "2") as served:
        wait_until(lambda: served.count("Application startup complete") == 2, timeout=30, message="2 workers")
        workers = wait_until(
            lambda: len(served.children()) == 2 and served.children(), message="2 worker pids"
        )
        served.process.kill()
        served.wait_exit(5)
        # Orphans would go on serving on the shared socket; these see their control socket end.
        wait_until(
            lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers),
            timeout=10,
            message="workers gone",
        )
        assert served.count("the supervisor is gone: draining") == 2


# -- the SIGTERM drain --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[WsUpstream]:
    with WsUpstream("wa") as upstream:
        yield upstream


def test_sigterm_drains_readiness_first_then_requests_then_websockets(
    tmp_path: Path, upstreams: Upstreams, ws_upstream: WsUpstream
) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    drain_delay, drain_timeout = 1.0, 5.0
    data = gateway_config(
        upstreams, {"path": "/ws", "upstream": "ws"}, drain_delay=drain_delay, drain_timeout=drain_timeout
    )
    data["upstreams"]["ws"] = {"servers": [{"url": ws_upstream.url}]}
    path = write(tmp_path / "gateway.json", data)
    with serving(tmp_path, path, "--no-access-log") as served:
        with connect(f"ws://{HOST}:{served.port}/ws/echo?id=drain", open_timeout=5) as session:
            session.send("hello")
            assert session.recv(timeout=5) == "hello"

            slow: dict[str, Any] = {}

            def slow_request() -> None:
                with http_client(served.url, timeout=20) as client:
                    try:
                        slow["status"] = client.get("/api/users/slow?delay=3").status_code
                    except httpx.HTTPError as exc:
                        slow["error"] = repr(exc)
                slow["done"] = time.monotonic()

            slow_thread = threading.Thread(target=slow_request, daemon=True)
            slow_thread.start()
            wait_until(
                lambda: upstreams.u1.stats()["in_flight"].get("slow") == 1,
                message="the slow request upstream",
            )

            with Load(served.url, "/api/users/echo", tasks=3, per_task=100_000) as load:
                wait_until(lambda: load.done >= 30, timeout=20, message="the load under way")
                sent = time.monotonic()
                served.send(signal.SIGTERM)
                with http_client(served.url, timeout=5) as probe:
                    wait_until(
                        lambda: probe.get(f"{ADMIN}/ready").status_code == 503,
                        timeout=5,
                        message="readiness 503",
                    )
                unready = time.monotonic()
                assert unready - sent < drain_delay
                # Still serving while the load balancer takes the instance out (drain_delay); then
                # it sends nothing more, as one would.
                before = load.done
                wait_until(
                    lambda: time.monotonic() > unready + 0.3 and load.done > before + 10, message="served on"
                )
                load.stop()
                load.join()
            assert load.failures == []
            # Every response once draining says Connection: close, so keep-alive clients move on.
            late = [connection for at, connection in load.answers if at > unready + 0.05]
            assert late and all(connection == "close" for connection in late)

            # Then it stops accepting, while the slow request is still in flight ...
            wait_until(served.refuses_connections, timeout=5, message="the listener closed")
            assert "done" not in slow
            # ... and the WebSocket session still echoes until the requests have ended.
            session.send("still here")
            assert session.recv(timeout=5) == "still here"
            with pytest.raises(ConnectionClosed) as closed:
                session.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            # Closed only once the slow request had ended (at about 3 s, two after the
            # listener closed): the upstream had answered it by the time the close came.
            assert upstreams.u1.stats()["completed"].get("slow") == 1
            slow_thread.join(10)
            assert slow.get("status") == 200, slow

            assert served.wait_exit(drain_delay + drain_timeout) in (0, -signal.SIGTERM)
            assert time.monotonic() - sent < drain_delay + drain_timeout


def test_a_second_sigterm_exits_at_once(tmp_path: Path, upstreams: Upstreams) -> None:
    path = write(tmp_path / "gateway.json", gateway_config(upstreams, drain_timeout=30))
    with serving(tmp_path, path) as served:
        hung: dict[str, Any] = {}

        def hang() -> None:
            with http_client(served.url, timeout=60) as client:
                try:
                    hung["status"] = client.get("/api/users/hang").status_code
                except httpx.HTTPError as exc:
                    hung["error"] = repr(exc)

        thread = threading.Thread(target=hang, daemon=True)
        thread.start()
        wait_until(lambda: upstreams.u1.stats()["in_flight"].get("hang") == 1, message="the request upstream")
        served.send(signal.SIGTERM)
        wait_until(served.refuses_connections, timeout=5, message="the listener closed")
        assert served.process.poll() is None  # waiting for the hung request (up to 30 s)
        sent = time.monotonic()
        served.send(signal.SIGTERM)
        served.wait_exit(5)
        assert time.monotonic() - sent < 5
        thread.join(10)
        assert "status" not in hung
