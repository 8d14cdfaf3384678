"""The per-thread running-task cache and the coarse timers."""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio

from asgi_gateway._loop import CoarseTimers, coarse_timers, running_task


def test_running_task_is_the_current_task_across_loops() -> None:
    seen: list[bool] = []

    async def check() -> None:
        seen.append(running_task() is asyncio.current_task())

    for _ in range(3):  # a new loop each time in this thread: the cache must follow
        asyncio.run(check())
    assert seen == [True, True, True]


def test_running_task_per_thread() -> None:
    results: dict[str, bool] = {}

    def in_thread(name: str) -> None:
        async def check() -> None:
            results[name] = running_task() is asyncio.current_task()

        asyncio.run(check())

    threads = [threading.Thread(target=in_thread, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == {f"t{i}": True for i in range(4)}


def test_running_task_outside_asyncio_is_none() -> None:
    async def check() -> asyncio.Task[object] | None:
        return running_task()

    asyncio.run(check())  # leaves a loop cached in this thread
    assert running_task() is None
    assert trio.run(check) is None


def test_coarse_timers_fire_in_order_never_early() -> None:
    async def main() -> list[tuple[int, float]]:
        loop = asyncio.get_running_loop()
        timers = CoarseTimers(loop, resolution=0.01)
        fired: list[tuple[int, float]] = []
        done = asyncio.Event()
        start = loop.time()
        for index, delay in enumerate([0.05, 0.001, 0.03, 0.0305]):
            when = start + delay

            def record(index: int = index, when: float = when) -> None:
                fired.append((index, loop.time() - when))
                if len(fired) == 4:
                    done.set()

            timers.call_at(when, record)
        await asyncio.wait_for(done.wait(), 5)
        return fired

    fired = asyncio.run(main())
    # In order when a slot apart; within one slot (2 and 3) in any order.
    order = [index for index, _ in fired]
    assert order[0] == 1 and order[-1] == 0 and sorted(order[1:3]) == [2, 3]
    # Never before its time (loop clock granularity aside), and late by about one slot at most.
    assert all(-0.002 <= late < 0.2 for _, late in fired), fired


def test_coarse_timers_cancelled_never_run_even_from_the_same_slot() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        timers = CoarseTimers(loop, resolution=0.05)
        ran: list[str] = []
        done = asyncio.Event()
        when = loop.time() + 0.01
        cancelled = timers.call_at(when, ran.append, "cancelled")
        cancelled.cancel()
        cancelled.cancel()  # twice is harmless
        # Two in one slot: whichever runs first cancels the other.
        first = timers.call_at(when, lambda: (ran.append("a"), second.cancel()))
        second = timers.call_at(when, lambda: (ran.append("b"), first.cancel()))
        timers.call_at(when + 0.06, lambda: (ran.append("later"), done.set()))
        await asyncio.wait_for(done.wait(), 5)
        first.cancel()  # after it ran: harmless
        return ran

    ran = asyncio.run(main())
    assert ran[-1] == "later"
    assert sorted(ran[:-1]) in (["a"], ["b"])


def test_coarse_timers_per_loop() -> None:
    async def get() -> CoarseTimers:
        loop = asyncio.get_running_loop()
        assert coarse_timers(loop) is coarse_timers(loop)
        return coarse_timers(loop)

    assert asyncio.run(get()) is not asyncio.run(get())


@pytest.mark.parametrize("resolution", [0.001, 0.01])
def test_coarse_timer_many_share_few_loop_timers(resolution: float) -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        timers = CoarseTimers(loop, resolution=resolution)
        count = 0
        hit = asyncio.Event()

        def fire() -> None:
            nonlocal count
            count += 1
            if count == 1000:
                hit.set()

        base = loop.time() + 0.02
        for _ in range(1000):
            timers.call_at(base, fire)
        assert len(timers._slots) == 1
        await asyncio.wait_for(hit.wait(), 5)
        return count

    assert asyncio.run(main()) == 1000
