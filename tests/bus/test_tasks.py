"""The shared done callback that logs a crashed background task."""

from __future__ import annotations

import asyncio
import functools
import logging

import pytest

from chukcha.bus.tasks import log_task_crash


async def test_a_crash_is_logged_a_cancellation_is_not(caplog: pytest.LogCaptureFixture) -> None:
    async def crash() -> None:
        raise RuntimeError("boom")

    crashed = asyncio.create_task(crash(), name="worker")
    cancelled = asyncio.create_task(asyncio.Event().wait(), name="idle")
    for task in (crashed, cancelled):
        task.add_done_callback(functools.partial(log_task_crash, what="demo"))
    cancelled.cancel()
    with caplog.at_level(logging.ERROR, logger="chukcha.bus.tasks"):
        # Done callbacks run in the order they were added: ours before asyncio.wait's.
        await asyncio.wait([crashed, cancelled])
    assert [r.getMessage() for r in caplog.records] == ["demo task worker crashed"]
    assert caplog.records[0].exc_info is not None
