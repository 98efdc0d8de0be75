"""Replication between real ``chukcha node`` subprocesses with static ``--peers``."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from chukcha.bus.config import Peer, ReplicationConfig
from chukcha.testing import ClusterProcess, bind_loopback, run_cluster, run_node
from tests.integration.cluster_helpers import chunks_of, list_chunks, read_all, wait_for, write

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def same_chunks_everywhere(
    http: aiohttp.ClientSession, cluster: ClusterProcess, category: str
) -> bool:
    listings = [chunks_of(await list_chunks(http, url, category)) for url in cluster.urls]
    return all(listing == listings[0] for listing in listings)


async def test_writes_to_every_node_are_readable_exactly_once_everywhere(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with run_cluster(tmp_path, args=("--replication-poll-wait", "2s",
                                           "--max-chunk-size", "4096")) as cluster:
        sent: list[bytes] = []
        for i in range(300):
            node = cluster.urls[i % 3]
            body = b"".join(f"msg-{i}-{j}-{'x' * 40}\n".encode() for j in range(3))
            resp = await write(http, node, "events", body)
            assert resp.status == 200
            sent.extend(body[:-1].split(b"\n"))

        await wait_for(lambda: same_chunks_everywhere(http, cluster, "events"),
                       what="every node to hold the same chunks")
        listing = await list_chunks(http, cluster.urls[0], "events")
        owners = {c["name"].rpartition("-")[0] for c in listing}
        assert owners == {"a", "b", "c"}
        assert len(listing) > 6  # the small max chunk size made several chunks per owner
        for url in cluster.urls:
            got = await read_all(http, url, "events")
            assert Counter(got) == Counter(sent), url  # every message, exactly once

        # /status (the agreed shape): every peer up, nothing left to replicate.
        status = await cluster.status("a")
        assert status["instance"] == "a"
        assert status["address"] == cluster["a"].address
        peers = {p["instance"]: p for p in status["peers"]}
        assert set(peers) == {"b", "c"}
        for name, peer in peers.items():
            assert peer["url"] == cluster[name].url
            assert peer["up"] is True
            assert peer["lag_bytes"] == 0
            assert isinstance(peer["last_seen"], float)
            assert peer["bytes_replicated"] > 0


async def test_min_sync_replicas_waits_for_replicas_and_refuses_impossible(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with run_cluster(tmp_path) as cluster:
        a, b, c = cluster.urls
        resp = await write(http, a, "orders", b"one\n", min_sync_replicas="2")
        assert resp.status == 200
        # Answered only after both replicas reported holding it: both have it now, no waiting.
        for url in (b, c):
            assert chunks_of(await list_chunks(http, url, "orders")) == {"a-chunk000000000": 4}

        resp = await write(http, a, "orders", b"two\n", min_sync_replicas="3")
        assert resp.status == 500
        # The error is clear, and the data was still written locally (as documented).
        async with http.post(f"{a}/write", params={"category": "orders",
                                                  "min_sync_replicas": "3"},
                             data=b"three\n") as r:
            text = await r.text()
        assert "min_sync_replicas=3" in text and "live" in text
        assert chunks_of(await list_chunks(http, a, "orders"))["a-chunk000000000"] == 14

        resp = await write(http, a, "orders", b"four\n", min_sync_replicas="x")
        assert resp.status == 400


async def test_min_sync_replicas_times_out_with_a_clear_error(tmp_path: Path) -> None:
    # A peer that never answers: its connections wait in the listen backlog forever.
    ghost = bind_loopback()
    host, port = ghost.getsockname()[:2]
    try:
        async with run_node(
            tmp_path / "a", "a", peers=(Peer("ghost", f"{host}:{port}"),),
            replication=ReplicationConfig(min_sync_timeout=0.5),
        ) as node, aiohttp.ClientSession() as http:
            resp = await write(http, node.url, "t", b"x\n", min_sync_replicas="1")
            assert resp.status == 500
            async with http.post(f"{node.url}/write", params={
                "category": "t", "min_sync_replicas": "1"}, data=b"y\n") as r:
                text = await r.text()
            assert "min_sync_replicas=1" in text and "within 0.5 s" in text
            # Both writes are on this node all the same (as documented).
            assert chunks_of(await list_chunks(http, node.url, "t")) == {"a-chunk000000000": 4}
    finally:
        ghost.close()


async def test_replication_reports_count_only_from_known_peers(tmp_path: Path) -> None:
    # The only peer never answers; a stranger forges its progress reports (issue 11, point 7).
    ghost = bind_loopback()
    host, port = ghost.getsockname()[:2]
    try:
        async with run_node(
            tmp_path / "a", "a", peers=(Peer("ghost", f"{host}:{port}"),),
            replication=ReplicationConfig(min_sync_timeout=1.0),
        ) as node, aiohttp.ClientSession() as http:
            async def forge(instance: str, size: int) -> int:
                params = {"category": "t", "chunk": "a-chunk000000000", "instance": instance,
                          "size": str(size)}
                async with http.get(f"{node.url}/replication/ack", params=params) as r:
                    return r.status

            async def written(size: int) -> bool:
                return chunks_of(await list_chunks(http, node.url, "t")).get(
                    "a-chunk000000000") == size

            pending = asyncio.create_task(write(http, node.url, "t", b"x\n",
                                                min_sync_replicas="1"))
            await wait_for(lambda: written(2), what="the write to land")
            assert await forge("stranger", 2) == 403  # refused, and counts for nothing
            resp = await pending
            assert resp.status == 500  # timed out: no replica holds it

            # The known peer's report (not forged here: a stand-in for it) does count.
            pending = asyncio.create_task(write(http, node.url, "t", b"y\n",
                                                min_sync_replicas="1"))
            await wait_for(lambda: written(4), what="the second write to land")
            assert await forge("ghost", 4) == 200
            assert (await pending).status == 200
    finally:
        ghost.close()
