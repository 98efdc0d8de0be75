"""A zombie's late changelog records must not change what the bus restores.

A changelog writer (``tests.integration.zombie_writer``, a real process with a real claim in
etcd) owns partition P and publishes records; it is SIGSTOPped past its lease; a real
``chukcha run --etcd`` instance takes every partition over (rebuilding P from the records the
zombie published), processes orders and publishes its own records; then SIGCONT: the zombie
ignores that it lost P and publishes records (and snapshots) of its old epoch, at sequence
numbers beyond the new owner's. The state rebuilt from the bus must still be the new owner's:
the expected totals plus what the zombie wrote before it was paused, nothing of what it wrote
after; and a view that followed the changelog all along ends with the same table."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from chukcha.processors.changelog import changelog_category
from chukcha.processors.views import View
from chukcha.state.changelog import Assembler, Record
from chukcha.testing import EtcdServer, run_etcd
from tests.integration.cluster_helpers import wait_for
from tests.integration.test_app_group import (
    APP,
    CLUSTER,
    PARTITIONS,
    _Reader,
    scenario,
    state_on_the_bus,
    wait_owners,
)

pytestmark = [pytest.mark.timeout(240), pytest.mark.allow_blocking]  # subprocess orchestration

ROOT = Path(__file__).resolve().parents[2]
P = 1  # the partition the zombie writes


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


class Zombie:
    """The zombie writer process and what it said (one JSON object per line)."""

    def __init__(self, cmd: list[str]) -> None:
        self.cmd = cmd
        self.said: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._read: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.cmd, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None
        self._read = asyncio.create_task(self._lines(self.proc.stdout))

    async def _lines(self, out: asyncio.StreamReader) -> None:
        while line := await out.readline():
            self.said.append(orjson.loads(line))

    def count(self, phase: str) -> int:
        return sum(1 for s in self.said if s.get("phase") == phase)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self) -> int:
        assert self.proc is not None and self._read is not None
        async with asyncio.timeout(60):
            code = await self.proc.wait()
            await self._read
        return code


async def records_of(reader: _Reader, partition: int) -> list[Record]:
    assembler = Assembler()
    for line in await reader.read_all(changelog_category(APP, partition)):
        assembler.add(line)
    return assembler.records()


async def test_a_zombies_late_records_do_not_change_the_restored_state(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    async with scenario(tmp_path, etcd, seed=21) as sc, View(APP, client=sc.client) as view:
        reader = _Reader(sc.client)
        zombie = Zombie([sys.executable, "-m", "tests.integration.zombie_writer",
                         "--etcd", etcd.endpoint, "--cluster", CLUSTER, "--app", APP,
                         "--partitions", str(PARTITIONS), "--partition", str(P),
                         "--state", str(tmp_path / "zombie"), "--ttl", "2", "--after", "40",
                         *[a for url in sc.cluster.urls for a in ("--node", url)]])
        await zombie.start()

        async def zombie_wrote() -> bool:
            return zombie.count("before") >= 3

        await wait_for(zombie_wrote, what="the zombie to publish records as the owner")
        zombie.signal(signal.SIGSTOP)
        epoch = next(s["epoch"] for s in zombie.said if s["event"] == "assigned")

        x = sc.instance("x", "state-x")
        await x.start()
        await x.wait_ready()
        await wait_owners(etcd, lambda o: set(o.values()) == {"x"} and len(o) == PARTITIONS,
                          "x to take the paused zombie's partitions over")
        await sc.send_round()
        await sc.receipts()

        async def x_published_p() -> bool:
            return any(r.epoch > epoch for r in await records_of(reader, P))

        await wait_for(x_published_p, what="x to publish a record of the zombie's partition")
        newest = max(r.seq for r in await records_of(reader, P))

        zombie.signal(signal.SIGCONT)
        assert await zombie.wait() == 0
        late = [r for r in await records_of(reader, P)
                if r.epoch == epoch and r.puts.get(b"t/zombie") == b'"after"']
        assert late and any(r.base for r in late)  # on the bus, snapshots too
        assert max(r.seq for r in late) > newest  # beyond anything x had written

        # The zombie may have rejoined before it ended: wait until x owns everything again.
        await wait_owners(etcd, lambda o: set(o.values()) == {"x"} and len(o) == PARTITIONS,
                          "x to own every partition again")
        await sc.send_round()
        seen = await sc.receipts()
        await wait_for(sc.acked_all, what="every complete input chunk to be acked")
        assert await x.terminate() == 0
        assert len(seen) == sc.sent
        assert all(len({str(r) for r in copies}) == 1 for copies in seen.values())
        want = {**sc.expected, "zombie": "before"}
        assert await state_on_the_bus(sc.client, tmp_path) == want
        await view.wait_for(lambda v: dict(v.items()) == want)  # a view follows the same chain
        # Its snapshots acked the complete changelog chunks (x's records among them) through
        # the real ack path: the node refused them (fenced), so nothing of x's was deleted.
        assert next(s for s in zombie.said if s["event"] == "done")["refused"] > 0
