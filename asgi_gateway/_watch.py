"""`serve --watch`: notice when the config file's content changes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["watch_config"]

logger = logging.getLogger("asgi_gateway")

#: Reload once the directory has been quiet this long (ms), at most this late (ms).
_WATCH_STEP_MS = 200
_WATCH_DEBOUNCE_MS = 1600


async def watch_config(path: Path, on_change: Callable[[], None], stop: asyncio.Event) -> None:
    """Call `on_change` whenever the content of the file at `path` changes, until `stop` is set.

    The directories are watched, not the file: editors save by writing a new file and
    renaming it over the old one, and a Kubernetes ConfigMap volume swaps a `..data`
    symlink, so the file's own inode may never change. Any change in them counts only
    if the file's bytes differ from what was last seen.
    """
    from watchfiles import awatch

    last = _digest(path)
    while not stop.is_set():
        watched = _watched_dirs(path)
        try:
            async for _ in awatch(
                *watched,
                watch_filter=None,
                recursive=False,
                step=_WATCH_STEP_MS,
                debounce=_WATCH_DEBOUNCE_MS,
                stop_event=stop,
            ):
                digest = _digest(path)
                if digest is not None and digest != last:
                    last = digest
                    on_change()
                if _watched_dirs(path) != watched:
                    break  # the file now resolves elsewhere: watch there
        except Exception as exc:
            # A watched directory that went away, too many inotify watches, ...: keep serving
            # (SIGHUP still reloads) and try again.
            logger.error(
                "cannot watch %s: %s; trying again in 5s", path, exc, extra={"reason": "watch-failed"}
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 5.0)


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None  # mid-swap, or gone: nothing to reload yet


def _watched_dirs(path: Path) -> tuple[str, ...]:
    """The file's directory and, for a symlink to elsewhere, its target's directory.

    A target inside the file's own directory tree (a ConfigMap's `..2024_…/gateway.yaml`) is
    not watched: that directory is replaced on each update, while the rename of `..data`
    shows in the file's directory.
    """
    here = path.parent
    there = Path(os.path.realpath(path)).parent
    if there == here or here in there.parents:
        return (str(here),)
    return (str(here), str(there))
