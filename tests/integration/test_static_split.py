"""A static split without etcd (``--instance-index I --instances N``): two real ``chukcha run``
processes share an app's 8 partitions, one of them SIGKILLed and restarted; the union of their
tables equals the expected totals, each keeps only its own partitions, every receipt arrives,
and every complete input chunk is acked by both instances' groups (so it is deleted). A state
directory under another split, or more instances than partitions, is refused."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chukcha import Client
from chukcha.partitioning import partition_of
from chukcha.processors.engine import read_table
from chukcha.processors.split import StaticSplit
from chukcha.state.partitions import open_partition_stores
from chukcha.testing import run_cluster
from tests.integration.cluster_helpers import wait_for
from tests.integration.test_processor_sigkill import Processor, order, read_receipts

pytestmark = [pytest.mark.timeout(150), pytest.mark.allow_blocking]  # subprocess orchestration

TARGET = "tests.processors.sigkill_app:partitioned"  # 8 partitions, key = customer


def by_customer(event: dict[str, Any]) -> str:
    return str(event["customer"])


def split_args(index: int, count: int) -> list[str]:
    return ["--instance-index", str(index), "--instances", str(count)]


async def tables_of(state_dir: Path) -> list[dict[str, Any]]:
    stores = await asyncio.to_thread(open_partition_stores, state_dir, None)
    try:
        return [await asyncio.to_thread(read_table, s) for s in stores]
    finally:
        for s in stores:
            s.close()


@pytest.mark.parametrize("partitioned_input", [False, True])
async def test_two_instances_split_the_partitions_exactly_once(
    tmp_path: Path, partitioned_input: bool
) -> None:
    """Plain input (every instance reads it, through the repartitioning hop) or input already
    partitioned with the app's count (each instance reads only its partitions' categories, and
    only its group holds them back: every complete chunk of every partition still gets acked)."""
    rng = random.Random(7)  # noqa: S311 - reproducible input
    events = [order(i, rng) for i in range(600)]
    expected: dict[str, int] = {}
    for e in events:
        expected[e["customer"]] = expected.get(e["customer"], 0) + e["amount"]
    async with run_cluster(tmp_path / "cluster", ("a",),
                           args=("--max-chunk-size", "4096")) as cluster, \
            Client(cluster.urls) as client:
        inputs = ["orders"]
        key: Callable[[dict[str, Any]], str] | None = None
        if partitioned_input:
            inputs = await client.create_partitions("orders", 8)
            key = by_customer
        procs = []
        for i in range(2):
            p = Processor(cluster, tmp_path / f"state{i}", tmp_path / f"p{i}.log", TARGET)
            p.cmd += split_args(i, 2)
            procs.append(p)
            await p.start()
        for p in procs:
            await p.wait_ready()
        for part in range(0, len(events), 100):
            await client.send("orders", events[part:part + 100], key=key)
            await client.send("orders", events[part:part + 50], key=key)  # duplicates
            if part == 300:
                # SIGKILL one instance in the middle, then restart it.
                assert await procs[1].kill() == -9
                await procs[1].start()
        await procs[1].wait_ready()
        seen = await read_receipts(client, cluster.urls[0], {f"o{i}/0" for i in range(600)},
                                   tmp_path / "p1.log")
        assert all(len({str(r) for r in copies}) == 1 for copies in seen.values())

        async def all_acked() -> bool:
            # Both groups acked every complete chunk: only the open one is left.
            listings = [await client.list_chunks(category) for category in inputs]
            return all(not c.complete for listing in listings for c in listing)

        await wait_for(all_acked, what="both instances' groups to ack every complete chunk")
        for p in procs:
            assert await p.terminate() == 0

    union: dict[str, int] = {}
    for i in range(2):
        tables = await tables_of(tmp_path / f"state{i}")
        mine = StaticSplit(i, 2).owned(8)
        for partition, table in enumerate(tables):
            if partition not in mine:
                assert table == {}  # never touched
            for customer, value in table.items():
                assert partition_of(customer, 8) == partition
                union[customer] = value
    assert union == expected


async def test_a_state_dir_of_another_split_is_refused(tmp_path: Path) -> None:
    async with run_cluster(tmp_path / "cluster", ("a",)) as cluster:
        first = Processor(cluster, tmp_path / "state", tmp_path / "first.log", TARGET)
        first.cmd += split_args(0, 2)
        await first.start()
        await first.wait_ready()
        assert await first.terminate() == 0

        other = Processor(cluster, tmp_path / "state", tmp_path / "other.log", TARGET)
        other.cmd += split_args(1, 2)
        await other.start()
        assert other.proc is not None
        async with asyncio.timeout(30):
            assert await other.proc.wait() == 1
        text = await asyncio.to_thread((tmp_path / "other.log").read_text)
        assert "belongs to instance 0 of 2" in text

        unsplit = Processor(cluster, tmp_path / "state", tmp_path / "unsplit.log", TARGET)
        await unsplit.start()
        assert unsplit.proc is not None
        async with asyncio.timeout(30):
            assert await unsplit.proc.wait() == 1
        assert "belongs to instance 0 of 2, not 0 of 1" in await asyncio.to_thread(
            (tmp_path / "unsplit.log").read_text)

        too_many = Processor(cluster, tmp_path / "s9", tmp_path / "nine.log", TARGET)
        too_many.cmd += split_args(0, 9)
        await too_many.start()
        assert too_many.proc is not None
        async with asyncio.timeout(30):
            assert await too_many.proc.wait() == 2
        assert "9 instances for 8 partitions" in await asyncio.to_thread(
            (tmp_path / "nine.log").read_text)
