"""Helpers for the asyncio tasks a component owns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["log_task_crash", "run_to_end", "run_until_first_ends"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


def log_task_crash(task: asyncio.Task[Any], what: str) -> None:
    """A done callback (bind ``what`` with :func:`functools.partial`): log the exception a task
    ended with, so a crashed background task is never silent. A cancellation is not a crash."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error("%s task %s crashed", what, task.get_name(), exc_info=exc)


async def run_until_first_ends(tasks: list[asyncio.Task[Any]]) -> None:
    """Wait until one of ``tasks`` ends, cancel and await the others, then re-raise what the
    first ended with (an etcd session's loops: the first failure ends the session; a TaskGroup
    would wrap it in an ExceptionGroup, which the retry loop would have to unpick)."""
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)
    for t in done:
        t.result()


async def run_to_end(step: Coroutine[Any, Any, _T]) -> _T:
    """Run ``step`` to its end even if the caller is cancelled meanwhile, then re-raise.

    ``step`` changes a file in a worker thread and then the index to match, under ``cat.lock``.
    Cancelling ``await asyncio.to_thread(...)`` does not stop the thread: the caller would leave
    the ``async with cat.lock`` block while the thread is still appending, and the next holder
    of the lock (a download of the same chunk restarted at the same offset, say, when a peer
    link is replaced) would see the old size and append the same bytes a second time; the index
    would miss what the thread did after all. So a cancelled caller waits here, still holding
    the lock, until the change (file and index) is complete, and only then is cancelled.
    """
    task = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):  # cancelled again: still wait
                await asyncio.wait([task])
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.debug("a cancelled change failed: %s", exc)
        raise
