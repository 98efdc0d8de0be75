"""Machine loss torture for instances through etcd: a 3-node bus, an app of 12 partitions run
by up to 3 ``chukcha run --etcd`` processes; every event written to two nodes. Over the run:
SIGKILL instances at 20 random moments, at every third one deleting the killed instance's state
directory entirely before it restarts; scale 1 -> 3 -> 2 -> 3; without and with a standby per
partition (followers, warm engines, warm hand-overs under the same kills). After quiescence the
state on the bus (each partition rebuilt from its changelog) equals the expected totals exactly,
every receipt is on the bus with one content per ID, and every complete input chunk is
acked."""

from __future__ import annotations

import asyncio
import functools
import random
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chukcha import Client
from chukcha.partitioning import partition_category, partition_of
from chukcha.testing import EtcdServer, run_cluster, run_etcd
from tests.integration.cluster_helpers import wait_for
from tests.integration.test_app_group import state_on_the_bus
from tests.integration.test_processor_sigkill import Processor, order, read_receipts

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow, pytest.mark.allow_blocking]

TARGET = "tests.processors.changelog_app:app12"
APP, PARTITIONS, KILLS, PER_ROUND = "billing12", 12, 20, 60


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


async def acked_all(client: Client, inputs: list[str]) -> bool:
    listings = [await client.list_chunks(c) for c in inputs]
    return all(not c.complete for listing in listings for c in listing)


def warm_take_overs(logs: list[Path]) -> int:
    """How many partitions the instances took with a standby copy (current, or the tail
    replayed) rather than a restore, as their logs say."""
    line = re.compile(r"partition \d+ assigned \(epoch \d+\): standby copy "
                      r"(?:current|brought current)")
    return sum(len(line.findall(log.read_text())) for log in logs)


@pytest.mark.parametrize("standbys", [0, 1])
async def test_machine_loss_torture(  # noqa: PLR0915 - one scenario, read top to bottom
        tmp_path: Path, etcd: EtcdServer, standbys: int) -> None:
    rng = random.Random(2026)  # noqa: S311 - a reproducible schedule
    expected: dict[str, int] = {}
    sent = 0
    async with run_cluster(tmp_path / "cluster", ("a", "b", "c"), etcd=etcd.endpoint,
                           args=("--max-chunk-size", "4096")) as cluster, \
            Client(cluster.urls) as client:
        inputs = await client.create_partitions("orders", PARTITIONS)
        urls = cluster.urls

        def instance(name: str) -> Processor:
            p = Processor(cluster, tmp_path / f"state-{name}", tmp_path / f"{name}.log", TARGET)
            p.cmd += ["--etcd", etcd.endpoint, "--cluster", "test", "--instance", name,
                      "--lease-ttl", "2", "--standbys", str(standbys)]
            return p

        async def send_round() -> None:
            nonlocal sent
            events = [order(sent + k, rng) for k in range(PER_ROUND)]
            sent += PER_ROUND
            parts: dict[int, list[dict[str, Any]]] = {}
            for e in events:
                expected[e["customer"]] = expected.get(e["customer"], 0) + e["amount"]
                parts.setdefault(partition_of(e["customer"], PARTITIONS), []).append(e)
            first = rng.randrange(3)
            for url in (urls[first], urls[(first + 1) % 3]):  # two nodes: the same ID twice
                for p, part in sorted(parts.items()):
                    await client.send_to(url, partition_category("orders", p), part)

        procs = {n: instance(n) for n in ("x", "y", "z")}
        running: set[str] = set()

        async def start(name: str) -> None:
            await procs[name].start()
            await procs[name].wait_ready()
            running.add(name)

        await start("x")  # scale 1
        await send_round()
        await start("y")  # scale 3
        await start("z")
        wiped = 0
        for kill in range(KILLS):
            await send_round()
            await asyncio.sleep(rng.uniform(0.0, 1.0))  # a random moment to kill at
            victim = rng.choice(sorted(running))
            assert await procs[victim].kill() == -9
            running.discard(victim)
            if kill % 3 == 0:
                await asyncio.to_thread(shutil.rmtree, tmp_path / f"state-{victim}", True)
                wiped += 1
            if 8 <= kill < 12 and len(running) == 2:
                continue  # scale 3 -> 2 for a while
            for name in sorted(set(procs) - running):  # back to 3
                await start(name)
        for name in sorted(set(procs) - running):
            await start(name)
        await send_round()
        seen = await read_receipts(client, urls[0], {f"o{i}/0" for i in range(sent)},
                                   tmp_path / "x.log")

        await wait_for(functools.partial(acked_all, client, inputs), timeout=90,
                       what="every complete input chunk to be acked")
        for name in sorted(running):
            assert await procs[name].terminate() == 0
        table = await state_on_the_bus(client, tmp_path, app=APP, partitions=PARTITIONS)
        warm = await asyncio.to_thread(warm_take_overs, [p.log for p in procs.values()])

    # With standbys some take-overs start from a standby's warm copy (without, none can).
    assert (warm > 0) == (standbys > 0), f"{warm} take-overs from a standby copy"
    assert wiped >= 6
    assert len(seen) == sent
    assert all(len({str(r) for r in copies}) == 1 for copies in seen.values())
    assert table == expected
