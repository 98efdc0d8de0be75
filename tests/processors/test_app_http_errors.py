"""The app's HTTP port answers an unhandled error with its reason in plain text and logs the
traceback (issue 11 point 8: no generic "Server got itself in trouble" anywhere)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import aiohttp
import pytest

from chukcha.client.consumer import Consumer
from chukcha.processors.monitor import AppMonitor


def _failing_consumers() -> Mapping[str, Consumer]:
    raise RuntimeError("consumers are gone")


async def test_an_unhandled_error_is_answered_with_its_reason_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    monitor = AppMonitor("billing", 1, {}, _failing_consumers)
    await monitor.start("127.0.0.1", 0)
    try:
        with caplog.at_level(logging.ERROR, logger="chukcha.processors.monitor"):
            async with aiohttp.ClientSession() as http, \
                    http.get(f"http://{monitor.address}/ui") as resp:
                assert resp.status == 500
                body = await resp.text()
        assert body == "internal error: RuntimeError: consumers are gone\n"
        assert "trouble" not in body
        failed = [r for r in caplog.records if "/ui failed" in r.getMessage()]
        assert len(failed) == 1
        assert failed[0].exc_info is not None  # the traceback is in the log
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://{monitor.address}/nothing") as resp:
            assert resp.status == 404  # aiohttp's own answers pass through unchanged
    finally:
        await monitor.stop()
