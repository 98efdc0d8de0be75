"""A per-key timer survives SIGKILL and restarts of a real ``chukcha run`` process, and its
run applies to the state exactly once (its emits carry one ID however often they are sent)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from chukcha import Client, Node
from chukcha.partitioning import partition_of
from chukcha.processors.engine import read_state_table

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = [pytest.mark.allow_blocking, pytest.mark.timeout(180)]


class App:
    def __init__(self, url: str, state: Path, log: Path) -> None:
        self.cmd = [sys.executable, "-m", "chukcha", "run", "tests.processors.timer_app:app",
                    "--node", url, "--state-dir", str(state)]
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.cmd, cwd=ROOT, stdout=log, stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    async def stop(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(30):
            return await self.proc.wait()


async def wait_for(client: Client, category: str, eid: str,
                   seen: dict[str, list[dict[str, Any]]]) -> None:
    """Read ``category`` (from its start) until an event with ID ``eid`` is there; every copy
    read is added to ``seen`` (by ID)."""
    seen.clear()
    async with client.consumer(category) as consumer, asyncio.timeout(60):
        while eid not in seen:
            for batch in await consumer.read(timeout=1):
                for m in batch.messages():
                    event = orjson.loads(m)
                    seen.setdefault(event["id"], []).append(event)


async def test_a_timer_fires_once_across_sigkills(node: Node, tmp_path: Path) -> None:
    state = tmp_path / "state"
    app = App(node.url, state, tmp_path / "app.log")
    seen: dict[str, list[dict[str, Any]]] = {}
    async with Client([node.url]) as client:
        await app.start()
        try:
            at = time.time() + 1.5  # soon; the kill below most likely comes before it
            await client.send("signups", [{"id": "s-a", "user": "a", "at": at}])
            await wait_for(client, "scheduled", "s-a/0", seen)  # committed (emits follow)
            assert await app.stop(signal.SIGKILL) == -signal.SIGKILL

            await app.start()  # the timer was committed: it is still there and runs
            fired_a = f"timer:@a:{round(at * 1000)}/0"
            await wait_for(client, "fired", fired_a, seen)
            assert await app.stop(signal.SIGKILL) == -signal.SIGKILL  # right after its run

            await app.start()
            # A timer due at once in a's partition: once it ran, a restored "a" (due earlier,
            # and timers of a partition run oldest first) would have run too.
            assert partition_of("b", 2) == partition_of("a", 2)
            now = time.time()
            await client.send("signups", [{"id": "s-b", "user": "b", "at": now}])
            await wait_for(client, "fired", f"timer:@b:{round(now * 1000)}/0", seen)
            assert await app.stop(signal.SIGTERM) == 0
        finally:
            if app.proc is not None and app.proc.returncode is None:
                await app.stop(signal.SIGKILL)
    assert seen.keys() == {fired_a, f"timer:@b:{round(now * 1000)}/0"}, seen
    assert all(copy["n"] == 1 for copies in seen.values() for copy in copies), seen
    table = await asyncio.to_thread(read_state_table, state)
    assert table == {"fired:a": 1, "fired:b": 1}
