"""Instances through etcd reading an input that is not partitioned with the app's count (a
plain category, as the Go client or ``curl`` writes it): the repartition hop runs on the
instance that owns partition 0 (one copy at a time; it moves with that claim). Two real
``chukcha run --etcd`` instances on a 2-node bus, every order written to both nodes; the owner
of partition 0 is SIGKILLed mid-way, the other takes over (the hop too). The state on the bus
equals the totals, one receipt content per ID, and every complete chunk of the plain input is
acked for the group."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chukcha import Client
from chukcha.bus.app_coordination import read_app
from chukcha.testing import EtcdServer, run_cluster, run_etcd
from tests.integration.cluster_helpers import wait_for
from tests.integration.test_app_group import (
    APP,
    CLUSTER,
    PARTITIONS,
    instance,
    owners,
    state_on_the_bus,
)
from tests.integration.test_processor_sigkill import order, read_receipts

pytestmark = [pytest.mark.timeout(240), pytest.mark.allow_blocking]  # subprocess orchestration


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


async def test_a_plain_input_is_repartitioned_by_partition_0s_owner(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    rng = random.Random(31)  # noqa: S311 - reproducible input
    expected: dict[str, int] = {}
    sent = 0
    async with run_cluster(tmp_path / "cluster", ("a", "b"), etcd=etcd.endpoint,
                           args=("--max-chunk-size", "4096")) as cluster, \
            Client(cluster.urls) as client:

        async def send_round() -> None:
            nonlocal sent
            events: list[dict[str, Any]] = [order(sent + k, rng) for k in range(150)]
            sent += len(events)
            for e in events:
                expected[e["customer"]] = expected.get(e["customer"], 0) + e["amount"]
            for url in cluster.urls:  # every order on both nodes: the same ID twice
                await client.send_to(url, "orders", events)

        async def claims() -> dict[int, str]:
            return owners(await read_app((etcd.endpoint,), CLUSTER, APP))

        x = instance(cluster, etcd, tmp_path, "x", "state-x")
        y = instance(cluster, etcd, tmp_path, "y", "state-y")
        for p in (x, y):
            await p.start()
        for p in (x, y):
            await p.wait_ready()

        async def shared() -> bool:
            return sorted(Counter((await claims()).values()).values()) == [2, 2]

        await wait_for(shared, timeout=60, what="x and y to share the partitions")
        await send_round()
        await read_receipts(client, cluster.urls[0], {f"o{i}/0" for i in range(sent)},
                            tmp_path / "x.log")
        first = (await claims())[0]
        hop, other = (x, y) if first == "x" else (y, x)
        assert "repartitioning orders" in await asyncio.to_thread(hop.log.read_text)
        # The other instance may have owned partition 0 (and run the hop) while the
        # partitions settled at start; it must have given the partition up since.
        other_log = await asyncio.to_thread(other.log.read_text)
        if "repartitioning orders" in other_log:
            gave_up = max(other_log.rfind("partition 0 handed over"),
                          other_log.rfind("partition 0 stopped: ownership lost"))
            assert other_log.rfind("repartitioning orders") < gave_up, other_log[-3000:]
        assert await hop.kill() == -9
        await send_round()

        async def other_owns_all() -> bool:
            c = await claims()
            return len(c) == PARTITIONS and set(c.values()) == {"y" if first == "x" else "x"}

        await wait_for(other_owns_all, timeout=60, what="the other to take partition 0 over")
        seen = await read_receipts(client, cluster.urls[0], {f"o{i}/0" for i in range(sent)},
                                   other.log)

        async def acked_all() -> bool:
            return not any(c.complete for c in await client.list_chunks("orders"))

        await wait_for(acked_all, timeout=60, what="every complete orders chunk to be acked")
        assert await other.terminate() == 0
        assert len(seen) == sent
        assert all(len({str(r) for r in copies}) == 1 for copies in seen.values())
        assert await state_on_the_bus(client, tmp_path) == expected
        assert "repartitioned" in await asyncio.to_thread(other.log.read_text)
