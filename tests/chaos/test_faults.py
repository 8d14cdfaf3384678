"""Fault injection against a real gateway process and real upstream processes on 127.0.0.1.

Each test takes the gateway's resources after a warm-up (`baseline()`), injects one fault while
a load loop keeps sending GETs, and checks: what the client sees (a status, or a response that
is visibly cut: fewer bytes than its Content-Length or no last chunk, and the connection
closed), that no idempotent request was lost while a healthy server was there, that the
gateway's tasks, pool connections, file descriptors and memory come back (`settled()`), and how
long recovery took. The outcomes are printed in a table at the end of the run.

The upstreams run with fast health checks (every 0.25 s, one probe decides) and a 1 s base
ejection, so that each test takes a few seconds; recovery times scale with those settings.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from chaos.chaos_tools import (
    GatewayProcess,
    RawStream,
    ScriptedServer,
    assert_nothing_lost,
    background_load,
    config,
    drip,
    first_success_after,
    peak_rss,
    record,
    run_load,
    send,
    send_then_reset,
    upstream,
    wait_for_answers,
    warm,
    window,
)
from servers import RawConnection, UpstreamProcess, Upstreams, raw_request, wait_until
from upstream_app import stream_sha256

MiB = 1024 * 1024
OK_HEAD = b"HTTP/1.1 200 OK\r\n"


def cut_short(stream: RawStream) -> bool:
    """The client can tell the body is incomplete: an error, no clean end, fewer bytes than announced."""
    length = stream.header(b"content-length")
    short = length is None or stream.received < int(length)
    return stream.error is not None and not stream.complete and short


# -- process faults -------------------------------------------------------------------------------


def test_upstream_sigkilled_mid_stream(upstreams: Upstreams, gateway_process: Any) -> None:
    gateway = gateway_process(config(pair=upstream(upstreams.u1.url, upstreams.u2.url)))
    warm(gateway, "/pair/echo")
    baseline = gateway.baseline()
    with background_load(gateway.url, "/pair/echo", concurrency=3, check_echo=True, time_limit=30) as load:
        with RawStream(
            gateway.url, b"GET /pair/stream?n=2000&size=65536&delay=0.002 HTTP/1.1\r\nHost: x\r\n\r\n"
        ) as download:
            download.read_head()
            assert download.read_body(limit=MiB) >= MiB
            name = download.header(b"x-upstream-name")
            assert name is not None
            victim = upstreams[name.decode()]
            killed = time.monotonic()
            victim.kill()
            download.read_body()
            cut_after = time.monotonic() - killed
        assert cut_short(download), (download.received, download.error)
        wait_for_answers(load, 50, after=killed)
        victim.restart()
        back = time.monotonic()
        wait_until(
            lambda: first_success_after(load, back, victim.name) is not None, 15, message="traffic to return"
        )
        recovery = first_success_after(load, back, victim.name)
    assert_nothing_lost(load, cut_from=victim.name, max_cut=3)
    gateway.settled(baseline)
    record(
        "upstream SIGKILLed mid-stream",
        f"that download cut short in {cut_after * 1000:.0f} ms (connection closed, {download.received} of "
        f"{2000 * 65536} bytes); of {load.sent} concurrent GETs 0 failed, {sum(load.cut.values())} cut "
        "after their head",
        recovery,
        "restart to first response from it",
    )


def test_upstream_sigstopped_then_resumed(upstreams: Upstreams, gateway_process: Any) -> None:
    gateway = gateway_process(config(pair=upstream(upstreams.u1.url, upstreams.u2.url, read=0.5)))
    warm(gateway, "/pair/echo")
    baseline = gateway.baseline()
    frozen = upstreams.u1
    with background_load(gateway.url, "/pair/echo", concurrency=3, check_echo=True, time_limit=30) as load:
        wait_for_answers(load, 30)
        stopped = time.monotonic()
        frozen.stop()
        wait_until(
            lambda: not gateway.state()["servers"][frozen.url]["healthy"],
            10,
            message="the frozen server marked down",
        )
        detected = time.monotonic() - stopped
        wait_for_answers(load, 50, after=time.monotonic())
        frozen.cont()
        resumed = time.monotonic()
        wait_until(
            lambda: first_success_after(load, resumed, "u1") is not None, 15, message="u1 to serve again"
        )
        recovery = first_success_after(load, resumed, "u1")
    assert_nothing_lost(load, cut_from="u1", max_cut=3)
    during = window(load, stopped, resumed)
    slowest = load.max_latency()
    # A request caught on the frozen server waits one read timeout, then goes to the other.
    assert slowest < 0.5 + 1.0, load.summary()
    gateway.settled(baseline)
    record(
        "upstream SIGSTOPped (hang), resumed",
        f"of {load.sent} GETs 0 failed, {sum(load.cut.values())} cut; caught ones wait one read timeout "
        "(0.5 s) and retry "
        f"(slowest {slowest:.2f}s); marked down in {detected:.2f}s; {during.sent} answered while frozen",
        recovery,
        "SIGCONT to first response from it",
    )


def test_every_upstream_down_then_back(upstreams: Upstreams, gateway_process: Any) -> None:
    gateway = gateway_process(config(pair=upstream(upstreams.u1.url, upstreams.u2.url)))
    warm(gateway, "/pair/echo")
    baseline = gateway.baseline()
    with background_load(gateway.url, "/pair/echo", concurrency=2, pause=0.005, time_limit=30) as load:
        wait_for_answers(load, 20)
        down = time.monotonic()
        upstreams.u1.kill()
        upstreams.u2.kill()
        wait_until(
            lambda: not any(s["healthy"] for s in gateway.state()["servers"].values()),
            10,
            message="both marked down",
        )
        all_down = time.monotonic()
        wait_for_answers(load, 20, after=all_down)
        # While nothing is available: a JSON 503 at once, with Retry-After.
        refused = raw_request(gateway.url, target="/pair/echo")
        assert refused.status == 503 and refused.json()["error"] == "upstream_unavailable"
        assert refused.header("retry-after") is not None
        upstreams.u1.restart()
        back = time.monotonic()
        upstreams.u2.restart()
        wait_until(lambda: first_success_after(load, back) is not None, 15, message="the first success")
        recovery = first_success_after(load, back)
    outage = window(load, down + 0.01, back)
    assert outage.sent > 0 and set(outage.statuses) <= {200, 502, 503}, outage.summary()
    assert not outage.errors, outage.summary()
    # Never a hang: each failure is answered at once (a connect failure or 503).
    outage_latency = max(
        (
            latency
            for latency, (t, _, _) in zip(load.latencies, load.timeline, strict=True)
            if all_down <= t <= back
        ),
        default=0.0,
    )
    assert outage_latency < 1.0, outage_latency
    gateway.settled(baseline)
    record(
        "every upstream down, then back",
        f"502 (connect failure) until marked down in {all_down - down:.2f}s, then 503 + Retry-After at once "
        f"(slowest {outage_latency * 1000:.0f} ms); {outage.statuses.get(503, 0)} x 503, "
        f"{outage.statuses.get(502, 0)} x 502",
        recovery,
        "first server restarted to first 200",
    )


def test_flapping_upstream(upstreams: Upstreams, upstream_factory: Any, gateway_process: Any) -> None:
    flapper: UpstreamProcess = upstream_factory("flapper")
    gateway = gateway_process(config(pair=upstream(upstreams.u1.url, flapper.url)))
    warm(gateway, "/pair/echo")
    baseline = gateway.baseline()
    ups: list[float] = []
    stop = threading.Event()

    def flap() -> None:
        for _ in range(3):
            if stop.wait(0.8):
                return
            flapper.kill()
            if stop.wait(0.8):
                break
            flapper.restart()
            ups.append(time.monotonic())

    with background_load(gateway.url, "/pair/echo", concurrency=4, check_echo=True, time_limit=30) as load:
        thread = threading.Thread(target=flap, daemon=True)
        thread.start()
        thread.join(30)
        stop.set()
        assert not thread.is_alive()
        if not flapper.is_running():
            flapper.restart()
            ups.append(time.monotonic())
        wait_until(
            lambda: first_success_after(load, ups[-1], "flapper") is not None, 15, message="flapper back"
        )
    assert_nothing_lost(load, cut_from="flapper", max_cut=len(ups) * 4)
    recoveries = [r for r in (first_success_after(load, up, "flapper") for up in ups) if r is not None]
    gateway.settled(baseline)
    record(
        "flapping upstream (down/up every ~1 s)",
        f"of {load.sent} GETs 0 failed, {sum(load.cut.values())} cut (p100 latency "
        f"{load.max_latency() * 1000:.0f} ms); the flapper "
        f"served {load.by_server['flapper']}",
        max(recoveries),
        f"restart to first response, worst of {len(ups)}; ejections back off while it flaps",
    )


# -- broken responses -------------------------------------------------------------------------------

SCRIPTS = {
    # Reset with no answer at all (a crash while handling).
    "/flaky/reset": send_then_reset(b""),
    "/flaky/garbage": send(b"HTTP/1.1 2OO OK\r\n\r\n"),
    "/solo/reset-after-head": send_then_reset(OK_HEAD + b"Content-Length: 1048576\r\n\r\n" + b"x" * 65536),
    "/solo/chunked-reset": send_then_reset(
        OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n10000\r\n" + b"x" * 65536 + b"\r\n"
    ),
    "/solo/garbage": send(b"HTTP/1.1 2OO OK\r\n\r\n"),
    "/solo/not-http": send(b"SSH-2.0-OpenSSH_9.6\r\n"),
}


def scripted_config(scripted: ScriptedServer, healthy_url: str) -> dict[str, Any]:
    # No outlier detection: every request meets the broken server, none is spared by an ejection.
    return config(
        flaky=upstream(scripted.url, healthy_url, health=False, outlier=False),
        solo=upstream(scripted.url, attempts=1, health=False, outlier=False),
    )


def test_connection_reset_after_the_response_head(upstreams: Upstreams, gateway_process: Any) -> None:
    with ScriptedServer(dict(SCRIPTS)) as scripted:
        gateway = gateway_process(scripted_config(scripted, upstreams.u1.url))
        warm(gateway, "/flaky/echo")
        baseline = gateway.baseline()
        for path in (b"/solo/reset-after-head", b"/solo/chunked-reset"):
            with RawStream(gateway.url, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path) as cut:
                assert cut.read_head().status_code == 200
                cut.read_body()
            # The head went out before the reset: the body is visibly cut, never passed off as whole.
            assert cut_short(cut), (path, cut.received, cut.error)
            assert cut.received <= 65536
        # Reset before any answer: idempotent requests go to the healthy server instead.
        gets = run_load(gateway.url, "/flaky/reset", total=40, concurrency=2, time_limit=20)
        assert_nothing_lost(gets)
        assert gets.by_server == {"u1": 40}
        # A POST that reached the reset server is not sent again: 502, and never twice.
        before = scripted.requests["/flaky/reset"]
        before_u1 = upstreams.u1.requests("echo")
        posts = [
            raw_request(gateway.url, method="POST", target="/flaky/reset", body=b"once") for _ in range(10)
        ]
        statuses = sorted(response.status for response in posts)
        assert set(statuses) <= {200, 502}
        assert scripted.requests["/flaky/reset"] - before == statuses.count(502)
        assert upstreams.u1.requests("echo") - before_u1 == statuses.count(200)
        gateway.settled(baseline)
    record(
        "connection reset after the response head",
        "200 head, then the body cut (connection closed, fewer bytes than Content-Length / no last chunk)",
        0.0,
        "next request is served",
    )
    record(
        "connection reset before any response",
        f"GET: retried on the other server, 0 of 40 failed; POST: 502, never sent twice ({statuses.count(502)}/10)",
        0.0,
    )


def test_malformed_response(upstreams: Upstreams, gateway_process: Any) -> None:
    with ScriptedServer(dict(SCRIPTS)) as scripted:
        gateway = gateway_process(scripted_config(scripted, upstreams.u1.url))
        warm(gateway, "/flaky/echo")
        baseline = gateway.baseline()
        for path in ("/solo/garbage", "/solo/not-http"):
            response = raw_request(gateway.url, target=path)
            assert response.status == 502 and response.json()["error"] == "bad_gateway", response.body
        gets = run_load(gateway.url, "/flaky/garbage", total=40, concurrency=2, time_limit=20)
        assert_nothing_lost(gets)
        assert gets.by_server == {"u1": 40}
        assert scripted.requests["/flaky/garbage"] >= 10
        gateway.settled(baseline)
    record(
        "malformed response",
        "502 bad_gateway (JSON) when it is the only server; GETs retried on another: 0 of 40 failed",
        0.0,
    )


def test_slow_drip_fed_upstream(upstreams: Upstreams, gateway_process: Any) -> None:
    stopping = threading.Event()
    head = (
        OK_HEAD + b"Content-Type: text/plain\r\nX-Padding: " + b"p" * 100 + b"\r\nContent-Length: 2\r\n\r\nok"
    )
    scripts = {"/drip/head": drip(head, step=1, interval=0.05, stop=stopping)}
    with ScriptedServer(scripts) as scripted:
        gateway = gateway_process(
            config(
                one=upstream(upstreams.u1.url, attempts=1, read=0.75, health=False),
                drip=upstream(scripted.url, attempts=1, read=0.75, health=False, outlier=False),
            )
        )
        warm(gateway, "/one/echo")
        baseline = gateway.baseline()
        # A body dripped within the read timeout arrives whole, and as it is produced.
        n, size = 8, 1024
        started = time.monotonic()
        with RawStream(
            gateway.url, b"GET /one/stream?n=%d&size=%d&delay=0.15 HTTP/1.1\r\nHost: x\r\n\r\n" % (n, size)
        ) as slow:
            slow.read_body(limit=1)
            first = time.monotonic() - started
            slow.read_body()
            whole = time.monotonic() - started
        assert slow.complete and slow.digest.hexdigest() == stream_sha256(n, size)
        assert first < whole / 2, (first, whole)
        # Slower than the read timeout between chunks: cut after one timeout, visibly.
        started = time.monotonic()
        with RawStream(
            gateway.url, b"GET /one/stream?n=3&size=1024&delay=2 HTTP/1.1\r\nHost: x\r\n\r\n"
        ) as stalled:
            stalled.read_body()
            cut_at = time.monotonic() - started
        assert cut_short(stalled) and stalled.received == 1024
        assert 0.6 < cut_at < 1.5, cut_at
        # A head dripped a byte at a time is not waited for beyond the read timeout (slowloris).
        started = time.monotonic()
        response = raw_request(gateway.url, target="/drip/head")
        gave_up = time.monotonic() - started
        assert response.status == 504 and response.json()["error"] == "gateway_timeout"
        assert gave_up < 1.5, gave_up
        stopping.set()
        gateway.settled(baseline)
    record(
        "slow upstream drip-feeding its body",
        f"within the read timeout: streamed through (first byte {first * 1000:.0f} ms, whole {whole:.1f}s); "
        f"a gap over it: body cut after {cut_at:.2f}s; a dripped head: 504 after {gave_up:.2f}s",
        0.0,
    )


# -- client faults ----------------------------------------------------------------------------------


def test_client_disconnecting_mid_upload(upstreams: Upstreams, gateway_process: Any) -> None:
    gateway = gateway_process(config(one=upstream(upstreams.u1.url)))
    warm(gateway, "/one/echo")
    baseline = gateway.baseline()
    heads = [
        b"POST /one/upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (50 * MiB),
        b"POST /one/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    ]
    noticed = []
    for index, head in enumerate(heads, start=1):
        chunk = b"u" * 65536
        if b"chunked" in head:
            chunk = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        with RawConnection.to(gateway.url) as conn:
            conn.send(head)
            for _ in range(32):
                conn.sock.sendall(chunk)
            wait_until(
                lambda: upstreams.u1.stats()["in_flight"].get("upload"), 10, message="the upload upstream"
            )
            gone = time.monotonic()
        upstreams.u1.wait_disconnects("upload", index)
        noticed.append(time.monotonic() - gone)
    stats = upstreams.u1.stats()
    assert stats["completed"].get("upload", 0) == 0, stats
    gateway.settled(baseline)
    record(
        "client disconnects mid-upload",
        "the upstream request is aborted (the upstream sees a disconnect, never a complete body)",
        max(noticed),
        "client gone to upstream aborted",
    )


def test_client_disconnecting_mid_download(upstreams: Upstreams, gateway_process: Any) -> None:
    gateway = gateway_process(config(one=upstream(upstreams.u1.url)))
    warm(gateway, "/one/echo")
    baseline = gateway.baseline()
    # The upstream pauses a moment between chunks: an app that never awaits between sends does
    # not hear of a disconnect until it is done (uvicorn's send() just drops the bytes).
    with RawStream(
        gateway.url, b"GET /one/stream?n=3200&size=65536&delay=0.001 HTTP/1.1\r\nHost: x\r\n\r\n"
    ) as download:
        download.read_body(limit=MiB)
        assert gateway.snapshot().pool["busy"] >= 1
        gone = time.monotonic()
    wait_until(lambda: gateway.snapshot().pool["busy"] == 0, 10, message="the upstream connection released")
    released = time.monotonic() - gone
    upstreams.u1.wait_disconnects("stream")
    noticed = time.monotonic() - gone
    assert upstreams.u1.stats()["completed"].get("stream", 0) == 0
    gateway.settled(baseline)
    record(
        "client disconnects mid-download",
        f"the upstream request is cancelled: its connection closed {released * 1000:.0f} ms after the client left",
        noticed,
        "client gone to upstream saw it",
    )


def slow_read(
    gateway: GatewayProcess, n: int, size: int, *, rate: float, stall: float
) -> tuple[RawStream, int, float]:
    """Read `stream?n&size` through `gateway`: stall `stall` s after the first MiB, then read at
    about `rate` bytes/s. Returns the stream, the gateway's peak RSS growth and the read time."""
    started = time.monotonic()
    with peak_rss(gateway) as rss:
        with RawStream(
            gateway.url,
            b"GET /one/stream?n=%d&size=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (n, size),
            rcvbuf=65536,
            timeout=30,
        ) as stream:
            stream.recv_size = 16384
            stream.read_body(limit=MiB)
            stalled = threading.Event()
            stalled.wait(stall)
            piece = max(65536, int(rate / 50))
            deadline = time.monotonic() + (n * size) / rate * 2 + 30
            while not stream.ended and time.monotonic() < deadline:
                began = time.monotonic()
                stream.read_body(limit=piece)
                # Pace the reads: never faster than `rate`.
                stalled.wait(max(0.0, piece / rate - (time.monotonic() - began)))
    return stream, rss[1] - rss[0], time.monotonic() - started


def test_slow_reading_client_gets_back_pressure(upstreams: Upstreams, gateway_process: Any) -> None:
    gateway = gateway_process(config(one=upstream(upstreams.u1.url, read=30.0)))
    warm(gateway, "/one/echo")
    baseline = gateway.baseline()
    n, size = 3200, 65536  # 200 MiB
    stream, growth, took = slow_read(gateway, n, size, rate=80 * MiB, stall=1.0)
    assert stream.complete and stream.received == n * size, stream.error
    assert stream.digest.hexdigest() == stream_sha256(n, size)
    # The gateway holds a bounded window of the body, whatever the client's pace.
    assert growth < 32 * MiB, growth / MiB
    gateway.settled(baseline)
    record(
        "slow-reading client (200 MiB)",
        f"body complete and intact; gateway RSS +{growth / MiB:.1f} MiB at most (read in {took:.1f}s, "
        "after a 1 s stall)",
        None,
    )


@pytest.mark.slow
def test_very_slow_reading_client_gets_back_pressure(upstreams: Upstreams, gateway_process: Any) -> None:
    gateway = gateway_process(config(one=upstream(upstreams.u1.url, read=30.0)))
    warm(gateway, "/one/echo")
    baseline = gateway.baseline()
    n, size = 3200, 65536
    stream, growth, took = slow_read(gateway, n, size, rate=8 * MiB, stall=5.0)
    assert stream.complete and stream.digest.hexdigest() == stream_sha256(n, size), stream.error
    assert growth < 32 * MiB, growth / MiB
    gateway.settled(baseline)
    record(
        "very slow client (200 MiB at 8 MiB/s)",
        f"complete; gateway RSS +{growth / MiB:.1f} MiB at most",
        None,
        f"{took:.0f}s",
    )


def test_state_route_sees_the_gateway(gateway_process: Any, upstreams: Upstreams) -> None:
    # The instruments the other tests rely on: if these read nothing, the leak checks prove nothing.
    gateway = gateway_process(config(one=upstream(upstreams.u1.url, health=False)))
    before = gateway.baseline()
    with RawStream(gateway.url, b"GET /one/hang HTTP/1.1\r\nHost: x\r\n\r\n"):
        wait_until(lambda: upstreams.u1.stats()["in_flight"].get("hang"), 10, message="the hanging request")
        during = gateway.snapshot()
        assert during.tasks > before.tasks
        assert during.pool["busy"] == 1 and during.in_flight == {"one": 1}
        assert during.inbound >= 1 and during.fds > before.fds
        with pytest.raises(AssertionError, match="did not settle"):
            gateway.settled(before, timeout=0.3)
    assert gateway.settled(before).pool["busy"] == 0
