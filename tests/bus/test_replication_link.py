"""A replica's link to one peer, in process: the peer is a real node on loopback, the replica a
bare store with a :class:`PeerLink` (no second node needed)."""

from __future__ import annotations

import asyncio
import errno
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from chukcha.bus import chunks, replication
from chukcha.bus.chunks import ChunkStore, StoreEvent, StoreEventKind
from chukcha.bus.config import Peer, ReplicationConfig
from chukcha.bus.node import Node
from chukcha.bus.replication_link import BufferPool, PeerLink
from chukcha.testing import run_node
from tests.bus.conftest import Api

C0 = "a-chunk000000000"


@pytest.fixture
async def replica(tmp_path: Path) -> AsyncIterator[ChunkStore]:
    store = ChunkStore(tmp_path / "b", "b", max_chunk_size=1 << 20)
    await asyncio.to_thread(store.open)
    try:
        yield store
    finally:
        await asyncio.to_thread(store.close)


async def test_events_loop_survives_an_unexpected_error_and_resubscribes(
    tmp_path: Path, replica: ChunkStore, http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with run_node(tmp_path / "a", instance="a") as owner:
        api = Api(http, owner.url)
        await api.write("c", b"x\n")
        await owner.store.rotate()
        await api.write("c", b"y\n")
        assert (await api.ack("c", C0, 2)).status == 200

        # Applying the replicated ack hits a raw OSError once (a disk hiccup).
        real = chunks._tombstone
        calls = 0

        def flaky_tombstone(dir_path: Path, chunk: str, *, missing_ok: bool = False) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise OSError(errno.EIO, "injected I/O error")
            real(dir_path, chunk, missing_ok=missing_ok)

        monkeypatch.setattr(chunks, "_tombstone", flaky_tombstone)
        applied = asyncio.Event()

        def on_event(event: StoreEvent) -> None:
            if event.kind is StoreEventKind.ACKED and event.chunk == C0:
                applied.set()

        replica.add_listener(on_event)
        link = PeerLink(Peer("a", owner.address), replica, ReplicationConfig(retry_interval=0.05),
                        http, BufferPool(1 << 20, 1))
        link.start()
        try:
            async with asyncio.timeout(10):
                await applied.wait()  # on the second subscription's replay
        finally:
            await link.stop(5)
        assert calls == 2
        assert link.connects >= 2
        assert replica.is_tombstoned("c", C0)


async def _until(store: ChunkStore, check: Callable[[], bool]) -> None:
    """Wait (pushed by the store's events, bounded) until ``check()`` holds."""
    changed = asyncio.Event()

    def on_event(_: StoreEvent) -> None:
        changed.set()

    store.add_listener(on_event)
    try:
        async with asyncio.timeout(10):
            while not check():
                await changed.wait()
                changed.clear()
    finally:
        store.remove_listener(on_event)


_LINK_CONFIG = ReplicationConfig(retry_interval=0.05, poll_wait=0.5)


async def _write_chunks(api: Api, owner: Node, count: int) -> list[str]:
    """One 4-byte message in each of ``count`` chunks of ``c`` (the last one left open)."""
    for i in range(count):
        await api.write("c", b"m%02d\n" % i)
        if i < count - 1:
            await owner.store.rotate()
    return [f"a-chunk{i:09d}" for i in range(count)]


async def _link_until(
    owner: Node, replica: ChunkStore, http: aiohttp.ClientSession, check: Callable[[], bool]
) -> PeerLink:
    """Replicate from ``owner`` until ``check()`` holds, then stop the link."""
    link = PeerLink(Peer("a", owner.address), replica, _LINK_CONFIG, http,
                    BufferPool(1 << 20, 1))
    link.start()
    try:
        await _until(replica, check)
    finally:
        await link.stop(5)
    return link


async def test_acks_past_the_replay_cap_made_while_the_replica_was_away_are_applied(
    tmp_path: Path, replica: ChunkStore, http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replication, "REPLAY_TOMBSTONES", 4)
    # Another owner's chunk on the replica: never dropped because of a's listing.
    assert await replica.append_replica("c", "z-chunk000000000", 0, b"zz\n") == 3
    async with run_node(tmp_path / "a", instance="a") as owner:
        api = Api(http, owner.url)
        names = await _write_chunks(api, owner, 12)
        await _link_until(owner, replica, http,
                          lambda: all(replica.chunk_size("c", n) == 4 for n in names))

        # The replica is away while 10 chunks are acked at their owner: more than the replay
        # re-sends (4 per owner).
        for name in names[:10]:
            assert (await api.ack("c", name, 4)).status == 200

        link = await _link_until(
            owner, replica, http, lambda: all(replica.is_tombstoned("c", n) for n in names[:10])
        )
    assert [c.name for c in replica.list_chunks("c")] == [*names[10:], "z-chunk000000000"]
    cat_dir = tmp_path / "b" / "c"
    files = await asyncio.to_thread(lambda: sorted(p.name for p in cat_dir.iterdir()))
    assert link.connects == 1  # the second link's first subscription did it
    assert files == sorted([*(n + ".acknowledged" for n in names[:10]), *names[10:],
                            "z-chunk000000000"])


async def test_chunks_an_owner_lost_without_acking_them_keep_their_copies(
    tmp_path: Path, replica: ChunkStore, http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replication, "REPLAY_TOMBSTONES", 4)
    async with run_node(tmp_path / "a", instance="a") as owner:
        names = await _write_chunks(Api(http, owner.url), owner, 3)
        await _link_until(owner, replica, http,
                          lambda: all(replica.chunk_size("c", n) == 4 for n in names))
    # The owner loses its two oldest chunk files (a restore from an old backup, a slip of rm):
    # they were never acked, so the replica's copies are the last ones and must stay.
    for name in names[:2]:
        await asyncio.to_thread((tmp_path / "a" / "c" / name).unlink)
    async with run_node(tmp_path / "a", instance="a") as owner:
        # On start the owner closes chunk 2 by starting chunk 3; once the replica holds what is
        # written there, the sync pass that looked at the old chunks is over.
        await Api(http, owner.url).write("c", b"new\n")
        await _link_until(owner, replica, http,
                          lambda: replica.chunk_size("c", "a-chunk000000003") == 4)
    assert [c.name for c in replica.list_chunks("c")] == [*names, "a-chunk000000003"]
    assert not any(replica.is_tombstoned("c", n) for n in names)


async def test_a_catch_up_of_many_chunks_lists_once_and_reads_each_chunk_once(
    tmp_path: Path, replica: ChunkStore, http: aiohttp.ClientSession
) -> None:
    # Issue 11, point 5: a listing per chunk made catching up many small chunks quadratic.
    requests: Counter[str] = Counter()

    async def on_start(_s: object, _c: object, params: aiohttp.TraceRequestStartParams) -> None:
        requests[params.url.path] += 1

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    async with run_node(tmp_path / "a", instance="a") as owner:
        names = await _write_chunks(Api(http, owner.url), owner, 60)
        async with aiohttp.ClientSession(trace_configs=[trace]) as traced:
            # Plain reads through aiohttp (traced) instead of the raw fetcher.
            link = PeerLink(Peer("a", owner.address), replica, _LINK_CONFIG, traced,
                            BufferPool(1 << 20, 1))
            link._fetch_unsupported = True
            link.start()
            try:
                await _until(replica, lambda: all(replica.chunk_size("c", n) == 4
                                                  for n in names))
            finally:
                await link.stop(5)
    assert [c.name for c in replica.list_chunks("c")] == names
    assert requests["/listChunks"] <= 4, requests
    # One read per complete chunk (its listed size is final), a few for the open one.
    assert requests["/read"] <= len(names) + 3, requests
    assert requests["/replication/ack"] <= 10, requests  # progress is reported coalesced
