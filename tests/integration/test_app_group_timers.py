"""Timers of an app run through etcd move with their partitions: two real ``chukcha run
--etcd`` instances on a 2-node bus; signups schedule a timer per user a few seconds ahead; one
instance is SIGKILLed before any is due; the other takes its partitions over (their timers
restored from the changelog with the state) and runs every timer once: one ``fired`` ID per
user, each with n == 1, and the state on the bus says each fired once."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from chukcha import Client
from chukcha.bus.app_coordination import read_app
from chukcha.partitioning import partition_category, partition_of
from chukcha.processors.changelog import Changelog
from chukcha.processors.engine import read_table
from chukcha.state.leveldb import LevelDBStore
from chukcha.testing import EtcdServer, run_cluster, run_etcd
from tests.integration.cluster_helpers import wait_for
from tests.integration.test_app_group import _Reader
from tests.integration.test_processor_sigkill import Processor

pytestmark = [pytest.mark.timeout(240), pytest.mark.allow_blocking]  # subprocess orchestration

APP, CLUSTER, PARTITIONS = "remind4", "test", 4
USERS = [f"u{i}" for i in range(16)]


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


async def owners(etcd: EtcdServer) -> dict[int, str]:
    view = await read_app((etcd.endpoint,), CLUSTER, APP)
    return {p: c.owner for p, c in view.claims.items()}


async def read_all(client: Client, category: str) -> dict[str, list[dict[str, Any]]]:
    seen: dict[str, list[dict[str, Any]]] = {}
    for line in await _Reader(client).read_all(category):
        event = orjson.loads(line)
        seen.setdefault(event["id"], []).append(event)
    return seen


async def test_timers_move_with_their_partitions(tmp_path: Path, etcd: EtcdServer) -> None:
    async with run_cluster(tmp_path / "cluster", ("a", "b"), etcd=etcd.endpoint) as cluster, \
            Client(cluster.urls) as client:
        await client.create_partitions("signups", PARTITIONS)
        x, y = (Processor(cluster, tmp_path / f"state-{n}", tmp_path / f"{n}.log",
                          "tests.processors.timer_app:group_app") for n in "xy")
        for name, p in (("x", x), ("y", y)):
            p.cmd += ["--etcd", etcd.endpoint, "--cluster", CLUSTER, "--instance", name,
                      "--lease-ttl", "2"]
            await p.start()
        for p in (x, y):
            await p.wait_ready()

        async def shared() -> bool:
            return sorted(Counter((await owners(etcd)).values()).values()) == [2, 2]

        await wait_for(shared, timeout=60, what="x and y to share the partitions")
        y_parts = {p for p, o in (await owners(etcd)).items() if o == "y"}
        at = time.time() + 8
        for user in USERS:
            category = partition_category("signups", partition_of(user, PARTITIONS))
            await client.send(category, [{"id": f"s-{user}", "user": user, "at": at}])

        async def all_scheduled() -> bool:
            return len(await read_all(client, "scheduled")) == len(USERS)

        await wait_for(all_scheduled, timeout=60, what="every signup to be committed")
        # Nothing had fired when y died (else the test would not show the timers moving): x
        # is paused meanwhile, so what the bus holds then is what fired before the kill,
        # exactly, however slow the machine (no margin on the clock).
        assert x.proc is not None
        x.proc.send_signal(signal.SIGSTOP)
        try:
            assert await y.kill() == -9
            fired_before = await read_all(client, "fired")
        finally:
            x.proc.send_signal(signal.SIGCONT)
        assert fired_before == {}, f"timers fired before the kill: {sorted(fired_before)}"
        assert any(partition_of(u, PARTITIONS) in y_parts for u in USERS)

        want = {f"timer:@{u}:{round(at * 1000)}/0" for u in USERS}

        async def all_fired() -> bool:
            return want <= (await read_all(client, "fired")).keys()

        await wait_for(all_fired, timeout=90, what="every timer to fire")
        fired = await read_all(client, "fired")
        assert fired.keys() == want
        assert all(copy["n"] == 1 for copies in fired.values() for copy in copies)
        assert set((await owners(etcd)).values()) == {"x"}
        assert await x.terminate() == 0
        log = await asyncio.to_thread(x.log.read_text)
        for part in y_parts:
            assert f"restored partition {part} from the bus" in log

        table: dict[str, Any] = {}
        for part in range(PARTITIONS):
            store = await asyncio.to_thread(LevelDBStore, tmp_path / f"rebuilt{part}")
            try:
                await Changelog(APP, part, _Reader(client)).restore_if_empty(store)
                table.update(await asyncio.to_thread(read_table, store))
            finally:
                await asyncio.to_thread(store.close)
        assert table == {f"fired:{u}": 1 for u in USERS}
