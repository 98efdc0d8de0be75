"""Running a coroutine as a program's main: one place that picks the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run_loop"]

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
