"""An ack replicated from a peer wins whatever a download of the same chunk is doing: a chunk
acked anywhere is never served again (issue 11, point 1)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from chukcha.bus.chunks import INLINE_WRITE_LIMIT, ChunkStore
from chukcha.errors import ChunkNotFoundError

PEER_CHUNK = "peer-chunk000000000"


async def test_replicated_ack_during_the_download_that_creates_the_chunk(
    store: ChunkStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    real_create = ChunkStore._create_file

    def gated_create(self: ChunkStore, path: Path, *args: Any) -> None:
        entered.set()  # the download is creating the chunk file (holding the lock)
        release.wait(10)
        real_create(self, path, *args)

    monkeypatch.setattr(ChunkStore, "_create_file", gated_create)
    # Over INLINE_WRITE_LIMIT: created and written in a worker thread, so the ack can arrive
    # while the download holds the lock.
    data = b"x" * INLINE_WRITE_LIMIT + b"\n"
    download = asyncio.create_task(store.append_replica("c", PEER_CHUNK, 0, data))
    # The download holds the category lock and is creating the file in a worker thread.
    assert await asyncio.to_thread(entered.wait, 5)
    ack = asyncio.create_task(store.tombstone_replica("c", PEER_CHUNK))
    for _ in range(10):
        await asyncio.sleep(0)  # yields only: the ack gets as far as it can without the lock
    release.set()
    await download
    await ack
    assert store.is_tombstoned("c", PEER_CHUNK)
    assert store.chunk_size("c", PEER_CHUNK) is None
    assert PEER_CHUNK not in [c.name for c in store.list_chunks("c")]
    with pytest.raises(ChunkNotFoundError):
        await store.read("c", PEER_CHUNK, 0, 1 << 20)
    cat_dir = tmp_path / "data" / "c"
    names = await asyncio.to_thread(lambda: sorted(p.name for p in cat_dir.iterdir()))
    assert names == [PEER_CHUNK + ".acknowledged"]
    # A later download of it is dropped: never resurrected.
    assert await store.append_replica("c", PEER_CHUNK, 0, b"one\n") is None
    assert store.chunk_size("c", PEER_CHUNK) is None
