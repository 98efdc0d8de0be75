"""Running a coroutine as a program's main: one place that picks the event loop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run_loop", "stop_signals"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed (CPython off Windows), else asyncio; return
    its result."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return asyncio.run(main)
    return uvloop.run(main)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop a serving process: SIGTERM, and SIGINT unless the process was
    started with SIGINT ignored (a worker of ``chukcha node --workers N``: Ctrl-C reaches the
    whole process group, and the supervisor stops the workers in order; as a shell leaves a
    background job's SIGINT ignored)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return (signal.SIGTERM,)
    return (signal.SIGINT, signal.SIGTERM)
