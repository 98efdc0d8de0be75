"""Emits leave only after the changelog holds the commit they come from. Otherwise a partition
rebuilt from the bus after its owner lost its disk processes those events again (possibly
interleaved differently across streams) and emits the same IDs with other content (the
machine-loss torture test saw two receipts of one order with different running totals)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

import pytest

from chukcha import App, Client, Context
from chukcha.bus.config import Peer
from chukcha.processors import ProcessorConfig
from chukcha.processors.runner import Runner
from chukcha.testing import run_node
from tests.integration.cluster_helpers import wait_for

pytestmark = [pytest.mark.timeout(90)]


async def test_no_emit_reaches_the_bus_before_its_changelog_record(tmp_path: Path) -> None:
    # A configured peer that is down (its port reserved, nobody listening): a changelog write
    # with min_sync_replicas=1 lands on the node and then waits for a replica that never comes,
    # so the app is held between its local commit and the changelog's confirmation.
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        down = Peer("down", f"127.0.0.1:{reserved.getsockname()[1]}")
        async with run_node(tmp_path / "d", "a", peers=(down,)) as node, \
                Client([node.url]) as client:
            app = App("shop", nodes=(node.url,), state_dir=str(tmp_path / "s"),
                      config=ProcessorConfig(read_timeout=0.2, changelog=True,
                                             changelog_min_sync_replicas=1))

            @app.processor("orders")
            def on_order(ctx: Context, order: dict[str, Any]) -> None:
                ctx.set(order["customer"], ctx.get(order["customer"], 0) + order["amount"])
                ctx.emit("receipts", {"order": order["id"]})

            await client.send("orders", [{"id": "o1", "customer": "ann", "amount": 5}])
            stop = asyncio.Event()
            task = asyncio.create_task(Runner(app).run(stop))
            try:
                async def record_on_node() -> bool:
                    chunks = await client.list_chunks("shop.changelog.p0000")
                    return any(c.size > 0 for c in chunks)

                await wait_for(record_on_node, timeout=30,
                               what="the changelog record to land (unconfirmed)")
                # The record is not confirmed: the receipt must not be on the bus yet.
                assert await client.list_chunks("receipts") == []
            finally:
                stop.set()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

