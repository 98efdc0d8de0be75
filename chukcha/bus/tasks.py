"""Helpers for the asyncio tasks a component owns."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["log_task_crash"]

logger = logging.getLogger(__name__)


def log_task_crash(task: asyncio.Task[Any], what: str) -> None:
    """A done callback (bind ``what`` with :func:`functools.partial`): log the exception a task
    ended with, so a crashed background task is never silent. A cancellation is not a crash."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error("%s task %s crashed", what, task.get_name(), exc_info=exc)
