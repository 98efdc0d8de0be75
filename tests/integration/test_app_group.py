"""Instances of one app through etcd, as real ``chukcha run --etcd`` processes on a real
2-node bus: they share the partitions; SIGKILL one and the other takes its partitions over
(restoring their state from the changelog); a replacement with an empty disk joins and gets
its share handed over in order; every event written to both nodes. At the end the state on
the bus (each partition rebuilt from its changelog) equals the expected totals exactly, every
receipt has one content per ID, and every complete input chunk is acked."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from chukcha import Client
from chukcha.bus.app_coordination import AppView, read_app
from chukcha.partitioning import partition_category, partition_of
from chukcha.processors.changelog import Changelog
from chukcha.processors.engine import read_table
from chukcha.state.leveldb import LevelDBStore
from chukcha.testing import ClusterProcess, EtcdServer, run_cluster, run_etcd
from tests.integration.cluster_helpers import wait_for
from tests.integration.test_processor_sigkill import Processor, order, read_receipts

pytestmark = [pytest.mark.timeout(240), pytest.mark.allow_blocking]  # subprocess orchestration

TARGET = "tests.processors.changelog_app:app"  # 4 partitions, key = customer, changelog on
APP, CLUSTER, PARTITIONS = "billing", "test", 4
PER_ROUND = 150


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


def instance(cluster: ClusterProcess, etcd: EtcdServer, tmp_path: Path, name: str,
             state: str) -> Processor:
    p = Processor(cluster, tmp_path / state, tmp_path / f"{name}.log", TARGET)
    p.cmd += ["--etcd", etcd.endpoint, "--cluster", CLUSTER, "--instance", name,
              "--lease-ttl", "2"]
    return p


def balanced(claims: dict[int, str]) -> bool:
    """x and y hold two partitions each: the settled assignment (nothing moves from there)."""
    return sorted(Counter(claims.values()).items()) == [("x", 2), ("y", 2)]


def owners(view: AppView) -> dict[int, str]:
    return {p: c.owner for p, c in view.claims.items()}


async def wait_owners(etcd: EtcdServer, check: Callable[[dict[int, str]], bool],
                      what: str) -> dict[int, str]:
    last: dict[int, str] = {}

    async def ok() -> bool:
        nonlocal last
        last = owners(await read_app((etcd.endpoint,), CLUSTER, APP))
        return check(last)

    await wait_for(ok, timeout=60, what=f"{what} (last claims {last})")
    return last


class _Reader:
    """The changelog's view of the bus, for rebuilding the final state in the test."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def read_all(self, category: str) -> list[bytes]:
        lines: list[bytes] = []
        for url in self._client.nodes:
            for info in await self._client.api.list_chunks(url, category):
                off = 0
                while data := await self._client.api.read(url, category, info.name, off,
                                                          4 << 20):
                    off += len(data)
                    lines.extend(data[:-1].split(b"\n"))
        return lines

    async def publish(self, category: str, lines: list[bytes]) -> None:
        raise NotImplementedError

    async def complete_chunks(self, category: str) -> list[tuple[str, int]]:
        raise NotImplementedError

    async def ack_chunk(self, category: str, chunk: str, size: int) -> None:
        raise NotImplementedError


async def state_on_the_bus(client: Client, base: Path) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for p in range(PARTITIONS):
        store = await asyncio.to_thread(LevelDBStore, base / f"rebuilt{p}")
        try:
            await Changelog(APP, p, _Reader(client)).restore_if_empty(store)
            table.update(await asyncio.to_thread(read_table, store))
        finally:
            await asyncio.to_thread(store.close)
    return table


async def test_instances_share_take_over_and_hand_over_partitions_exactly_once(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    rng = random.Random(5)  # noqa: S311 - reproducible input
    expected: dict[str, int] = {}
    sent = 0
    async with run_cluster(tmp_path / "cluster", ("a", "b"), etcd=etcd.endpoint,
                           args=("--max-chunk-size", "4096")) as cluster, \
            Client(cluster.urls) as client:
        inputs = await client.create_partitions("orders", PARTITIONS)

        async def send_round() -> None:
            nonlocal sent
            events = [order(sent + k, rng) for k in range(PER_ROUND)]
            sent += PER_ROUND
            for e in events:
                expected[e["customer"]] = expected.get(e["customer"], 0) + e["amount"]
            by_partition: dict[int, list[dict[str, Any]]] = {}
            for e in events:
                by_partition.setdefault(partition_of(e["customer"], PARTITIONS), []).append(e)
            for url in cluster.urls:  # every event on both nodes: the same ID twice
                for p, part in sorted(by_partition.items()):
                    await client.send_to(url, partition_category("orders", p), part)

        async def receipts() -> dict[str, list[Any]]:
            return await read_receipts(client, cluster.urls[0],
                                       {f"o{i}/0" for i in range(sent)}, tmp_path / "x.log")

        x = instance(cluster, etcd, tmp_path, "x", "state-x")
        y = instance(cluster, etcd, tmp_path, "y", "state-y")
        for p in (x, y):
            await p.start()
        for p in (x, y):
            await p.wait_ready()
        shared = await wait_owners(etcd, balanced, "x and y to share the partitions")
        await send_round()
        await receipts()

        # SIGKILL y: after its lease (2 s) x owns everything, its state from the changelog.
        assert await y.kill() == -9
        await send_round()
        await wait_owners(etcd, lambda o: set(o.values()) == {"x"} and len(o) == PARTITIONS,
                          "x to take y's partitions over")
        await receipts()
        log = await asyncio.to_thread(x.log.read_text)
        for part in (part for part, owner in shared.items() if owner == "y"):
            assert f"restored partition {part} from the bus" in log  # not from y's disk

        # A replacement for y with an empty disk: x hands its share over in order.
        y2 = instance(cluster, etcd, tmp_path, "y", "state-y2")
        await y2.start()
        await y2.wait_ready()
        await wait_owners(etcd, balanced, "x to hand y2 its share")
        await send_round()
        seen = await receipts()

        async def acked_all() -> bool:
            listings = [await client.list_chunks(c) for c in inputs]
            return all(not c.complete for listing in listings for c in listing)

        await wait_for(acked_all, what="every complete input chunk to be acked")
        for p in (x, y2):
            assert await p.terminate() == 0
        final = await state_on_the_bus(client, tmp_path)
        x_log = await asyncio.to_thread(x.log.read_text)

    assert len(seen) == sent
    assert all(len({str(r) for r in copies}) == 1 for copies in seen.values())
    assert final == expected
    assert "handed over" in x_log
