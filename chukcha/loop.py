"""Running a coroutine as a program's main: one place that picks the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["run_loop"]

logger = logging.getLogger(__name__)


def run_loop(main: Coroutine[Any, Any, Any]) -> None:
    """Run ``main`` on uvloop when it is installed (it is a dependency), else asyncio."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        asyncio.run(main)
    else:
        uvloop.run(main)
