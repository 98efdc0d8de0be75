"""The Go simple client's read loop over many rotated chunks, and rotation by time."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from pathlib import Path

import aiohttp

from chukcha.bus.chunks import StoreEvent, StoreEventKind
from chukcha.protocol import ACK_SUFFIX, parse_chunk_name
from chukcha.testing import run_node
from tests.bus.conftest import Api, disk_state


async def go_client_read_all(api: Api, category: str, max_size: int) -> dict[str, list[bytes]]:
    """PROTOCOL.md's "How the Go simple client reads", until every owner is at the end of its
    incomplete last chunk. Returns the messages read per owner, in reading order."""
    got: dict[str, list[bytes]] = defaultdict(list)
    pos: dict[str, tuple[str, int]] = {}  # owner -> (chunk, offset)
    while True:
        chunks = await api.list_chunks(category)
        by_owner: dict[str, list[dict[str, object]]] = defaultdict(list)
        for c in chunks:
            by_owner[parse_chunk_name(str(c["name"])).instance].append(c)
        progress = False
        for owner, owned in by_owner.items():
            if owner not in pos:
                pos[owner] = (str(owned[0]["name"]), 0)  # the oldest chunk, offset 0
            chunk, off = pos[owner]
            data = await api.read(category, chunk, off, max_size)
            if data:
                assert data.endswith(b"\n")  # only whole messages
                got[owner].extend(data[:-1].split(b"\n"))
                pos[owner] = (chunk, off + len(data))
                progress = True
                continue
            info = next(c for c in owned if c["name"] == chunk)
            if not info["complete"]:
                continue  # end of an incomplete chunk: nothing more for now
            nxt = next(str(c["name"]) for c in owned if str(c["name"]) > chunk)
            ans = await api.ack(category, chunk, off)
            assert (ans.status, ans.body) == (200, b""), ans
            pos[owner] = (nxt, 0)
            progress = True
        if not progress:
            return got


async def _other_owner(data_dir: Path, n_chunks: int, per_chunk: int) -> list[bytes]:
    """Chunks of owner "kazan" as replication leaves them (the last one incomplete)."""
    msgs: list[bytes] = []

    def make() -> None:
        d = data_dir / "log"
        d.mkdir(parents=True)
        for i in range(n_chunks):
            body = [b"kazan %d %d" % (i, j) for j in range(per_chunk)]
            msgs.extend(body)
            (d / f"kazan-chunk{i:09d}").write_bytes(b"\n".join(body) + b"\n")

    await asyncio.to_thread(make)
    return msgs


async def test_go_client_reads_every_message_once_in_order_across_rotated_chunks(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = tmp_path / "data"
    kazan = await _other_owner(data, n_chunks=5, per_chunk=7)
    rng = random.Random(7)  # noqa: S311 - reproducible test data
    written: list[bytes] = []
    async with run_node(data, instance="moscow", max_chunk_size=300) as node:
        api = Api(http, node.url)
        for _ in range(150):
            batch = [b"moscow %05d %s" % (len(written) + k, b"x" * rng.randrange(0, 40))
                     for k in range(rng.randrange(1, 6))]
            written.extend(batch)
            await api.write("log", b"\n".join(batch) + b"\n")
        chunks = await api.list_chunks("log")
        own = [c for c in chunks if c["name"].startswith("moscow-")]
        assert len(own) > 20  # really rotated by size
        assert all(c["size"] <= 300 for c in own)
        got = await go_client_read_all(api, "log", max_size=100)
        assert got["moscow"] == written
        assert got["kazan"] == kazan
        # Every complete chunk was acked on the way; only each owner's last one remains.
        left = await api.list_chunks("log")
        assert [c["name"] for c in left] == ["kazan-chunk000000004", own[-1]["name"]]
    state = await disk_state(data / "log")
    tombstones = [k for k in state if k.endswith(ACK_SUFFIX)]
    assert len(tombstones) == len(own) - 1 + 4
    assert all(state[t] == 0 for t in tombstones)


async def test_rotation_by_time(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with run_node(tmp_path / "data", instance="moscow", rotate_interval=0.2) as node:
        api = Api(http, node.url)
        created = asyncio.Event()
        new_chunks: list[str] = []

        def on_event(event: StoreEvent) -> None:
            if event.kind is StoreEventKind.CREATED and event.category == "t":
                new_chunks.append(event.chunk)
                if event.chunk != "moscow-chunk000000000":
                    created.set()

        node.store.add_listener(on_event)
        await api.write("t", b"first\n")
        # A long poll at the end of the current chunk is answered (empty: no more data) as
        # soon as the timer rotates it, well before its own wait runs out.
        async with asyncio.timeout(20):
            data = await api.read("t", "moscow-chunk000000000", 6, 100, wait=30)
        assert data == b""
        async with asyncio.timeout(20):
            await created.wait()
        assert new_chunks == ["moscow-chunk000000000", "moscow-chunk000000001"]
        assert await api.list_chunks("t") == [
            {"name": "moscow-chunk000000000", "complete": True, "size": 6},
            {"name": "moscow-chunk000000001", "complete": False, "size": 0},
        ]
        # An empty current chunk is not rotated again.
        assert await node.store.rotate() == []
        await api.write("t", b"second\n")
        assert await api.read("t", "moscow-chunk000000001") == b"second\n"
