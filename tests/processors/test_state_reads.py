"""``ctx.get`` of a key that is not cached reads LevelDB synchronously on the event loop, by
decision (see the comment in :meth:`chukcha.processors.engine.Context.get`). This test runs that
path with the autouse blockbuster fixture active, so it fails if the read ever becomes I/O that
blockbuster detects."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from blockbuster import BlockBuster

from chukcha import App, Context
from chukcha.processors.engine import Engine, read_table
from chukcha.state import LevelDBStore


class CountingStore(LevelDBStore):
    """The real LevelDB store, counting point reads."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gets = 0

    def get(self, key: bytes) -> bytes | None:
        self.gets += 1
        return super().get(key)


async def test_uncached_get_reads_leveldb_on_the_loop_once(
    tmp_path: Path, blockbuster: BlockBuster | None
) -> None:
    assert blockbuster is not None  # the blocking-I/O detector is on for this test
    store = await asyncio.to_thread(CountingStore, tmp_path / "state")
    try:
        # Committed by an earlier run: not in the new engine's cache.
        await asyncio.to_thread(store.write, {b"t/ann": b"5"})
        app = App("billing", state_dir=tmp_path / "state")

        @app.processor("orders")
        def on_order(ctx: Context, order: dict[str, Any]) -> None:
            ctx.set(order["customer"], ctx.get(order["customer"], 0) + order["amount"])

        engine = Engine(app, store)
        await asyncio.to_thread(engine.load)
        line = b'{"id": "1", "customer": "ann", "amount": 2}\n'
        await engine.process("orders", "x", "x-chunk000000000", 0, line)
        assert store.gets == 1  # the miss went to LevelDB, on the loop, unflagged
        plan = engine.prepare()
        await asyncio.to_thread(store.write, plan.puts, plan.deletes)
        engine.committed()
        line2 = b'{"id": "2", "customer": "ann", "amount": 3}\n'
        await engine.process("orders", "x", "x-chunk000000000", len(line), line2)
        assert store.gets == 1  # now cached
        plan = engine.prepare()
        await asyncio.to_thread(store.write, plan.puts, plan.deletes)
        engine.committed()
        assert await asyncio.to_thread(read_table, store) == {"ann": 10}
    finally:
        await asyncio.to_thread(store.close)
