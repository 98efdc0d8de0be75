"""Two consumer groups read one category concurrently through the client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from chukcha.client import Client
from chukcha.client.consumer import Consumer
from chukcha.testing import run_node
from chukcha.testing_cluster import run_cluster
from tests.integration.cluster_helpers import wait_for


async def consume(consumer: Consumer, count: int) -> list[bytes]:
    """Read ``count`` messages, committing each batch (which acks finished chunks)."""
    got: list[bytes] = []
    async with consumer:
        while len(got) < count:
            for batch in await consumer.read():
                got += batch.messages()
                await consumer.commit({batch.owner: batch.position})
        # Commit where we are once more: the last chunks may have been seen complete only now.
        while not consumer.caught_up:
            assert await consumer.read(timeout=1) == []
        await consumer.commit(consumer.positions())
    return got


async def test_two_groups_each_see_everything_and_chunks_go_after_both_ack(
    tmp_path: Path,
) -> None:
    async with (
        run_node(tmp_path / "n", instance="a", max_chunk_size=2000) as node,
        Client([node.url]) as c,
    ):
        await c.register_group("orders", "billing")
        await c.register_group("orders", "audit")
        sent: list[str] = []
        for i in range(20):
            sent += await c.send("orders", [{"batch": i, "k": k} for k in range(10)])
        chunks = [x.name for x in await c.list_chunks("orders")]
        assert len(chunks) > 3

        async with asyncio.timeout(30):
            billing = await consume(c.consumer("orders", group="billing",
                                               max_batch_bytes=700), len(sent))
            # billing acked every complete chunk, but audit has not: nothing is deleted.
            assert [x.name for x in await c.list_chunks("orders")] == chunks
            listing = await c.list_groups("orders")
            acked = {g["name"]: g["acked"] for g in listing["groups"]}
            assert acked == {"billing": chunks[:-1], "audit": []}
            audit = await consume(c.consumer("orders", group="audit"), len(sent))
        assert [x.name for x in await c.list_chunks("orders")] == chunks[-1:]

    assert [orjson.loads(m)["id"] for m in billing] == sent
    assert [orjson.loads(m)["id"] for m in audit] == sent


async def test_groups_reading_from_different_nodes_of_a_cluster(tmp_path: Path) -> None:
    async with (
        run_cluster(tmp_path, ("a", "b"),
                    args=("--replication-poll-wait", "2s", "--max-chunk-size", "1500")) as cl,
        Client(cl.urls) as c,
    ):
        a, b = cl["a"].url, cl["b"].url
        await c.register_group("orders", "billing")  # on every node of the client
        await c.register_group("orders", "audit")
        sent: list[str] = []
        for i in range(10):
            sent += await c.send_to(a, "orders", [{"batch": i, "k": k} for k in range(10)])
        async with asyncio.timeout(30):
            billing = await consume(c.consumer("orders", group="billing", node=a), len(sent))
            # billing's acks alone deleted nothing, on a or b (audit has acked nothing).
            complete = [x.name for x in await c.api.list_chunks(a, "orders") if x.complete]
            assert len(complete) >= 3
            for url in (a, b):
                listing = await c.api.list_groups(url, "orders")
                acked = {g["name"]: g["acked"] for g in listing["groups"]}
                assert acked == {"billing": complete, "audit": []}
            audit = await consume(c.consumer("orders", group="audit", node=b), len(sent))
            # audit acked on b and copied its acks to a: each complete chunk goes everywhere.
            for url in (a, b):

                async def no_complete_chunk(url: str = url) -> bool:
                    return not any(x.complete for x in await c.api.list_chunks(url, "orders"))

                await wait_for(no_complete_chunk, what=f"complete chunks gone on {url}")
    assert [orjson.loads(m)["id"] for m in billing] == sent
    assert [orjson.loads(m)["id"] for m in audit] == sent
