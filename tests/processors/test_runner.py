"""The runner against a real node (in-process): commit-then-ack, emits, restart, stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from chukcha import App, Client, Context, Node
from chukcha.errors import ProcessorError, StateLockedError
from chukcha.processors import ErrorPolicy, ProcessorConfig
from chukcha.processors.engine import read_state_table
from chukcha.state import StateConfig
from chukcha.testing import run_node


@pytest.fixture
async def small_node(tmp_path: Path) -> AsyncIterator[Node]:
    # Small chunks, so the orders span several complete chunks that must get acked.
    async with run_node(tmp_path / "data", instance="moscow", max_chunk_size=400) as n:
        yield n


def orders_app(url: str, state_dir: Path, on_error: str = "stop") -> App:
    app = App("billing", nodes=[url], state_dir=state_dir, on_error=on_error)

    @app.processor("orders")
    def on_order(ctx: Context, order: dict[str, Any]) -> None:
        if order.get("explode"):
            raise RuntimeError("boom")
        spent = ctx.get(order["customer"], 0) + order["amount"]
        ctx.set(order["customer"], spent)
        ctx.emit("receipts", {"customer": order["customer"], "spent": spent})

    return app


async def collect(
    client: Client, category: str, ids: set[str], timeout: float = 30, min_count: int = 0
) -> dict[str, Any]:
    """Read ``category`` (no group) until every ID in ``ids`` (and at least ``min_count``
    events) has been seen; returns the events seen by ID."""
    seen: dict[str, Any] = {}
    consumer = client.consumer(category)
    try:
        async with asyncio.timeout(timeout):
            while not ids <= seen.keys() or len(seen) < min_count:
                for batch in await consumer.read():
                    for m in batch.messages():
                        event = orjson.loads(m)
                        seen[event["id"]] = event
    finally:
        await consumer.stop()
    return seen


def table_of(state_dir: Path) -> dict[str, Any]:
    return read_state_table(state_dir)


def orders(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"o{i}", "customer": f"c{i % 3}", "amount": i} for i in range(start, n)]


def totals(items: Sequence[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in items:
        out[o["customer"]] = out.get(o["customer"], 0) + o["amount"]
    return out


async def test_process_restart_and_ack(small_node: Node, tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with Client([small_node.url]) as client:
        batch1 = orders(20)
        await client.send("orders", batch1)
        await client.send("orders", batch1[:10])  # duplicates, same IDs
        app = orders_app(small_node.url, state)
        stop = asyncio.Event()
        task = asyncio.create_task(app.run_async(stop))
        await collect(client, "receipts", {f"o{i}/0" for i in range(20)})
        stop.set()
        await asyncio.wait_for(task, 30)
        assert await asyncio.to_thread(table_of, state) == totals(batch1)

        # Restart: it resumes at the committed positions; new orders and more duplicates.
        batch2 = orders(30, 20)
        await client.send("orders", batch2 + batch1[5:15])
        stop = asyncio.Event()
        task = asyncio.create_task(orders_app(small_node.url, state).run_async(stop))
        seen = await collect(client, "receipts", {f"o{i}/0" for i in range(30)})
        stop.set()
        await asyncio.wait_for(task, 30)
        assert seen.keys() == {f"o{i}/0" for i in range(30)}
        assert await asyncio.to_thread(table_of, state) == totals(batch1 + batch2)
        # Every complete chunk of "orders" was acked for the group (only the open one is left).
        listing = await client.list_chunks("orders")
        assert [c.complete for c in listing] == [False]


async def test_second_instance_is_refused(small_node: Node, tmp_path: Path) -> None:
    state = tmp_path / "state"
    stop = asyncio.Event()
    first = asyncio.create_task(orders_app(small_node.url, state).run_async(stop))
    async with Client([small_node.url]) as client:
        await client.send("orders", orders(1))
        await collect(client, "receipts", {"o0/0"})  # the first instance is running
    with pytest.raises(StateLockedError, match="in use by another process"):
        await orders_app(small_node.url, state).run_async(asyncio.Event())
    stop.set()
    await asyncio.wait_for(first, 30)


async def test_stop_policy_error_commits_nothing(small_node: Node, tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with Client([small_node.url]) as client:
        await client.send("orders", orders(3))
        app = orders_app(small_node.url, state)
        stop = asyncio.Event()
        await asyncio.wait_for(_run_until_receipts(app, client, stop, {"o0/0", "o1/0", "o2/0"}),
                               30)
        await client.send("orders", [{"id": "x", "customer": "c0", "amount": 1},
                                     {"id": "bad", "explode": True}])
        with pytest.raises(ProcessorError, match=r"'bad'.*boom"):
            await asyncio.wait_for(orders_app(small_node.url, state).run_async(), 30)
    # "x" was in the failed batch: not applied.
    assert await asyncio.to_thread(table_of, state) == totals(orders(3))


async def _run_until_receipts(app: App, client: Client, stop: asyncio.Event,
                              ids: set[str]) -> None:
    task = asyncio.create_task(app.run_async(stop))
    try:
        await collect(client, "receipts", ids)
    finally:
        stop.set()
        await task


class FlakySink:
    """Fails the first two flushes; records what it was given."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []
        self.written: list[Any] = []

    async def flush(self, rows: Sequence[Any]) -> None:
        self.calls.append(list(rows))
        if len(self.calls) <= 2:
            raise ConnectionError("sink down")
        self.written.extend(rows)


async def test_sink_flushed_before_commit_retried_with_same_rows(
    small_node: Node, tmp_path: Path
) -> None:
    app = App("sinky", nodes=[small_node.url], state_dir=tmp_path / "state",
              on_error="dead_letter")
    app.config = ProcessorConfig(on_error=ErrorPolicy.DEAD_LETTER, retry_initial=0.01,
                                 retry_max=0.05)
    sink = app.add_sink("rows", FlakySink())

    @app.processor("orders")
    def on_order(ctx: Context, order: dict[str, Any]) -> None:
        ctx.to_sink("rows", order["id"])
        ctx.emit("receipts", {"n": 1})

    async with Client([small_node.url]) as client:
        await client.send("orders", [{"id": "a"}, {"id": "a"}, {"id": "b"}, b"not json"])
        await _run_until_receipts(app, client, asyncio.Event(), {"a/0", "b/0"})
        dead = await collect(client, "orders.dead", set(), min_count=1)
    assert sink.calls[0] == sink.calls[1] == sink.calls[2] == ["a", "b"]
    assert sink.written == ["a", "b"]
    ((dead_id, record),) = dead.items()
    assert record["event"] == "not json"
    assert dead_id == f"orders:{record['chunk']}:{record['offset']}/dead"


@pytest.mark.parametrize("sync_interval", [None, 0.2])
async def test_deferred_fsync_policies(
    small_node: Node, tmp_path: Path, sync_interval: float | None
) -> None:
    state = tmp_path / "state"
    app = orders_app(small_node.url, state)
    app.config = ProcessorConfig(state=StateConfig(sync_interval=sync_interval))
    async with Client([small_node.url]) as client:
        items = orders(40)
        await client.send("orders", items + items[::3])
        await _run_until_receipts(app, client, asyncio.Event(), {f"o{i}/0" for i in range(40)})
        assert await asyncio.to_thread(table_of, state) == totals(items)
        listing = await client.list_chunks("orders")
        assert [c.complete for c in listing] == [False]  # acked once the commits were synced


async def test_stop_finishes_the_batch_in_progress(small_node: Node, tmp_path: Path) -> None:
    state = tmp_path / "state"
    entered, release = asyncio.Event(), asyncio.Event()
    app = App("billing", nodes=[small_node.url], state_dir=state)

    @app.processor("orders")
    async def on_order(ctx: Context, order: dict[str, Any]) -> None:
        entered.set()
        await release.wait()
        ctx.set(order["customer"], ctx.get(order["customer"], 0) + order["amount"])

    async with Client([small_node.url]) as client:
        await client.send("orders", orders(3))
        stop = asyncio.Event()
        task = asyncio.create_task(app.run_async(stop))
        async with asyncio.timeout(30):
            await entered.wait()  # inside the first event of the batch
        stop.set()  # while the batch is in progress: it is finished, committed, then we stop
        release.set()
        await asyncio.wait_for(task, 30)
    assert await asyncio.to_thread(table_of, state) == totals(orders(3))
