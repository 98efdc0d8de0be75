"""Cancelling a store call never releases the category lock while a worker thread still changes
the chunk file (a restarted download would otherwise append the same bytes twice)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from chukcha.bus.chunks import INLINE_WRITE_LIMIT, ChunkStore, WriteResult
from chukcha.errors import ReplicationError
from tests.bus.conftest import AppendGate

PEER_CHUNK = "peer-chunk000000000"


async def _let_others_run() -> None:
    # Yields only (no timed sleep): everything that can run without the blocked worker runs.
    for _ in range(10):
        await asyncio.sleep(0)


async def test_cancelled_replica_append_holds_the_lock_until_the_thread_is_done(
    store: ChunkStore, gate: AppendGate, tmp_path: Path
) -> None:
    data = b"x" * INLINE_WRITE_LIMIT + b"\n"  # created and written in a worker thread
    first = asyncio.create_task(store.append_replica("c", PEER_CHUNK, 0, data))
    await asyncio.to_thread(gate.entered.wait, 5)  # the worker is inside the append
    first.cancel()
    # The old link is stopped in the background and a new one starts the same download.
    second = asyncio.create_task(store.append_replica("c", PEER_CHUNK, 0, data))
    await _let_others_run()
    assert not first.done()  # still waiting for its thread, and still holding the lock
    gate.open()
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert isinstance(results[1], ReplicationError)  # "download at 0 but local size is 8"
    path = tmp_path / "data" / "c" / PEER_CHUNK
    assert await asyncio.to_thread(path.read_bytes) == data  # once, not twice
    assert store.chunk_size("c", PEER_CHUNK) == len(data)
    assert await store.append_replica("c", PEER_CHUNK, len(data), b"three\n") == len(data) + 6


async def test_cancelled_large_write_completes_before_the_next_write(
    store: ChunkStore, gate: AppendGate, tmp_path: Path
) -> None:
    big = b"b" * INLINE_WRITE_LIMIT + b"\n"  # over the inline limit: the worker-thread path
    first = asyncio.create_task(store.write("c", big))
    await asyncio.to_thread(gate.entered.wait, 5)
    first.cancel()
    second = asyncio.create_task(store.write("c", b"after\n"))
    await _let_others_run()
    assert not first.done() and not second.done()
    gate.open()
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    chunk = "me-chunk000000000"
    path = tmp_path / "data" / "c" / chunk
    assert await asyncio.to_thread(path.read_bytes) == big + b"after\n"
    assert store.chunk_size("c", chunk) == len(big) + 6
    assert results[1] == WriteResult(chunk, len(big) + 6)
