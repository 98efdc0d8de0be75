"""Ctrl-C on ``chukcha node --workers N``: the terminal sends SIGINT to the whole process group
(the supervisor, the writer and the fronts at once). The workers ignore it and the supervisor
stops them as on SIGTERM: the fronts first (their requests in flight finish), then the writer;
nothing answered 200 is lost."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from chukcha.testing import NodeProcess
from tests.integration.test_workers import _assert_answered_stored_once, _wait_for_children

pytestmark = pytest.mark.timeout(150)


async def test_ctrl_c_stops_the_fronts_first_then_the_writer_and_loses_no_answered_write(
    tmp_path: Path,
) -> None:
    node = NodeProcess(tmp_path / "data", "w", ["--workers", "3", "--log-level", "INFO"],
                       own_group=True)
    await node.start()
    try:
        assert node.proc is not None
        sup = node.proc.pid
        assert os.getpgid(sup) == sup != os.getpgid(0)
        await _wait_for_children(sup, 3, set())
        answered: list[bytes] = []
        flowing = asyncio.Event()

        async def client(name: str) -> None:
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                for i in range(1_000_000):
                    msg = b"%s-%06d" % (name.encode(), i)
                    try:
                        async with http.post(f"{node.url}/write", params={"category": "pay"},
                                             data=msg + b"\n") as resp:
                            await resp.read()
                            if resp.status != 200:
                                return  # the node is stopping
                    except (aiohttp.ClientError, TimeoutError):
                        return  # unknown fate (may be stored); the node is stopping
                    answered.append(msg)
                    if len(answered) >= 300:
                        flowing.set()

        clients = [asyncio.create_task(client(f"c{n}")) for n in range(8)]
        async with asyncio.timeout(60):
            await flowing.wait()
        os.killpg(sup, signal.SIGINT)  # Ctrl-C: the whole group
        async with asyncio.timeout(60):
            await asyncio.gather(*clients)
            assert await node.proc.wait() == 0
        log = await asyncio.to_thread(node.log_text)
        fronts = [m.start() for m in re.finditer(r"front worker \d+ stopped \(code 0\)", log)]
        writer = log.find("instance=w stopping (signal)")
        assert len(fronts) == 2 and writer > max(fronts), log[-3000:]
        assert re.search(r"primary worker \d+ stopped \(code 0\)", log), log[-3000:]

        await node.start()  # the data, as the next start finds it
        await _assert_answered_stored_once(node.url, "pay", answered)
    finally:
        await node.stop()
        node.close()
