"""A deadline over a block of code, started at once or later (once a request body has ended).

On asyncio it is what `asyncio.timeout_at()` does, without that function's look-ups of the
running loop and task (the caller usually knows its task), and on a coarse timer: nearly every
deadline is left long before it is due. The deadline is itself that timer, so arming one makes
one object. Elsewhere (trio) it is an anyio `CancelScope`.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType
from typing import Any

import anyio

from ._loop import CoarseTimer, coarse_timers

__all__ = ["Deadline"]


class Deadline(CoarseTimer):
    """`with Deadline(seconds, task): ...` cancels the block once `seconds` have passed.

    The clock starts on entering the block, or with `started=False` only at `start()`.
    After the block, `expired` tells whether the deadline ended it: its cancellation is
    then taken back and the block's exception suppressed, so that the caller raises its
    own timeout. A cancellation from elsewhere propagates as it came.

    `task` is the asyncio task running the block, or None off asyncio. `at` is when the
    deadline falls, on the clock of `anyio.current_time()`; `math.inf` for one started late.
    """

    __slots__ = ("_cancelling", "_running", "_scope", "_seconds", "_task", "at", "expired")

    def __init__(self, seconds: float, task: asyncio.Task[Any] | None, started: bool = True) -> None:
        # CoarseTimer's fields, set here: a deadline runs `_run`, no callback.
        self._slot = None
        self.fired = False
        self._seconds = seconds
        self._task = task
        self._scope: anyio.CancelScope | None = None
        self._cancelling = 0
        self._running = started
        self.at = math.inf
        self.expired = False

    def __enter__(self) -> Deadline:
        task = self._task
        started = self._running
        self._running = True
        if task is None:
            scope = self._scope = anyio.CancelScope()
            scope.__enter__()
            if started:
                self.at = scope.deadline = anyio.current_time() + self._seconds
        else:
            self._cancelling = task.cancelling()
            if started:
                loop = task.get_loop()
                self.at = loop.time() + self._seconds
                coarse_timers(loop).add(self, self.at)
        return self

    def start(self) -> None:
        """Start the clock now, for a deadline made with `started=False`; once the block is
        left, nothing. (A callback: `request.body.on_end(deadline.start)`.)"""
        if not self._running:
            return
        task = self._task
        if task is None:
            assert self._scope is not None
            self._scope.deadline = anyio.current_time() + self._seconds
        elif self._slot is None and not self.fired:
            loop = task.get_loop()
            coarse_timers(loop).add(self, loop.time() + self._seconds)

    def _run(self) -> None:
        slot = self._slot
        if slot is not None:
            self._slot = None
            self.fired = True
            assert self._task is not None
            self._task.cancel()

    def cancel(self) -> None:
        slot = self._slot
        if slot is not None:
            self._slot = None
            slot.discard(self)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self._running = False
        scope = self._scope
        if scope is not None:
            suppressed = bool(scope.__exit__(kind, exc, tb))
            # Only the deadline cancels this scope.
            self.expired = scope.cancelled_caught
            return suppressed
        slot = self._slot
        if slot is not None:
            self._slot = None
            slot.discard(self)
            return False
        if not self.fired:
            return False
        assert self._task is not None
        # The deadline's cancellation is taken back; only if nothing else asked for one too is
        # this a timeout (as asyncio.timeout decides).
        if (
            self._task.uncancel() <= self._cancelling
            and kind is not None
            and issubclass(kind, asyncio.CancelledError)
        ):
            self.expired = True
        return self.expired
