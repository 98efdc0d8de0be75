"""Failures in a real cluster: SIGKILL mid-write, acks racing downloads, lost acks, dead owners."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from chukcha.testing import ClusterProcess, run_cluster
from tests.integration.cluster_helpers import chunks_of, list_chunks, read_all, wait_for, write

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def converged(http: aiohttp.ClientSession, cluster: ClusterProcess, category: str) -> bool:
    listings = [chunks_of(await list_chunks(http, url, category)) for url in cluster.urls]
    return bool(listings[0]) and all(listing == listings[0] for listing in listings)


async def ack(http: aiohttp.ClientSession, url: str, category: str, chunk: str, size: int) -> int:
    async with http.get(f"{url}/ack", params={"category": category, "chunk": chunk,
                                              "size": str(size)}) as resp:
        await resp.read()
        return resp.status


def live_files(data_dir: Path, category: str) -> set[str]:
    return {p.name for p in (data_dir / category).iterdir() if "chunk" in p.name}


async def test_sigkill_during_sync_writes_loses_nothing_acknowledged_and_adds_no_duplicates(
    tmp_path: Path,
) -> None:
    async with run_cluster(tmp_path, args=("--replication-poll-wait", "2s",
                                           "--max-chunk-size", "8192")) as cluster:
        acked: list[bytes] = []
        attempted: list[bytes] = []
        halfway = asyncio.Event()

        async def writer(name: str, count: int) -> None:
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                for i in range(count):
                    msg = f"{name}-{i:04d}-{'z' * 50}".encode()
                    attempted.append(msg)
                    try:
                        resp = await write(session, cluster[name].url, "pay", msg + b"\n",
                                           sync="1")
                    except (aiohttp.ClientError, TimeoutError):
                        continue  # unknown fate: may or may not be stored, never twice
                    if resp.status == 200:
                        acked.append(msg)
                    if name == "b" and i == 60:
                        halfway.set()

        writers = [asyncio.create_task(writer(n, 150)) for n in ("a", "b", "c")]
        async with asyncio.timeout(60):
            await halfway.wait()
        await cluster["b"].kill()
        await cluster["b"].start()  # same port, same data; writes queued meanwhile go on
        await asyncio.gather(*writers)

        async with aiohttp.ClientSession() as http:
            await wait_for(lambda: converged(http, cluster, "pay"), timeout=60,
                           what="the cluster to converge after the restart")
            for url in cluster.urls:
                counts = Counter(await read_all(http, url, "pay"))
                assert all(counts[m] == 1 for m in acked), url  # nothing acknowledged lost
                assert max(counts.values()) == 1, url  # replication added no duplicate
                assert set(counts) <= set(attempted), url
        assert len(acked) >= 400  # the kill hit only a few in-flight writes


async def test_acks_racing_downloads_never_resurrect_chunks(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with run_cluster(tmp_path, args=("--replication-poll-wait", "2s",
                                           "--max-chunk-size", str(256 << 10))) as cluster:
        line = b"r" * 1023 + b"\n"
        body = line * 256  # 256 KiB: one chunk per write
        for _ in range(40):
            assert (await write(http, cluster["a"].url, "big", body)).status == 200
        # Ack on the owner while b and c are still downloading: most of these chunks are in
        # flight to them right now.
        owned = [c for c in await list_chunks(http, cluster["a"].url, "big") if c["complete"]]
        assert len(owned) >= 39
        acked = owned[:30]
        for c in acked[:20]:
            assert await ack(http, cluster["a"].url, "big", c["name"], c["size"]) == 200

        # And some on a replica, once it holds them: acks replicate from any node.
        async def c_has(names: list[str]) -> bool:
            have = chunks_of(await list_chunks(http, cluster["c"].url, "big"))
            return all(n in have for n in names)

        rest = [c["name"] for c in acked[20:]]
        await wait_for(lambda: c_has(rest), what="c to download chunks 20..29")
        for c in acked[20:]:
            assert await ack(http, cluster["c"].url, "big", c["name"], c["size"]) == 200

        await wait_for(lambda: converged(http, cluster, "big"), timeout=60,
                       what="the cluster to converge")
        gone = {c["name"] for c in acked}
        for name in ("a", "b", "c"):
            listing = chunks_of(await list_chunks(http, cluster[name].url, "big"))
            assert not gone & listing.keys(), name
            files = await asyncio.to_thread(live_files, cluster[name].data_dir, "big")
            assert not gone & files, f"{name} resurrected {sorted(gone & files)}"
            assert {g + ".acknowledged" for g in gone} <= files, name
            assert len(listing) == len(owned) + 1 - len(acked)


async def test_ack_made_while_a_peer_is_down_reaches_it_after_restarts(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with run_cluster(tmp_path, args=("--replication-poll-wait", "2s",
                                           "--max-chunk-size", "64")) as cluster:
        for i in range(4):
            body = f"{i:020d}-{'q' * 40}\n".encode()
            assert (await write(http, cluster["a"].url, "acks", body)).status == 200
        await wait_for(lambda: converged(http, cluster, "acks"), what="replication")
        first = (await list_chunks(http, cluster["a"].url, "acks"))[0]
        assert first["complete"]

        await cluster["c"].kill()
        assert await ack(http, cluster["a"].url, "acks", first["name"], first["size"]) == 200
        # The owner restarts too: the pending ack must survive it (tombstones are files).
        await cluster["a"].kill()
        await cluster["a"].start()
        await cluster["c"].start()

        async def c_dropped_it() -> bool:
            names = chunks_of(await list_chunks(http, cluster["c"].url, "acks"))
            return first["name"] not in names

        await wait_for(c_dropped_it, what="c to apply the ack it missed")
        files = await asyncio.to_thread(live_files, cluster["c"].data_dir, "acks")
        assert first["name"] not in files
        assert first["name"] + ".acknowledged" in files


async def test_owner_gone_longer_than_dead_peer_timeout_has_its_last_chunk_completed(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with run_cluster(tmp_path, ("a", "b"), args=("--replication-poll-wait", "2s",
                                                       "--dead-peer-timeout", "1s")) as cluster:
        assert (await write(http, cluster["a"].url, "d", b"last words\n")).status == 200

        async def b_listing() -> list[dict[str, object]]:
            return await list_chunks(http, cluster["b"].url, "d")

        async def b_has_it() -> bool:
            return [(c["name"], c["complete"]) for c in await b_listing()] == [
                ("a-chunk000000000", False)
            ]

        await wait_for(b_has_it, what="b to replicate a's open chunk")
        await cluster["a"].kill()

        async def completed() -> bool:
            return [c["complete"] for c in await b_listing()] == [True]

        await wait_for(completed, what="b to treat the dead owner's last chunk as complete")
        await cluster["a"].start()  # back: its old chunk is complete anyway (a new one starts)


async def test_replica_killed_mid_catch_up_resumes_from_its_local_size(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    cluster = ClusterProcess(tmp_path, ("a", "b"), args=("--replication-poll-wait", "2s",
                                                         "--max-chunk-size", str(4 << 20)))
    try:
        await asyncio.to_thread(tmp_path.mkdir, parents=True, exist_ok=True)
        await cluster["a"].start()
        line = b"h" * 1023 + b"\n"
        for _ in range(96):  # ~94 MiB of history (bodies under aiohttp's 1 MiB warning)
            assert (await write(http, cluster["a"].url, "hist", line * 1000)).status == 200
        want = chunks_of(await list_chunks(http, cluster["a"].url, "hist"))
        total = sum(want.values())

        await cluster["b"].start()

        async def b_partly_there() -> bool:
            have = chunks_of(await list_chunks(http, cluster["b"].url, "hist"))
            return 0 < sum(have.values()) < total

        await wait_for(b_partly_there, what="b to be part-way through the history")
        await cluster["b"].kill()
        had = sum(chunks_of(await _listing_on_disk(cluster["b"].data_dir)).values())
        await cluster["b"].start()

        async def b_complete() -> bool:
            return chunks_of(await list_chunks(http, cluster["b"].url, "hist")) == want

        await wait_for(b_complete, timeout=60, what="b to finish the history")
        status = await cluster.status("b")
        fetched = next(p["bytes_replicated"] for p in status["peers"] if p["instance"] == "a")
        assert fetched <= total - had + (4 << 20)  # resumed: at most one batch fetched again
        assert await read_all(http, cluster["b"].url, "hist") == await read_all(
            http, cluster["a"].url, "hist")
    finally:
        await cluster.stop()


async def _listing_on_disk(data_dir: Path) -> list[dict[str, object]]:
    def scan() -> list[dict[str, object]]:
        return [{"name": p.name, "size": p.stat().st_size}
                for p in sorted((data_dir / "hist").iterdir()) if "." not in p.name]
    return await asyncio.to_thread(scan)
