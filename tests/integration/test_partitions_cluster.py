"""A partition count is recorded cluster-wide, like consumer groups: with static peers it is
forwarded from the durable outbox (a peer that was down gets it when back); with etcd every node
reads it from etcd, and two nodes cannot record two counts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chukcha import Client
from chukcha.errors import RequestRejectedError
from chukcha.testing import EtcdServer, run_cluster, run_etcd
from tests.integration.cluster_helpers import wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


async def count_on(client: Client, url: str, category: str) -> int:
    answer = await client.api.get_json(url, "/partitions", {"category": category})
    return int(answer["partitions"])


async def test_static_peers_learn_the_count(tmp_path: Path) -> None:
    async with run_cluster(tmp_path / "nodes", ("a", "b", "c")) as cluster, \
            Client(cluster.urls) as client:
        a, b, c = cluster.urls
        async with Client([a]) as on_a:
            assert len(await on_a.create_partitions("orders", 6)) == 6
        for url in (b, c):
            async def knows(url: str = url) -> bool:
                return await count_on(client, url, "orders") == 6

            await wait_for(knows, timeout=30, what=f"the count on {url}")


async def test_etcd_holds_one_count_for_the_cluster(tmp_path: Path, etcd: EtcdServer) -> None:
    async with run_cluster(tmp_path / "nodes", ("a", "b"), etcd=etcd.endpoint) as cluster, \
            Client(cluster.urls) as client:
        a, b = cluster.urls
        async with Client([a]) as on_a, Client([b]) as on_b:
            await on_a.create_partitions("orders", 4)
            assert await count_on(client, b, "orders") == 4  # read from etcd at once
            assert await on_b.create_partitions("orders", 4) == [
                f"orders.p000{i}" for i in range(4)]
            await on_a.send("orders", [{"id": f"o{i}", "k": str(i)} for i in range(20)],
                            key=lambda e: e["k"])

            async def replicated() -> bool:  # b holds the data too, so it refuses as well
                return bool(await client.api.list_chunks(b, "orders.p0000"))

            await wait_for(replicated, timeout=30, what="partition 0 on b")
            with pytest.raises(RequestRejectedError, match="holds data"):
                await on_b.create_partitions("orders", 8)
            assert await count_on(client, a, "orders") == 4
