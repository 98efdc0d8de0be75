"""Membership through a real etcd: joins, leaves, catch-up, etcd going away under the cluster."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from chukcha.testing import ClusterProcess, EtcdServer, run_cluster, run_etcd
from tests.integration.cluster_helpers import chunks_of, list_chunks, read_all, wait_for, write

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


async def peer_names(cluster: ClusterProcess, name: str) -> set[str]:
    return {p["instance"] for p in (await cluster.status(name))["peers"]}


async def test_node_added_to_running_cluster_catches_up_on_history(
    tmp_path: Path, http: aiohttp.ClientSession, etcd: EtcdServer
) -> None:
    async with run_cluster(tmp_path / "nodes", ("a", "b"), etcd=etcd.endpoint,
                           args=("--replication-poll-wait", "2s",
                                 "--max-chunk-size", "2048")) as cluster:
        sent: list[bytes] = []
        for i in range(200):
            body = f"history-{i}-{'y' * 30}\n".encode()
            assert (await write(http, cluster.urls[i % 2], "log", body)).status == 200
            sent.append(body[:-1])

        late = cluster.add("late")
        await late.start()
        # The existing nodes learn of it from the etcd watch, without restarting.
        await cluster.wait_connected()
        assert await peer_names(cluster, "a") == {"b", "late"}

        async def caught_up() -> bool:
            want = chunks_of(await list_chunks(http, cluster["a"].url, "log"))
            got = chunks_of(await list_chunks(http, late.url, "log"))
            return bool(want) and got == want

        await wait_for(caught_up, what="the new node to hold every chunk of the history")
        assert Counter(await read_all(http, late.url, "log")) == Counter(sent)

        # A graceful leave revokes the lease: the others drop the node at once.
        await late.stop()
        await wait_for(lambda: _lacks(cluster, "a", "late"), what="a to see 'late' leave")


async def _lacks(cluster: ClusterProcess, name: str, peer: str) -> bool:
    return peer not in await peer_names(cluster, name)


async def test_cluster_keeps_replicating_while_etcd_is_down_and_resumes_watch(
    tmp_path: Path, http: aiohttp.ClientSession, etcd: EtcdServer
) -> None:
    async with run_cluster(tmp_path / "nodes", ("a", "b", "c"), etcd=etcd.endpoint) as cluster:
        await etcd.stop()

        async def etcd_lost(name: str) -> bool:
            return (await cluster.status(name))["coordinator_connected"] is False

        for name in ("a", "b", "c"):
            await wait_for(functools.partial(etcd_lost, name),
                           what=f"{name} to notice etcd is down")
        # Known peers stay; writes with min_sync_replicas still replicate without etcd.
        assert await peer_names(cluster, "a") == {"b", "c"}
        resp = await write(http, cluster["a"].url, "orders", b"while-etcd-down\n",
                           min_sync_replicas="2")
        assert resp.status == 200

        # A node that joins while etcd is away is seen once etcd is back: the others resume
        # their watch from the last revision they saw, so the join is not missed.
        await etcd.start()
        late = cluster.add("d")
        await late.start()
        for name in ("a", "b", "c"):
            await wait_for(functools.partial(_has, cluster, name, "d"),
                           what=f"{name} to see d join after etcd came back")
        await cluster.wait_connected()

        async def d_has_it() -> bool:
            return chunks_of(await list_chunks(http, late.url, "orders")) == {
                "a-chunk000000000": len(b"while-etcd-down\n")
            }

        await wait_for(d_has_it, what="d to replicate a's chunk")


async def _has(cluster: ClusterProcess, name: str, peer: str) -> bool:
    status = await cluster.status(name)
    return status["coordinator_connected"] is True and peer in {
        p["instance"] for p in status["peers"]
    }


async def test_killed_node_drops_out_after_its_lease_and_comes_back(
    tmp_path: Path, http: aiohttp.ClientSession, etcd: EtcdServer
) -> None:
    async with run_cluster(tmp_path / "nodes", ("a", "b"), etcd=etcd.endpoint,
                           args=("--replication-poll-wait", "2s",
                                 "--etcd-lease-ttl", "2")) as cluster:
        assert (await write(http, cluster["a"].url, "m", b"1\n",
                            min_sync_replicas="1")).status == 200
        await cluster["b"].kill()  # no graceful leave: only the lease expiry tells
        await wait_for(lambda: _lacks(cluster, "a", "b"), what="b's lease to expire")
        # No live peer left: min_sync_replicas=1 is refused at once, with the reason.
        async with http.post(f"{cluster['a'].url}/write", params={
                "category": "m", "min_sync_replicas": "1"}, data=b"2\n") as r:
            assert r.status == 500
            assert "only 0 other node(s) are live" in await r.text()

        await cluster["b"].start()
        await cluster.wait_connected()
        assert (await write(http, cluster["a"].url, "m", b"3\n",
                            min_sync_replicas="1")).status == 200
        # b restarted with its data: it holds everything a has, each message once.
        assert Counter(await read_all(http, cluster["b"].url, "m")) == Counter(
            [b"1", b"2", b"3"])


async def test_a_node_restarted_while_etcd_is_down_uses_the_last_known_peers(
    tmp_path: Path, http: aiohttp.ClientSession, etcd: EtcdServer
) -> None:
    # Issue 11, point 6: it knew no peers and replicated nothing until etcd came back.
    async with run_cluster(tmp_path / "nodes", ("a", "b"), etcd=etcd.endpoint,
                           args=("--replication-poll-wait", "2s")) as cluster:
        await cluster.wait_connected()
        await etcd.stop()
        await cluster["a"].stop()
        await cluster["a"].start()
        # The node answers HTTP a moment before its cluster part has read the remembered peers
        # (the server starts first, the cluster after): with --workers 4 under load the first
        # /status came before. etcd stays down all along, so only the remembered peers count.
        async def a_knows_b() -> bool:
            status = await cluster.status("a")
            assert status["coordinator_connected"] is False
            return {p["instance"] for p in status["peers"]} == {"b"}

        await wait_for(a_knows_b, what="a to start with its last known peer b")
        # Both directions work without etcd: a downloads b's writes, and b's progress reports
        # count for a's min_sync_replicas writes (b is a known peer).
        assert (await write(http, cluster["b"].url, "orders", b"from-b\n")).status == 200

        async def a_has_it() -> bool:
            return chunks_of(await list_chunks(http, cluster["a"].url, "orders")).get(
                "b-chunk000000000") == len(b"from-b\n")

        await wait_for(a_has_it, what="a to replicate b's chunk with etcd down")
        assert (await write(http, cluster["a"].url, "orders", b"from-a\n",
                            min_sync_replicas="1")).status == 200
