"""The repartitioning stage against a real node: a plain input written with the Go-style HTTP
API (lines with and without IDs, duplicates) is copied by key into the app's partitioned
category with IDs unchanged and acked; the keyed stage's table equals the tester's. An input
already partitioned with the app's count is read as it is (no hop); a pinned count that the
bus contradicts stops the app with a clear error."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from chukcha import App, Client, Context
from chukcha.bus.node import Node
from chukcha.errors import RequestRejectedError
from chukcha.partitioning import partition_category, partition_of
from chukcha.processors.presence import instances_category
from chukcha.processors.repartition import plan_inputs
from chukcha.processors.tester import Tester
from chukcha.testing import run_node
from tests.integration.cluster_helpers import wait_for
from tests.processors.test_runner import collect, table_of


@pytest.fixture
async def small_node(tmp_path: Path) -> AsyncIterator[Node]:
    async with run_node(tmp_path / "data", instance="moscow", max_chunk_size=600) as n:
        yield n


def keyed_app(url: str, state_dir: Path | None, *, pinned: int | None = None) -> App:
    app = App("billing", nodes=[url], state_dir=state_dir, partitions=4)

    @app.processor("orders", key=lambda o: o["customer"], input_partitions=pinned)
    def on_order(ctx: Context, order: dict[str, Any]) -> None:
        ctx.set(ctx.key, ctx.get(ctx.key, 0) + order["amount"])
        ctx.emit("receipts", {"id": f"r-{ctx.event_id}", "customer": ctx.key})

    return app


async def go_write(url: str, category: str, lines: list[bytes]) -> None:
    """``/write`` as the Go client does it: the raw lines, nothing added."""
    async with aiohttp.ClientSession() as http, http.post(
            f"{url}/write", params={"category": category}, data=b"\n".join(lines) + b"\n"
    ) as resp:
        assert resp.status == 200, await resp.text()


async def read_copy(client: Client, target: str, partitions: int) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for p in range(partitions):
        consumer = client.consumer(partition_category(target, p), group="audit",
                                   register=False)
        try:
            while batches := await consumer.read(timeout=0.5):
                for b in batches:
                    out.setdefault(p, []).extend(orjson.loads(m) for m in b.messages())
        finally:
            await consumer.stop()
    return out


async def test_plain_go_style_input_is_repartitioned(small_node: Node, tmp_path: Path) -> None:
    with_ids = [{"id": f"o{i}", "customer": f"c{i % 7}", "amount": i} for i in range(30)]
    without = [{"customer": f"c{i % 5}", "amount": 100 + i} for i in range(6)]
    lines = [orjson.dumps(o) for o in with_ids + without]
    async with Client([small_node.url]) as client:
        for p in range(4):  # keep the copy's chunks to look at them
            await client.register_group(partition_category("billing.orders", p), "audit")
        await go_write(small_node.url, "orders", lines)
        await go_write(small_node.url, "orders", lines[:10])  # duplicates of o0..o9
        stop = asyncio.Event()
        task = asyncio.create_task(keyed_app(small_node.url, tmp_path / "state").run_async(stop))
        await collect(client, "receipts", {f"r-o{i}" for i in range(30)}, min_count=36)
        stop.set()
        await asyncio.wait_for(task, 30)
        copy = await read_copy(client, "billing.orders", 4)
        listing = await client.list_chunks("orders")
    assert [c.complete for c in listing] == [False]  # the input's complete chunks are acked
    copied = [e for events in copy.values() for e in events]
    for p, events in copy.items():
        assert all(partition_of(e["customer"], 4) == p for e in events)
    ids = {e["id"] for e in copied}
    # The six without an ID carry the one of their original place, so a resend is a copy.
    placed = {i for i in ids if i.startswith("orders:moscow-chunk")}
    assert len(placed) == 6
    assert ids - placed == {f"o{i}" for i in range(30)}  # nothing else
    assert len(copied) == 46  # 36 + the 10 duplicates, each copied once (no crash here)

    t = Tester(keyed_app(small_node.url, None))
    await t.feed_async("orders", *with_ids, *without)
    assert await asyncio.to_thread(table_of, tmp_path / "state") == t.table


async def test_an_input_partitioned_like_the_app_needs_no_hop(small_node: Node,
                                                              tmp_path: Path) -> None:
    orders = [{"id": f"o{i}", "customer": f"c{i % 7}", "amount": i} for i in range(20)]
    async with Client([small_node.url]) as client:
        await client.create_partitions("orders", 4)
        await client.send("orders", orders, key=lambda o: o["customer"])
        stop = asyncio.Event()
        task = asyncio.create_task(
            keyed_app(small_node.url, tmp_path / "state", pinned=4).run_async(stop))
        await collect(client, "receipts", {f"r-o{i}" for i in range(20)})
        stop.set()
        await asyncio.wait_for(task, 30)
        assert await client.partitions("billing.orders") == 0  # no copy was made
        # Only the heartbeats (chukcha.processors.presence), no copy of the input.
        assert [c for c in await client.list_categories()
                if c.startswith("billing.")] == [instances_category("billing")]
    t = Tester(keyed_app(small_node.url, None))
    await t.feed_async("orders", *orders)
    assert await asyncio.to_thread(table_of, tmp_path / "state") == t.table


async def test_a_pinned_count_the_bus_contradicts_is_refused(small_node: Node,
                                                             tmp_path: Path) -> None:
    async with Client([small_node.url]) as client:
        await client.create_partitions("orders", 2)
    with pytest.raises(ValueError, match="pins input_partitions=4, but the bus has 'orders' "
                                         "with 2 partitions"):
        await keyed_app(small_node.url, tmp_path / "s1", pinned=4).run_async(asyncio.Event())
    with pytest.raises(ValueError, match=r"unpartitioned \(create them: chukcha partitions "
                                         r"refunds 4\)"):
        app = App("billing", nodes=[small_node.url], state_dir=tmp_path / "s2", partitions=4)

        @app.processor("refunds", input_partitions=4)
        def on_refund(ctx: Context, refund: dict[str, Any]) -> None:
            ctx.set(ctx.event_id, 1)

        await app.run_async(asyncio.Event())
    with pytest.raises(ValueError, match="from 1 to 1024"):
        App("x").processor("c", input_partitions=0)


async def test_another_count_is_repartitioned_from_its_partitions(small_node: Node,
                                                                  tmp_path: Path) -> None:
    """An input with 2 partitions for an app with 4: the hop reads both partitions."""
    orders = [{"id": f"o{i}", "customer": f"c{i % 7}", "amount": i} for i in range(25)]
    async with Client([small_node.url]) as client:
        await client.create_partitions("orders", 2)
        await client.send("orders", orders, key=lambda o: o["customer"])
        stop = asyncio.Event()
        task = asyncio.create_task(keyed_app(small_node.url, tmp_path / "state").run_async(stop))
        await collect(client, "receipts", {f"r-o{i}" for i in range(25)})
        stop.set()
        await asyncio.wait_for(task, 30)
        assert await client.partitions("billing.orders") == 4
    t = Tester(keyed_app(small_node.url, None))
    await t.feed_async("orders", *orders)
    assert await asyncio.to_thread(table_of, tmp_path / "state") == t.table


async def test_one_partition_reads_a_partitioned_input_directly(small_node: Node,
                                                                tmp_path: Path) -> None:
    orders: list[dict[str, Any]] = [
        {"id": f"o{i}", "customer": f"c{i % 7}", "amount": i} for i in range(15)]
    app = App("single", nodes=[small_node.url], state_dir=tmp_path / "state")

    @app.processor("orders")
    def on_order(ctx: Context, order: dict[str, Any]) -> None:
        ctx.set(order["customer"], ctx.get(order["customer"], 0) + order["amount"])
        ctx.emit("receipts", {"id": f"r-{ctx.event_id}"})

    async with Client([small_node.url]) as client:
        await client.create_partitions("orders", 3)
        await client.send("orders", orders, key=lambda o: o["customer"])
        stop = asyncio.Event()
        task = asyncio.create_task(app.run_async(stop))
        await collect(client, "receipts", {f"r-o{i}" for i in range(15)})
        stop.set()
        await asyncio.wait_for(task, 30)
        # Only the heartbeats (chukcha.processors.presence), no copy of the input.
        assert [c for c in await client.list_categories()
                if c.startswith("single.")] == [instances_category("single")]
    want: dict[str, int] = {}
    for o in orders:
        want[o["customer"]] = want.get(o["customer"], 0) + o["amount"]
    assert await asyncio.to_thread(table_of, tmp_path / "state") == want


async def test_the_apps_category_name_taken_by_data_is_refused(small_node: Node,
                                                               tmp_path: Path) -> None:
    async with Client([small_node.url]) as client:
        await client.send("billing.orders.p0001", [{"id": "x"}])  # someone else's category
    with pytest.raises(RequestRejectedError,
                       match=re.escape("'billing.orders.p0001' already exists with data")):
        await keyed_app(small_node.url, tmp_path / "state").run_async(asyncio.Event())


async def test_an_app_started_before_the_bus_waits_for_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The bus is asked again until a node answers (refused connections at first: the port
    is bound but not listening yet): first for other instances of the app, then for the
    partition count."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = keyed_app(url, tmp_path / "state")
    app.config = dataclasses.replace(app.config, retry_initial=0.05, retry_max=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(app.run_async(stop))
    try:
        with caplog.at_level(logging.WARNING, logger="chukcha.processors"):

            async def retried() -> bool:
                return caplog.text.count("cannot check for another instance yet") >= 2

            await wait_for(retried, timeout=20, what="the app to retry")
            assert not task.done()  # still waiting for the bus, not failed
        # The node owns the socket from now on (it listens on it and closes it).
        async with run_node(tmp_path / "data", listen_fd=sock.detach()) as node, \
                Client([node.url]) as client:
            await client.send("orders", [{"id": "o1", "customer": "c1", "amount": 5}])
            await collect(client, "receipts", {"r-o1"})
            stop.set()
            await asyncio.wait_for(task, 30)
    finally:
        if not task.done():  # the test failed before the app could finish: do not leak it
            task.cancel()
            await asyncio.wait([task])
        if sock.fileno() != -1:
            sock.close()
    assert await asyncio.to_thread(table_of, tmp_path / "state") == {"c1": 5}


async def test_the_partition_count_is_asked_again_until_a_node_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """plan_inputs on its own (an app's run checks for other instances first, so the bus
    already answers when it gets here): refused connections at first, then a node."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = keyed_app(url, None)
    app.config = dataclasses.replace(app.config, retry_initial=0.05, retry_max=0.2)
    async with Client([url]) as client:
        task = asyncio.create_task(plan_inputs(app, client))
        try:
            with caplog.at_level(logging.WARNING, logger="chukcha.processors.repartition"):

                async def retried() -> bool:
                    return caplog.text.count("cannot read the partitions of orders yet") >= 2

                await wait_for(retried, timeout=20, what="plan_inputs to retry")
                assert not task.done()  # still waiting for the bus, not failed
            async with run_node(tmp_path / "data", listen_fd=sock.detach()):
                plans = await asyncio.wait_for(task, 30)
            assert [p.handler for p in plans] == ["orders"]
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait([task])
            if sock.fileno() != -1:
                sock.close()
