"""A takeover or a restore reads the changelog from enough of the app's nodes to see every
confirmed record (``changelog_min_sync_replicas=0``: all of them): with the node that holds the
last owner's last records stopped (SIGSTOP of a real node process), a new owner's catch-up and
an empty store's restore wait, retrying, instead of going on from an older head; once the node
answers again they go on with every record."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chukcha import App, Client
from chukcha.processors.busio import BusIO
from chukcha.processors.changelog import Changelog, changelog_category
from chukcha.processors.follower import Follower, local_copy
from chukcha.state.leveldb import LevelDBStore
from chukcha.testing import NodeProcess, run_node, spawn_node
from tests.integration.cluster_helpers import wait_for
from tests.processors.test_follower import APP, Owner, items

pytestmark = pytest.mark.allow_blocking  # the stores are opened and read inline


def bus_of(client: Client) -> BusIO:
    return BusIO(App(APP, nodes=client.nodes), client, {})


@pytest.fixture
async def two_nodes(tmp_path: Path) -> AsyncIterator[tuple[str, NodeProcess]]:
    """Two standalone nodes (nothing replicates between them): one in this process, one a
    subprocess that the test can stop."""
    async with run_node(tmp_path / "a") as a, spawn_node(tmp_path / "b", "b") as b:
        try:
            yield a.url, b
        finally:
            if b.proc is not None and b.proc.returncode is None:
                b.proc.send_signal(signal.SIGCONT)


async def test_a_takeover_and_a_restore_wait_for_the_node_with_the_last_records(
        tmp_path: Path, two_nodes: tuple[str, NodeProcess],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "chukcha.processors")
    a_url, b = two_nodes
    assert b.proc is not None
    owner_store = LevelDBStore(tmp_path / "owner")
    standby_store = LevelDBStore(tmp_path / "standby")
    empty_store = LevelDBStore(tmp_path / "empty")
    async with Client([a_url]) as on_a, Client([b.url]) as on_b, \
            Client([a_url, b.url], timeout=1.0) as on_both:
        first = Owner(owner_store, bus_of(on_a), epoch=5)
        for i in range(10):
            first.commit({f"t/k{i}".encode(): b"1"})
        await first.publish()  # records 1-10 on node a only
        standby = Follower(changelog_category(APP, 0), 0, standby_store, bus_of(on_both))
        assert await standby.catch_up() == 10
        later = Owner(owner_store, bus_of(on_b), epoch=5)
        for i in range(5):
            later.commit({f"t/k{i}".encode(): b"2"}, (b"t/k9",))
        await later.publish()  # records 11-15 (acked input behind them) on node b only

        b.proc.send_signal(signal.SIGSTOP)
        takeover = asyncio.create_task(standby.catch_up())
        restore = asyncio.create_task(
            Changelog(APP, 0, bus_of(on_both)).restore_if_empty(empty_store))

        async def both_wait() -> bool:
            said = [r.getMessage() for r in caplog.records if "waits for nodes" in r.getMessage()]
            takeover_waits = any("taking over" in m and b.url in m for m in said)
            restore_waits = any("restore of partition 0" in m and b.url in m for m in said)
            assert not takeover.done() and not restore.done(), \
                "went on without the node that holds the last records"
            return takeover_waits and restore_waits

        await wait_for(both_wait, timeout=30, what="the takeover and the restore to wait")
        assert b.url in standby.missing and a_url not in standby.missing
        assert standby.head[:2] == (5, 10)  # nothing applied from an incomplete read
        assert local_copy(empty_store).empty

        b.proc.send_signal(signal.SIGCONT)
        async with asyncio.timeout(60):
            assert await takeover == 5
            await restore
        assert standby.head[:2] == (5, 15)
        assert standby.rebuilds == 0 and not standby.missing
        assert items(standby_store) == items(owner_store)
        assert items(empty_store) == items(owner_store)
        assert local_copy(empty_store).head == standby.head


async def test_with_min_sync_replicas_a_missing_node_is_not_waited_for(
        tmp_path: Path, two_nodes: tuple[str, NodeProcess]) -> None:
    """Records confirmed by ``min_sync_replicas=1`` are on two nodes: of two, one answering
    is enough (here the records are on node a, the one that answers)."""
    a_url, b = two_nodes
    assert b.proc is not None
    owner_store = LevelDBStore(tmp_path / "owner")
    async with Client([a_url]) as on_a, Client([a_url, b.url], timeout=1.0) as on_both:
        owner = Owner(owner_store, bus_of(on_a), epoch=3)
        for i in range(4):
            owner.commit({f"t/k{i}".encode(): b"1"})
        await owner.publish()
        b.proc.send_signal(signal.SIGSTOP)
        follower = Follower(changelog_category(APP, 0), 0, LevelDBStore(tmp_path / "f"),
                            bus_of(on_both), min_sync_replicas=1)
        restored = LevelDBStore(tmp_path / "r")
        async with asyncio.timeout(30):
            assert await follower.catch_up() == 4
            await Changelog(APP, 0, bus_of(on_both), min_sync_replicas=1).restore_if_empty(
                restored)
        assert b.url in follower.missing
        assert items(restored) == items(owner_store)
        b.proc.send_signal(signal.SIGCONT)
