"""The runner with 8 partitions against a real node: the same table as the tester (with 8
partitions and with 1) on the same input with duplicates, across a restart; one store per
partition; every complete input chunk acked; another partition count on the state refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chukcha import App, Client, Context
from chukcha.bus.node import Node
from chukcha.errors import StateLayoutError
from chukcha.partitioning import partition_of
from chukcha.processors.tester import Tester
from chukcha.state.partitions import open_partition_stores
from chukcha.testing import run_node
from tests.processors.test_runner import collect, orders, table_of


@pytest.fixture
async def small_node(tmp_path: Path) -> AsyncIterator[Node]:
    async with run_node(tmp_path / "data", instance="moscow", max_chunk_size=400) as n:
        yield n


def keyed_app(url: str, state_dir: Path | None, partitions: int) -> App:
    app = App("billing", nodes=[url], state_dir=state_dir, partitions=partitions)

    @app.processor("orders", key=lambda order: order["customer"])
    def on_order(ctx: Context, order: dict[str, Any]) -> None:
        spent = ctx.get(ctx.key, 0) + order["amount"]
        ctx.set(ctx.key, spent)
        ctx.emit("receipts", {"customer": ctx.key, "spent": spent, "partition": ctx.partition})

    return app


async def run_until(app: App, client: Client, ids: set[str]) -> dict[str, Any]:
    stop = asyncio.Event()
    task = asyncio.create_task(app.run_async(stop))
    try:
        return await collect(client, "receipts", ids)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_runner_with_8_partitions_equals_the_tester(small_node: Node,
                                                          tmp_path: Path) -> None:
    state = tmp_path / "state"
    batch1 = [{**o, "customer": f"c{i % 11}"} for i, o in enumerate(orders(40))]
    batch2 = [{**o, "customer": f"c{i % 11}"} for i, o in enumerate(orders(70, 40), 40)]
    async with Client([small_node.url]) as client:
        await client.send("orders", batch1)
        await client.send("orders", batch1[:15])  # duplicates, same IDs
        await run_until(keyed_app(small_node.url, state, 8), client,
                        {f"o{i}/0" for i in range(40)})
        await client.send("orders", batch2 + batch1[10:30])
        seen = await run_until(keyed_app(small_node.url, state, 8), client,
                               {f"o{i}/0" for i in range(70)})
        listing = await client.list_chunks("orders")
    assert [c.complete for c in listing] == [False]  # every complete chunk acked
    assert all(e["partition"] == partition_of(e["customer"], 8) for e in seen.values())

    testers = {n: Tester(keyed_app(small_node.url, None, n)) for n in (1, 8)}
    for t in testers.values():
        await t.feed_async("orders", *batch1, *batch1[:15])
        await t.feed_async("orders", *batch2, *batch1[10:30])
    table = await asyncio.to_thread(table_of, state)
    assert table == testers[8].table == testers[1].table
    assert len(table) == 11

    stores = await asyncio.to_thread(open_partition_stores, state, None)
    try:
        assert len(stores) == 8
    finally:
        for s in stores:
            s.close()
    with pytest.raises(StateLayoutError, match="asks for 4"):
        await keyed_app(small_node.url, state, 4).run_async(asyncio.Event())
