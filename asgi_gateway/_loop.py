"""Finding the running asyncio task, and arming timers, cheaply.

On Python 3.11 every `asyncio.get_running_loop()` (and so every `asyncio.current_task()`,
`asyncio.timeout()`, …) makes a `getpid()` system call, to notice a fork. A proxied request
would otherwise make several of them. The loop found once per thread is remembered here, and
`asyncio.current_task(loop)` with the loop given makes no system call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["CoarseTimer", "CoarseTimers", "coarse_timers", "running_task"]


class _Cache(threading.local):
    loop: asyncio.AbstractEventLoop | None = None
    timers: CoarseTimers | None = None


_cache = _Cache()


def running_task() -> asyncio.Task[Any] | None:
    """The asyncio task running now, or None when not on asyncio (under trio, say)."""
    loop = _cache.loop
    if loop is not None:
        # A loop runs on one thread, and this thread's remembered loop has a task stepping
        # only while that loop runs here, so the task found is ours.
        task = asyncio.current_task(loop)
        if task is not None:
            return task
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    _cache.loop = loop
    return asyncio.current_task(loop)


class CoarseTimer:
    """One timer of `CoarseTimers`; `cancel()` it when it is no longer wanted."""

    __slots__ = ("_args", "_callback", "_slot", "fired")

    def __init__(
        self, callback: Callable[..., object], args: tuple[Any, ...], slot: set[CoarseTimer] | None
    ) -> None:
        self._callback = callback
        self._args = args
        self._slot: set[CoarseTimer] | None = slot
        #: True once the callback has run.
        self.fired = False

    def cancel(self) -> None:
        slot = self._slot
        if slot is not None:
            self._slot = None
            slot.discard(self)
            # The callback is often a method of the timer's owner, which holds the timer:
            # dropped now, that cycle never waits for the garbage collector.
            self._callback = self._args = None  # type: ignore[assignment]

    def _run(self) -> None:
        if self._slot is not None:
            self._slot = None
            self.fired = True
            callback, args = self._callback, self._args
            self._callback = self._args = None  # type: ignore[assignment]
            callback(*args)


class CoarseTimers:
    """Timers on one event loop that fire up to `resolution` seconds late, never early.

    Timers due within one slot run in no particular order.

    Nearly every timer of a proxied request (its deadline, a read timeout) is cancelled long
    before it is due, and a loop timer costs about a microsecond to arm and cancel. These
    share one loop timer per `resolution`-wide slot; arming and cancelling one is a set
    insertion and removal.
    """

    __slots__ = ("_resolution", "_slots", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = 0.01) -> None:
        self.loop = loop
        self._resolution = resolution
        self._slots: dict[int, set[CoarseTimer]] = {}

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> CoarseTimer:
        """Call `callback(*args)` soon after loop time `when`."""
        tick = int(when / self._resolution) + 1
        slot = self._slots.get(tick)
        if slot is None:
            slot = self._slots[tick] = set()
            self.loop.call_at(tick * self._resolution, self._fire, tick)
        timer = CoarseTimer(callback, args, slot)
        slot.add(timer)
        return timer

    def add(self, timer: CoarseTimer, when: float) -> None:
        """Arm `timer`, made with no slot, to run soon after loop time `when` (a subclass of
        `CoarseTimer` overrides `_run`: the timer is then the only object made)."""
        tick = int(when / self._resolution) + 1
        slot = self._slots.get(tick)
        if slot is None:
            slot = self._slots[tick] = set()
            self.loop.call_at(tick * self._resolution, self._fire, tick)
        timer._slot = slot
        slot.add(timer)

    def _fire(self, tick: int) -> None:
        slot = self._slots.pop(tick, None)
        if slot:
            # A callback may cancel others of this slot.
            for timer in list(slot):
                timer._run()


def coarse_timers(loop: asyncio.AbstractEventLoop) -> CoarseTimers:
    """The `CoarseTimers` of `loop`, which must be running in this thread."""
    timers = _cache.timers
    if timers is None or timers.loop is not loop:
        timers = _cache.timers = CoarseTimers(loop)
    return timers
