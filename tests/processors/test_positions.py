"""A stopped app's positions: ``chukcha app positions|skip|reset`` un-stick and replay it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from chukcha import App, Client
from chukcha.errors import ProcessorError
from chukcha.processors.engine import read_state_table
from chukcha.processors.runner import Runner
from chukcha.testing import run_node
from tests.bus.test_metrics import scrape, value
from tests.integration.cluster_helpers import read_all, wait_for
from tests.integration.test_client_cli import chukcha
from tests.processors.poison_app import build

TARGET = "tests.processors.poison_app:app"


async def run_until(app: App, check: Any, what: str) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(app.run_async(stop))
    try:
        await wait_for(check, timeout=30, what=what)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def table(state: Path) -> dict[str, Any]:
    return read_state_table(state)


async def lines(client: Client, url: str, category: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        if category not in await client.list_categories():
            return []
        return [orjson.loads(m) for m in await read_all(http, url, category)]


@pytest.mark.allow_blocking
async def test_skip_unsticks_a_stopped_app_and_records_the_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    async with run_node(tmp_path / "d") as node, Client([node.url]) as client:
        await client.send("orders", [
            {"id": "o1", "customer": "ann", "amount": 5},
            {"id": "o2", "customer": "bob", "amount": 7, "poison": True},
            {"id": "o3", "customer": "ann", "amount": 1},
        ])
        app = build(nodes=(node.url,), state_dir=str(state))
        with caplog.at_level(logging.ERROR), pytest.raises(ProcessorError) as exc:
            await app.run_async(asyncio.Event())
        assert "chukcha app skip" in str(exc.value)
        # The log has the traceback: the file and line of the callback that raised.
        assert "poison_app.py" in caplog.text and "cannot price order o2" in caplog.text
        with pytest.raises(ProcessorError):  # a restart fails on the same event: a crash loop
            await build(nodes=(node.url,), state_dir=str(state)).run_async(asyncio.Event())

        args = ("--node", node.url, "--state-dir", str(state))
        code, out, err = await chukcha("app", "positions", TARGET, *args)
        assert code == 0, err
        assert out.splitlines()[1].split()[:2] == ["orders", "test"]
        code, out, err = await chukcha("app", "skip", TARGET, "--category", "orders", *args)
        assert code == 0, err
        assert "will skip event o2 at orders test-chunk000000000:" in out, out

        app = build(nodes=(node.url,), state_dir=str(state))

        async def receipts() -> bool:
            return len(await lines(client, node.url, "receipts")) == 2

        await run_until(app, receipts, "o1 and o3 to be processed")
        assert await asyncio.to_thread(table, state) == {"ann": 6}
        dead = await lines(client, node.url, "orders.dead")
        assert [(d["id"], d["error"]) for d in dead] == [
            ("o2/dead", "skipped with chukcha app skip")]
        assert orjson.loads(dead[0]["event"])["id"] == "o2"
        # Nothing left to skip: the failure record went with the skip's commit.
        code, _, err = await chukcha("app", "skip", TARGET, "--category", "orders", *args)
        assert code == 1 and "has not stopped on an event of orders" in err, err


async def test_a_dead_letter_carries_the_traceback(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with run_node(tmp_path / "d") as node, Client([node.url]) as client:
        await client.send("orders", [{"id": "p", "customer": "c", "amount": 1, "poison": True}])
        app = build("dead_letter", nodes=(node.url,), state_dir=str(state))

        async def dead() -> bool:
            return len(await lines(client, node.url, "orders.dead")) == 1

        await run_until(app, dead, "the dead letter")
        (record,) = await lines(client, node.url, "orders.dead")
        assert "ValueError" in record["error"]
        assert 'poison_app.py", line' in record["traceback"]
        assert "cannot price order p" in record["traceback"]


@pytest.mark.allow_blocking
async def test_reset_moves_to_the_earliest_retained_data_or_to_the_end(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with run_node(tmp_path / "d", max_chunk_size=150, retain_acked=3600.0) as node, \
            Client([node.url]) as client:
        await client.send("orders", [{"id": f"o{i}", "customer": "c", "amount": 1}
                                     for i in range(6)])
        app = build(nodes=(node.url,), state_dir=str(state))

        async def receipts(n: int) -> bool:
            return len(await lines(client, node.url, "receipts")) == n

        await run_until(app, lambda: receipts(6), "six receipts")
        args = ("--node", node.url, "--state-dir", str(state))
        code, out, err = await chukcha("app", "reset", TARGET, "--category", "orders",
                                       "--to", "earliest", *args)
        assert code == 0, err
        first = (await client.list_chunks("orders"))[0].name
        assert f"now at {first}:0" in out
        code, out, err = await chukcha("app", "positions", TARGET, *args)
        assert code == 0, err
        row = out.splitlines()[1].split()
        total = sum(c.size for c in await client.list_chunks("orders"))
        assert row[2:] == [first, "0", str(total)]  # everything is ahead again
        # The replay reads the acknowledged (retained) chunks again; the dedup index drops
        # every event, so the state and the emits stay as they were: exactly once.
        runner = Runner(build(nodes=(node.url,), state_dir=str(state)), http="127.0.0.1:0")
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        try:
            async with aiohttp.ClientSession() as http:
                async def replayed() -> bool:
                    if runner.monitor is None or not runner.monitor.address:
                        return False
                    m = await scrape(http, f"http://{runner.monitor.address}")
                    return value(m, "chukcha_app_events_duplicate_total", app="shop",
                                 partition="0") == 6
                await wait_for(replayed, timeout=30, what="the six events to be read again")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        assert await asyncio.to_thread(table, state) == {"c": 6}
        assert len(await lines(client, node.url, "receipts")) == 6
        code, out, err = await chukcha("app", "reset", TARGET, "--category", "orders",
                                       "--to", "end", *args)
        assert code == 0, err
        code, out, err = await chukcha("app", "positions", TARGET, *args)
        assert code == 0, err
        assert out.splitlines()[1].split()[-1] == "0"  # nothing behind
