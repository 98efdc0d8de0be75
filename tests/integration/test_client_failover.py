"""A producer whose first node is SIGKILLed while it sends delivers every event."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from chukcha.client import Client
from chukcha.testing import NodeProcess, run_node


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
