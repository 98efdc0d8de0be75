"""What a replica accepts from a peer: whole messages only, answers of bounded size."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from chukcha.bus import replication_link
from chukcha.bus.chunks import ChunkStore
from chukcha.bus.config import Peer, ReplicationConfig
from chukcha.bus.node import Node
from chukcha.bus.replication_link import BufferPool, PeerLink, _CategoryState, _lines
from chukcha.errors import ReplicationError
from tests.bus.conftest import Api

PEER_CHUNK = "peer-chunk000000000"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ChunkStore]:
    s = ChunkStore(tmp_path / "replica", "me", max_chunk_size=1 << 20)
    await asyncio.to_thread(s.open)
    try:
        yield s
    finally:
        await asyncio.to_thread(s.close)


@pytest.mark.parametrize("data", [b"partial", b"one\ntwo", memoryview(b"one\ntw")])
async def test_replica_data_not_ending_in_a_newline_is_refused(
    store: ChunkStore, tmp_path: Path, data: bytes | memoryview
) -> None:
    with pytest.raises(ReplicationError, match="do not end in a newline"):
        await store.append_replica("c", PEER_CHUNK, 0, data)
    assert store.chunk_size("c", PEER_CHUNK) is None  # nothing created
    assert await store.append_replica("c", PEER_CHUNK, 0, b"one\n") == 4
    with pytest.raises(ReplicationError, match="do not end in a newline"):
        await store.append_replica("c", PEER_CHUNK, 4, data)
    assert store.chunk_size("c", PEER_CHUNK) == 4
    path = tmp_path / "replica" / "c" / PEER_CHUNK
    assert await asyncio.to_thread(path.read_bytes) == b"one\n"


async def test_a_peer_listing_over_the_cap_is_refused(
    node: Node, api: Api, store: ChunkStore, http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for _ in range(3):
        await api.write("c", b"x\n")
        await node.store.rotate()
    link = PeerLink(Peer("moscow", node.address), store, ReplicationConfig(), http,
                    BufferPool(1 << 10, 1))
    state = _CategoryState()
    assert len(await link._list("c", state)) == 4  # ~200 bytes of JSON
    monkeypatch.setattr(replication_link, "_MAX_LISTING", 100)
    with pytest.raises(ReplicationError, match="over 100"):
        await link._list("c", state)


async def test_an_events_line_over_the_cap_is_refused(
    node: Node, http: aiohttp.ClientSession
) -> None:
    async with asyncio.timeout(10), http.get(
        f"{node.url}/replication/events", params={"instance": "me"}
    ) as resp:
        first = await anext(_lines(resp.content, 1 << 10))
        assert b'"Type":""' in first  # the empty message (~60 bytes) fits in 1 KiB
    async with asyncio.timeout(10), http.get(
        f"{node.url}/replication/events", params={"instance": "me"}
    ) as resp:
        with pytest.raises(ReplicationError, match="over 20 bytes"):
            await anext(_lines(resp.content, 20))
