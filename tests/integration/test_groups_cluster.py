"""Consumer groups are cluster-wide: registrations and group acks made on one node protect the
data on every node (static peers: forwarded from a durable outbox; etcd: kept in etcd)."""

from __future__ import annotations

import asyncio
import functools
import gc
from collections.abc import AsyncIterator
from pathlib import Path

import aetcd
import orjson
import pytest

from chukcha.bus.group_coordination import EtcdGroups, GroupsSnapshot, groups_prefix
from chukcha.client import Client
from chukcha.client.consumer import Consumer
from chukcha.protocol import ChunkInfo
from chukcha.testing import ClusterProcess, EtcdServer, run_cluster, run_etcd
from tests.integration.cluster_helpers import wait_for

pytestmark = pytest.mark.timeout(90)

ARGS = ("--replication-poll-wait", "2s", "--max-chunk-size", "1500")


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


async def consume(consumer: Consumer, count: int) -> list[bytes]:
    """Read ``count`` messages, committing each batch (which acks finished chunks)."""
    got: list[bytes] = []
    async with consumer:
        while len(got) < count:
            for batch in await consumer.read():
                got += batch.messages()
                await consumer.commit({batch.owner: batch.position})
        while not consumer.caught_up:
            assert await consumer.read(timeout=1) == []
        await consumer.commit(consumer.positions())
    return got


async def acked_by(c: Client, url: str, category: str) -> dict[str, set[str]]:
    listing = await c.api.list_groups(url, category)
    return {g["name"]: set(g["acked"]) for g in listing["groups"]}


async def knows(c: Client, url: str, category: str, group: str, chunks: frozenset[str]) -> bool:
    """``url`` knows ``group`` and that it acked every one of ``chunks``."""
    acked = await acked_by(c, url, category)
    return group in acked and chunks <= acked[group]


async def live(c: Client, url: str, category: str) -> set[str]:
    return {x.name for x in await c.api.list_chunks(url, category)}


async def gone_everywhere(c: Client, urls: list[str], category: str, chunks: set[str]) -> bool:
    for url in urls:
        if chunks & await live(c, url, category):
            return False
    return True


async def complete_chunk(c: Client, url: str) -> ChunkInfo:
    """Send four batches of orders to ``url`` (the cluster's chunks are small) and return its
    first complete chunk."""
    for i in range(4):
        await c.send_to(url, "orders", [{"batch": i, "k": k} for k in range(10)])
    return next(x for x in await c.list_chunks("orders") if x.complete)


async def scenario(cluster: ClusterProcess) -> None:
    """billing registers through a only and reads from b; audit registers on c, reads
    everything there and acks it: nothing goes until billing acks too, then it goes everywhere.
    """
    a, b, c = cluster["a"].url, cluster["b"].url, cluster["c"].url
    urls = [a, b, c]
    async with Client([a]) as via_a, Client([b]) as via_b, Client([c]) as via_c:
        await via_a.api.register_group(a, "orders", "billing")
        for url in (b, c):
            await wait_for(functools.partial(knows, via_a, url, "orders", "billing",
                                             frozenset()), what=f"{url} to know billing")
        sent: list[str] = []
        for i in range(12):
            sent += await via_a.send_to(a if i % 2 else c, "orders",
                                        [{"batch": i, "k": k} for k in range(10)])

        audit = await consume(via_c.consumer("orders", group="audit"), len(sent))
        complete = {x.name for x in await via_c.list_chunks("orders") if x.complete}
        assert len(complete) >= 4
        for url in urls:
            # Once a node has audit's acks, it has decided about them: nothing may go.
            await wait_for(functools.partial(knows, via_a, url, "orders", "audit",
                                             frozenset(complete)),
                           what=f"{url} to know audit's acks")
        for url in urls:
            assert complete <= await live(via_a, url, "orders"), url

        billing = await consume(via_b.consumer("orders", group="billing"), len(sent))
        await wait_for(functools.partial(gone_everywhere, via_a, urls, "orders", complete),
                       what="the chunks both groups acked to go from every node")
    assert sorted(orjson.loads(m)["id"] for m in audit) == sorted(sent)
    assert sorted(orjson.loads(m)["id"] for m in billing) == sorted(sent)


async def test_static_peers_share_registrations_and_group_acks(tmp_path: Path) -> None:
    async with run_cluster(tmp_path / "nodes", ("a", "b", "c"), args=ARGS) as cluster:
        await scenario(cluster)


async def test_etcd_shares_registrations_and_group_acks(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    async with run_cluster(tmp_path / "nodes", ("a", "b", "c"), etcd=etcd.endpoint,
                           args=ARGS) as cluster:
        await scenario(cluster)


async def test_a_peer_that_was_down_gets_registrations_and_acks_later(tmp_path: Path) -> None:
    async with run_cluster(tmp_path / "nodes", ("a", "b", "c"), args=ARGS) as cluster:
        a, c = cluster["a"].url, cluster["c"].url
        await cluster["c"].stop()
        async with Client([a]) as api:
            first = await complete_chunk(api, a)
            await api.api.register_group(a, "orders", "billing")
            await api.api.register_group(a, "orders", "audit")
            await api.api.ack(a, "orders", first.name, first.size, group="audit")
            # The outbox is durable: a restarts before c is back, and still delivers.
            await cluster["a"].stop()
            await cluster["a"].start()
            await cluster["c"].start()
            await wait_for(functools.partial(knows, api, c, "orders", "audit",
                                             frozenset({first.name})),
                           what="c to get audit's registration and ack")
            assert "billing" in await acked_by(api, c, "orders")

            async def replicated() -> bool:
                return first.name in await live(api, c, "orders")

            await wait_for(replicated, what="c to hold the chunk only audit acked")
            await api.api.ack(a, "orders", first.name, first.size, group="billing")
            await wait_for(functools.partial(gone_everywhere, api, [a, c], "orders",
                                             {first.name}),
                           what="the chunk both groups acked to go from a and c")


async def test_with_etcd_down_group_acks_are_kept_and_tombstone_once_it_is_back(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    async with run_cluster(tmp_path / "nodes", ("a", "b"), etcd=etcd.endpoint,
                           args=ARGS) as cluster, Client([cluster["a"].url]) as api:
        a, b = cluster["a"].url, cluster["b"].url
        first = await complete_chunk(api, a)
        await api.api.register_group(a, "orders", "billing")
        await api.api.register_group(a, "orders", "audit")
        await api.api.ack(a, "orders", first.name, first.size, group="audit")
        await wait_for(functools.partial(knows, api, b, "orders", "audit",
                                         frozenset({first.name})),
                       what="b to see audit's ack through etcd")
        assert "billing" in await acked_by(api, b, "orders")

        await etcd.stop()
        # Accepted and recorded, but with the cluster's view unreachable nothing is tombstoned.
        await api.api.ack(a, "orders", first.name, first.size, group="billing")
        assert await knows(api, a, "orders", "billing", frozenset({first.name}))
        assert first.name in await live(api, a, "orders")

        await etcd.start()
        await wait_for(functools.partial(gone_everywhere, api, [a, b], "orders", {first.name}),
                       what="the chunk to go once etcd has both acks")


async def test_with_etcd_a_plain_ack_is_the_default_group_cluster_wide(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    async with run_cluster(tmp_path / "nodes", ("a", "b"), etcd=etcd.endpoint,
                           args=ARGS) as cluster, Client([cluster["a"].url]) as api:
        a, b = cluster["a"].url, cluster["b"].url
        first = await complete_chunk(api, a)
        await api.api.register_group(b, "orders", "billing")
        await wait_for(functools.partial(knows, api, a, "orders", "billing", frozenset()),
                       what="a to know billing")
        # A Go consumer's plain ack on a: recorded for "default", which b learns through etcd.
        await api.api.ack(a, "orders", first.name, first.size)
        await wait_for(functools.partial(knows, api, b, "orders", "default",
                                         frozenset({first.name})),
                       what="b to see default's ack through etcd")
        assert first.name in await live(api, a, "orders")
        await api.api.ack(a, "orders", first.name, first.size, group="billing")
        await wait_for(functools.partial(gone_everywhere, api, [a, b], "orders", {first.name}),
                       what="the chunk to go once default and billing acked it")


# grpc (etcd's client, in this process here) joins its poller thread on the loop when its last
# channel is freed: blocking by design, not ours.
@pytest.mark.allow_blocking
async def test_with_etcd_a_late_ack_does_not_bring_an_unregistered_group_back(
    etcd: EtcdServer,
) -> None:
    marked = asyncio.Event()

    def on_change(snapshot: GroupsSnapshot) -> None:
        if "marker" in snapshot:
            marked.set()

    groups = EtcdGroups((etcd.endpoint,), "t", "a", retry_interval=0.05)
    groups.add_listener(on_change)
    await groups.start()
    try:

        async def connected() -> bool:
            return groups.connected

        await wait_for(connected, what="the groups' etcd session")
        await groups.register("orders", "billing")
        await groups.ack("orders", "billing", "a-chunk000000000", 10)
        assert await groups.read("orders") == {"billing": {"a-chunk000000000": 10}}
        await groups.unregister("orders", "billing")
        # A late ack (say, from a node's outbox) of the unregistered group is not written.
        written = await groups.ack("orders", "billing", "a-chunk000000001", 10)
        assert await groups.read("orders") == {}
        assert written is False

        # An ack key without its registration (as written before acks were conditional) is
        # ignored, in a read, in the watched mirror and in a fresh mirror.
        raw = aetcd.Client("127.0.0.1", etcd.client_port)
        try:
            await raw.put(groups_prefix("t") + b"orders/audit/a-chunk000000002", b"5")
        finally:
            await raw.close()
        assert await groups.read("orders") == {}
        await groups.register("marker", "m")  # watched after the orphan ack
        async with asyncio.timeout(5):
            await marked.wait()
        assert "orders" not in groups.snapshot()
    finally:
        await groups.stop()
    fresh = EtcdGroups((etcd.endpoint,), "t", "b", retry_interval=0.05)
    await fresh.start()
    try:

        async def synced() -> bool:
            return fresh.synced

        await wait_for(synced, what="a fresh mirror")
        assert fresh.snapshot() == {"marker": {"m": {}}}
    finally:
        await fresh.stop()
        gc.collect()  # free grpc's channels inside this test (see the marker)
