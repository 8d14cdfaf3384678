"""Finding the running asyncio task cheaply.

On Python 3.11 every `asyncio.get_running_loop()` (and so every `asyncio.current_task()`,
`asyncio.timeout()`, …) makes a `getpid()` system call, to notice a fork. A proxied request
used to make five of them. The loop found once per thread is remembered here instead, and
`asyncio.current_task(loop)` with the loop given makes no system call.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

__all__ = ["running_task"]


class _Cache(threading.local):
    loop: asyncio.AbstractEventLoop | None = None


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
