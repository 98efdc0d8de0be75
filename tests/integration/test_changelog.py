"""State on the bus: an app with ``changelog=True`` (a snapshot every 4 commits) is SIGKILLed at
random moments and, at some of them, its state directory is deleted entirely before it restarts.
Its input is acked as it goes, so only the changelog can bring the lost state back: after the
last run the table equals the expected totals exactly, every receipt is on the bus (one content
per ID), every complete input chunk is acked, and the changelog before the snapshots is gone."""

from __future__ import annotations

import asyncio
import random
import shutil
from pathlib import Path

import pytest

from chukcha import Client
from chukcha.processors.changelog import changelog_category
from chukcha.processors.engine import read_state_table
from chukcha.testing import run_cluster
from tests.integration.cluster_helpers import wait_for
from tests.integration.test_processor_sigkill import Processor, order, read_receipts

pytestmark = [pytest.mark.timeout(240), pytest.mark.allow_blocking]  # subprocess orchestration

TARGET = "tests.processors.changelog_app:app"
ROUNDS = 6
PER_ROUND = 150


async def test_state_survives_sigkill_and_a_deleted_state_directory(tmp_path: Path) -> None:
    rng = random.Random(2024)  # noqa: S311 - a reproducible kill schedule
    state = tmp_path / "state"
    expected: dict[str, int] = {}
    sent = 0
    wiped = 0
    async with run_cluster(tmp_path / "cluster", ("a", "b"),
                           args=("--max-chunk-size", "4096")) as cluster, \
            Client(cluster.urls) as client:
        proc = Processor(cluster, state, tmp_path / "app.log", TARGET)

        async def acked_all() -> bool:
            return all(not c.complete for c in await client.list_chunks("orders"))

        for round_no in range(ROUNDS):
            events = [order(sent + k, rng) for k in range(PER_ROUND)]
            sent += PER_ROUND
            for e in events:
                expected[e["customer"]] = expected.get(e["customer"], 0) + e["amount"]
            url = cluster.urls[round_no % 2]
            await client.send_to(url, "orders", events)
            await client.send_to(cluster.urls[(round_no + 1) % 2], "orders", events[:40])
            await proc.start()
            await proc.wait_ready()
            if round_no % 2 == 0:
                # Let it process and ack this round, so that its input is gone from the bus.
                await read_receipts(client, cluster.urls[0], {f"o{i}/0" for i in range(sent)},
                                    proc.log)
                await wait_for(acked_all, what="the round's input to be acked")
            else:
                await asyncio.sleep(rng.uniform(0.0, 1.5))  # a random moment to kill at
            assert await proc.kill() == -9
            if round_no % 2 == 0:
                await asyncio.to_thread(shutil.rmtree, state)  # the disk is gone
                wiped += 1

        await proc.start()
        await proc.wait_ready()
        receipts = await read_receipts(client, cluster.urls[0],
                                       {f"o{i}/0" for i in range(sent)}, proc.log)
        await wait_for(acked_all, what="every complete input chunk to be acked")
        assert await proc.terminate() == 0
        changelog = await client.list_chunks(changelog_category("billing", 0))

    assert len(receipts) == sent
    assert all(len({str(r) for r in copies}) == 1 for copies in receipts.values())
    table = await asyncio.to_thread(read_state_table, state)
    assert table == expected
    log = await asyncio.to_thread(proc.log.read_text)
    assert wiped == ROUNDS // 2
    assert log.count("restored partition") >= wiped  # at every restart after a wipe
    assert "snapshot of partition 0" in log
    # Snapshots let the changelog before them go: chunks of partition 0's changelog were acked
    # (deleted), so the ones left are fewer than were written.
    assert changelog
    last = max(int(c.name.rsplit("chunk", 1)[1]) for c in changelog)
    assert len(changelog) < last + 1


@pytest.mark.slow
async def test_a_static_split_loses_nothing_when_instances_lose_their_disks(
    tmp_path: Path,
) -> None:
    """Two instances of a static split on a 2-node bus, every event written to both nodes;
    SIGKILL one of them at random moments, deleting its state directory entirely at every
    other kill. After the last restart the union of the instances' tables equals the totals,
    every receipt has one content per ID, and every complete input chunk is acked."""
    rng = random.Random(77)  # noqa: S311 - a reproducible kill schedule
    expected: dict[str, int] = {}
    sent = 0
    wiped = 0
    async with run_cluster(tmp_path / "cluster", ("a", "b"),
                           args=("--max-chunk-size", "4096")) as cluster, \
            Client(cluster.urls) as client:
        procs = []
        for i in range(2):
            p = Processor(cluster, tmp_path / f"state{i}", tmp_path / f"app{i}.log", TARGET)
            p.cmd += ["--instance-index", str(i), "--instances", "2"]
            procs.append(p)
            await p.start()

        async def acked_all() -> bool:
            return all(not c.complete for c in await client.list_chunks("orders"))

        for p in procs:
            await p.wait_ready()
        for kill in range(8):
            events = [order(sent + k, rng) for k in range(PER_ROUND)]
            sent += PER_ROUND
            for e in events:
                expected[e["customer"]] = expected.get(e["customer"], 0) + e["amount"]
            for url in cluster.urls:  # every event on both nodes: the same ID twice
                await client.send_to(url, "orders", events)
            await asyncio.sleep(rng.uniform(0.0, 1.5))  # a random moment to kill at
            victim = procs[rng.randrange(2)]
            assert await victim.kill() == -9
            if kill % 2 == 0:
                state = tmp_path / f"state{procs.index(victim)}"
                await asyncio.to_thread(shutil.rmtree, state, True)  # the disk is gone
                wiped += 1
            await victim.start()
            await victim.wait_ready()
        receipts = await read_receipts(client, cluster.urls[0],
                                       {f"o{i}/0" for i in range(sent)}, procs[0].log)
        await wait_for(acked_all, what="every complete input chunk to be acked by both")
        for p in procs:
            assert await p.terminate() == 0

    assert len(receipts) == sent
    assert all(len({str(r) for r in copies}) == 1 for copies in receipts.values())
    union: dict[str, int] = {}
    for i in range(2):
        union.update(await asyncio.to_thread(read_state_table, tmp_path / f"state{i}"))
    assert union == expected
    assert wiped == 4
