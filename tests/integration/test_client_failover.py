"""A producer whose first node is SIGKILLed while it sends delivers every event."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from chukcha.client import Client, ConsumerConfig
from chukcha.testing import NodeProcess, run_node
from chukcha.testing_cluster import run_cluster
from tests.integration.cluster_helpers import wait_for


async def read_node(client: Client, url: str, category: str) -> list[dict[str, object]]:
    async with client.consumer(category, node=url) as consumer:
        got: list[dict[str, object]] = []
        async with asyncio.timeout(30):
            while True:
                batches = await consumer.read(timeout=0.5)
                for batch in batches:
                    got += [orjson.loads(m) for m in batch.messages()]
                if not batches and consumer.caught_up:
                    break
    return got


@pytest.mark.slow
async def test_producer_delivers_everything_when_its_node_dies_mid_send(tmp_path: Path) -> None:
    first = NodeProcess(tmp_path / "a", "a")
    await first.start()
    try:
        async with (
            run_node(tmp_path / "b", instance="b") as second,
            Client([first.url, second.url], timeout=5) as c,
        ):
            events = [{"n": i, "pad": "x" * 100} for i in range(30000)]
            async with c.producer("f", max_batch_bytes=64 << 10, linger=0.001) as producer:
                ids = await producer.send_many(events[:3000])
                await producer.flush()  # these are on the first node
                ids += await producer.send_many(events[3000:])  # ~4 MB: ~60 requests
                assert producer.pending_bytes > 0
                await first.kill()  # while the producer is sending
            # Every event was encoded with its ID before the first attempt.
            await first.start()  # same port, same data: what it took before dying is there
            on_first = await read_node(c, first.url, "f")
            on_second = await read_node(c, second.url, "f")
    finally:
        await first.stop()
        first.close()

    # The first node took the first part, the second one the rest after the kill.
    assert 3000 <= len(on_first) < len(ids)
    assert on_second
    got = on_first + on_second
    by_id = {str(e["id"]): e["n"] for e in got}
    assert set(by_id) == set(ids)  # nothing lost
    assert all(by_id[i] == n for n, i in enumerate(ids))  # each with its original ID
    assert len(got) >= len(ids)  # duplicates are allowed


async def test_consumer_continues_on_a_replica_when_its_node_dies(tmp_path: Path) -> None:
    async with (
        run_cluster(tmp_path, ("a", "b"),
                    args=("--replication-poll-wait", "2s", "--max-chunk-size", "2000")) as cl,
        Client(cl.urls, timeout=1) as c,
    ):
        a, b = cl["a"].url, cl["b"].url
        sent: list[str] = []
        for i in range(20):
            sent += await c.send_to(a, "r", [{"i": i, "k": k} for k in range(5)])

        async def replicated() -> bool:
            return await c.api.list_chunks(b, "r") == await c.api.list_chunks(a, "r")

        await wait_for(replicated, what="b holding every chunk of a")
        consumer = c.consumer("r", node=a, config=ConsumerConfig(
            max_batch_bytes=300, retry_interval=0.1))
        got: list[bytes] = []
        async with consumer, asyncio.timeout(30):
            while len(got) < 30:
                for batch in await consumer.read():
                    got += batch.messages()
            await cl["a"].kill()
            while len(got) < len(sent):
                for batch in await consumer.read():
                    got += batch.messages()
            assert consumer.url == b
    # Replicas hold the same bytes, so positions carry over: nothing lost, nothing twice.
    assert [orjson.loads(m)["id"] for m in got] == sent
