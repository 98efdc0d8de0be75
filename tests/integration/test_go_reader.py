"""The Go simple client's read loop (``PROTOCOL.md``) on one node while writes go to another."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from chukcha.testing import run_cluster
from tests.integration.cluster_helpers import list_chunks, wait_for, write

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class GoSimpleReader:
    """A transcription of the Go simple client's algorithm against one node.

    listChunks, group by owner, start each owner at its oldest chunk; read until an empty 200;
    at the end of a complete chunk fetch the owner's next chunk, ack the finished one, go on;
    at the end of an incomplete chunk come back later; a 404 means "not replicated yet".
    """

    def __init__(self, http: aiohttp.ClientSession, url: str, category: str) -> None:
        self.http, self.url, self.category = http, url, category
        self.pos: dict[str, tuple[str, int]] = {}  # owner -> (chunk, offset)
        self.acked: list[str] = []
        self.not_found = 0

    async def _listing(self) -> list[dict[str, object]]:
        return await list_chunks(self.http, self.url, self.category)

    async def poll(self) -> list[bytes]:
        """One round over every owner; returns the messages read."""
        out: list[bytes] = []
        listing = await self._listing()
        for info in listing:
            owner = str(info["name"]).rpartition("-")[0]
            self.pos.setdefault(owner, (str(info["name"]), 0))
        for owner, start in list(self.pos.items()):
            chunk, off = start
            while True:
                async with self.http.get(f"{self.url}/read", params={
                    "category": self.category, "chunk": chunk, "off": str(off),
                    "max_size": "65536",
                }) as resp:
                    if resp.status == 404:
                        self.not_found += 1
                        break
                    assert resp.status == 200, await resp.text()
                    data = await resp.read()
                if data:
                    off += len(data)
                    out.extend(data[:-1].split(b"\n"))
                    self.pos[owner] = (chunk, off)
                    continue
                listing = await self._listing()
                mine = [c for c in listing if str(c["name"]).rpartition("-")[0] == owner]
                cur = next((c for c in mine if c["name"] == chunk), None)
                if cur is None or not cur["complete"]:
                    break  # incomplete: come back later
                nxt = next((c for c in mine if str(c["name"]) > chunk), None)
                if nxt is None:
                    break
                async with self.http.get(f"{self.url}/ack", params={
                    "category": self.category, "chunk": chunk, "size": str(off),
                }) as resp:
                    assert resp.status == 200, await resp.text()
                self.acked.append(chunk)
                chunk, off = str(nxt["name"]), 0
                self.pos[owner] = (chunk, off)
        return out


async def test_go_simple_reader_on_one_node_while_writes_go_to_another(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with run_cluster(tmp_path, args=("--replication-poll-wait", "2s",
                                           "--max-chunk-size", "2048")) as cluster:
        sent = [f"event-{i:05d}-{'w' * 60}".encode() for i in range(600)]
        by_owner: dict[str, list[bytes]] = {"a": [], "c": []}

        async def produce() -> None:
            for n, i in enumerate(range(0, len(sent), 3)):
                owner = "a" if n % 2 else "c"
                by_owner[owner].extend(sent[i:i + 3])
                body = b"".join(m + b"\n" for m in sent[i:i + 3])
                assert (await write(http, cluster[owner].url, "go", body)).status == 200

        reader = GoSimpleReader(http, cluster["b"].url, "go")
        got: list[bytes] = []
        producer = asyncio.create_task(produce())
        async with asyncio.timeout(90):
            while len(got) < len(sent):
                batch = await reader.poll()
                got.extend(batch)
                if not batch:
                    # Nothing new on b right now: wait for b to change instead of sleeping
                    # (the long poll answers when data for this owner arrives or 1 s passes).
                    owner, (chunk, off) = next(iter(reader.pos.items()), ("", ("", 0)))
                    if chunk:
                        async with http.get(f"{cluster['b'].url}/read", params={
                            "category": "go", "chunk": chunk, "off": str(off),
                            "max_size": "1", "wait": "1",
                        }) as resp:
                            await resp.read()
                    else:
                        await asyncio.sleep(0.05)  # nothing replicated yet: poll b's state
        await producer

        assert sorted(got) == sorted(sent)  # every event exactly once
        assert len(got) == len(set(got))
        for owner, written in by_owner.items():  # within a stream, the write order
            mine = set(written)
            assert [m for m in got if m in mine] == written, owner
        assert len(reader.acked) >= 10
        # The reader's acks on b were replicated to the owners and the other replica.
        acked = set(reader.acked)

        async def acks_everywhere() -> bool:
            for url in cluster.urls:
                names = {c["name"] for c in await list_chunks(http, url, "go")}
                if acked & names:
                    return False
            return True

        await wait_for(acks_everywhere, what="the reader's acks to reach every node")
