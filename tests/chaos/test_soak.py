"""Soak: many GETs through a real gateway process while one of its two servers flaps.

Afterwards every request is accounted for, and the gateway's resources are back near their start:

- sent == answered, every answer a 200 carrying the request's own X-Request-Id (nothing lost,
  nothing crossed between requests);
- the steady server received exactly the requests it answered (the gateway dropped nothing it
  sent there and sent nothing twice); the flapping one received what it answered plus at most
  the requests in flight when it was killed (those were retried on the steady one). Both count
  their requests in a file (`counting_upstream.py`), so the count survives SIGKILL;
- asyncio tasks back to the baseline, no busy pool connection, no socket in CLOSE_WAIT, file
  descriptors within the idle pool connections kept, RSS grown by a bounded amount.

The light variant runs in the normal suite; the 100,000-request one is marked `slow`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from chaos.chaos_tools import (
    CountingUpstream,
    MiB,
    assert_nothing_lost,
    config,
    record,
    run_load,
    upstream,
    warm,
)

CONCURRENCY = 8
PATH = "/pair/slow?delay=0.002"


@pytest.fixture
def pair() -> Iterator[tuple[CountingUpstream, CountingUpstream]]:
    steady, flapper = CountingUpstream("steady"), CountingUpstream("flapper")
    try:
        steady.start(wait=False)
        flapper.start(wait=False)
        steady.wait_ready()
        flapper.wait_ready()
        yield steady, flapper
    finally:
        steady.close()
        flapper.close()


def soak(
    pair: tuple[CountingUpstream, CountingUpstream],
    gateway_process: Any,
    *,
    total: int,
    time_limit: float,
    down: float,
    up: float,
    pause: float,
    rss_growth: int,
) -> None:
    steady, flapper = pair
    # Health checks alone (no ejection back-off) bring the flapper back at once, so it is busy
    # when it is killed; each request takes a few ms there, so some are in flight at the kill.
    gateway = gateway_process(config(pair=upstream(steady.url, flapper.url, outlier=False)))
    warm(gateway, PATH, n=200)
    steady_before, flapper_before = steady.received(), flapper.received()
    baseline = gateway.baseline()
    kills = 0
    stop = threading.Event()

    def flap() -> None:
        nonlocal kills
        while not stop.wait(up):
            flapper.kill()
            kills += 1
            if stop.wait(down):
                break
            flapper.restart()

    flapping = threading.Thread(target=flap, daemon=True)
    flapping.start()
    try:
        result = run_load(
            gateway.url,
            PATH,
            total=total,
            concurrency=CONCURRENCY,
            time_limit=time_limit,
            check_echo=True,
            id_prefix="soak",
            pause=pause,
        )
    finally:
        stop.set()
        flapping.join(30)
    assert not flapping.is_alive()
    if not flapper.is_running():
        flapper.restart()

    assert result.sent == total, f"the time limit cut the run short: {result.summary()}"
    assert_nothing_lost(result, cut_from="flapper", max_cut=kills * CONCURRENCY)
    assert kills >= 2, f"the server flapped only {kills} time(s): {result.summary()}"
    steady_received = steady.received() - steady_before
    flapper_received = flapper.received() - flapper_before
    cut = result.cut["flapper"]
    assert result.by_server["steady"] + result.by_server["flapper"] + cut == total, result.summary()
    assert steady_received == result.by_server["steady"], (steady_received, result.summary())
    died_with_it = flapper_received - result.by_server["flapper"] - cut
    assert 0 <= died_with_it <= kills * CONCURRENCY, (flapper_received, kills, result.summary())

    after = gateway.settled(baseline, rss_growth=rss_growth)
    record(
        f"soak: {total:,} GETs, one server flapping",
        f"{result.answered:,} answered, all 200, 0 crossed, {cut} cut after their head; {kills} kills; "
        "steady server received exactly "
        f"its {result.by_server['steady']:,}; {died_with_it} died in flight on the flapper and were retried; "
        f"RSS {(after.rss - baseline.rss) / MiB:+.1f} MiB, fds {after.fds - baseline.fds:+d}, "
        f"tasks {after.tasks - baseline.tasks:+d}",
        None,
        f"{result.elapsed:.1f}s, {total / result.elapsed:,.0f} req/s",
    )


def test_soak_with_a_flapping_server(
    pair: tuple[CountingUpstream, CountingUpstream], gateway_process: Any
) -> None:
    soak(pair, gateway_process, total=8000, time_limit=60, down=0.3, up=0.3, pause=0.0, rss_growth=16 * MiB)


@pytest.mark.slow
def test_soak_100k_with_a_flapping_server(
    pair: tuple[CountingUpstream, CountingUpstream], gateway_process: Any
) -> None:
    started = time.monotonic()
    soak(
        pair, gateway_process, total=100_000, time_limit=600, down=1.0, up=1.0, pause=0.0, rss_growth=24 * MiB
    )
    assert time.monotonic() - started < 600
