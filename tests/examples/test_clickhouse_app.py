"""The ClickHouse example app in process: a flush that fails is retried with the same rows."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chukcha.client import Client
from chukcha.processors import ProcessorConfig
from chukcha.testing import run_node
from chukcha.testing_clickhouse import ClickHouseServer
from examples.clickhouse_sink import (
    ClickHouseInsertError,
    ClickHouseSink,
    build_app,
    orders_table_ddl,
)


class WatchedSink:
    """The real sink, with its failures counted and the rows of each attempt recorded."""

    def __init__(self, inner: ClickHouseSink) -> None:
        self.inner = inner
        self.attempts: list[list[Any]] = []
        self.failures = 0
        self.failed = asyncio.Event()
        self.stored: set[str] = set()  # IDs of rows in flushes that succeeded
        self.changed = asyncio.Condition()

    async def flush(self, rows: Sequence[Any]) -> None:
        self.attempts.append(list(rows))
        try:
            await self.inner.flush(rows)
        except ClickHouseInsertError:
            self.failures += 1
            self.failed.set()
            raise
        async with self.changed:
            self.stored.update(row["id"] for row in rows)
            self.changed.notify_all()


async def test_failed_flushes_are_retried_with_the_same_rows(
    tmp_path: Path, clickhouse: ClickHouseServer
) -> None:
    orders = [{"id": f"o{i}", "customer": f"c{i % 3}", "amount": i + 1} for i in range(300)]
    async with run_node(tmp_path / "node", instance="a") as node, Client([node.url]) as client:
        await client.send("orders", orders)
        await client.send("orders", orders[:100])  # a retried send: duplicates
        await client.send("orders", [b'{"id":"bad","customer":"c0","amount":"x"}'])
        # No create_sql: the table does not exist yet, as if ClickHouse were down.
        sink = WatchedSink(ClickHouseSink(clickhouse.url, "late"))
        app = build_app([node.url], str(tmp_path / "state"), sink,
                        config=ProcessorConfig(retry_initial=0.05, retry_max=0.2))
        stop = asyncio.Event()
        async with sink.inner, asyncio.TaskGroup() as tg:
            run = tg.create_task(app.run_async(stop))
            async with asyncio.timeout(30):
                await sink.failed.wait()
            await clickhouse.query(orders_table_ddl("late"))  # the store is back
            async with asyncio.timeout(60), sink.changed:
                await sink.changed.wait_for(lambda: len(sink.stored) == len(orders))
            stop.set()
        assert run.exception() is None
    assert sink.failures >= 1
    # Each retry carried exactly the rows of the failed attempt.
    first_ok = sink.failures
    assert all(a == sink.attempts[0] for a in sink.attempts[:first_ok + 1])
    assert {r["id"] for a in sink.attempts for r in a} == {o["id"] for o in orders}
    text = await clickhouse.query("SELECT count(), sum(amount) FROM late FINAL FORMAT TSV")
    assert text == f"300\t{sum(range(1, 301))}\n"


class LostAnswerSink:
    """The insert reaches ClickHouse but the answer is lost (a timeout, a crash before the
    commit), once: the framework sends the same rows again."""

    def __init__(self, inner: ClickHouseSink) -> None:
        self.inner = inner
        self.calls = 0
        self.done = asyncio.Event()

    async def flush(self, rows: Sequence[Any]) -> None:
        self.calls += 1
        await self.inner.flush(rows)
        if self.calls == 1:
            raise TimeoutError("the answer was lost")
        self.done.set()


async def test_an_insert_whose_answer_was_lost_is_sent_again_and_collapses(
    tmp_path: Path, clickhouse: ClickHouseServer
) -> None:
    orders = [{"id": f"o{i}", "customer": "c", "amount": i + 1} for i in range(50)]
    async with run_node(tmp_path / "node", instance="a") as node, Client([node.url]) as client:
        await client.send("orders", orders)
        sink = LostAnswerSink(ClickHouseSink(clickhouse.url, "twice",
                                             create_sql=orders_table_ddl("twice")))
        app = build_app([node.url], str(tmp_path / "state"), sink,
                        config=ProcessorConfig(retry_initial=0.05, retry_max=0.2))
        stop = asyncio.Event()
        async with sink.inner, asyncio.TaskGroup() as tg:
            run = tg.create_task(app.run_async(stop))
            async with asyncio.timeout(30):
                await sink.done.wait()
            stop.set()
        assert run.exception() is None
    assert sink.calls == 2
    # Both copies are in the table; FINAL (and a merge) shows each event once.
    assert await clickhouse.query("SELECT count() FROM twice FORMAT TSV") == "100\n"
    final = "SELECT count(), sum(amount) FROM twice FINAL FORMAT TSV"
    assert await clickhouse.query(final) == f"50\t{sum(range(1, 51))}\n"
    await clickhouse.query("OPTIMIZE TABLE twice FINAL")
    assert await clickhouse.query("SELECT count() FROM twice FORMAT TSV") == "50\n"
