"""Stopping every partition when the lease cannot be proven must not wait on a partition's own
proof of ownership (real etcd, one :class:`AppInstances` in this process).

The runner commits every partition under one lock, and a commit proves the ownership
(:meth:`AppInstances.prove`) before it publishes, under that lock. Seen in a SIGSTOP/SIGCONT
run: the resumed instance stopped partition 0 first (``lost(0)`` waits for the lock) while
partition 2's commit held the lock waiting for a proof; that proof could only come from a
renewal (the keep-alive waited for the same stop to finish before joining again) or from
partition 2's own stop (after partition 0's): nothing moved for good. Here the same
interleaving, with etcd stopped so that no renewal can end it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chukcha.bus.app_coordination import AppInstances
from chukcha.testing import EtcdServer, run_etcd
from tests.integration.cluster_helpers import wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.allow_blocking]


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


class _Runner:
    """A listener shaped like :class:`chukcha.processors.group.GroupMode`: one lock for every
    partition's commit; ``lost`` sets the partition's stop, then takes the lock to close it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.stops: dict[int, asyncio.Event] = {}
        self.assigned_: set[int] = set()
        self.lost_started: set[int] = set()
        self.lost_done: set[int] = set()
        self.first_lost = asyncio.Event()

    async def assigned(self, partition: int, epoch: int) -> None:
        self.stops[partition] = asyncio.Event()
        self.assigned_.add(partition)

    async def revoking(self, partition: int) -> None:
        await self.lost(partition)

    async def lost(self, partition: int) -> None:
        self.lost_started.add(partition)
        self.first_lost.set()
        stop = self.stops.pop(partition, None)
        if stop is not None:
            stop.set()
        async with self.lock:
            self.lost_done.add(partition)

    async def follow(self, partitions: frozenset[int]) -> None:
        return


async def test_losing_every_partition_does_not_wait_for_a_commit_waiting_for_a_proof(
    etcd: EtcdServer,
) -> None:
    runner = _Runner()
    instances = AppInstances((etcd.endpoint,), "test", "billing", "y", 2, listener=runner,
                             lease_ttl=2)
    await instances.start()
    try:
        async def owns_both() -> bool:
            return set(instances.owned()) == {0, 1} and runner.assigned_ == {0, 1}

        await wait_for(owns_both, timeout=30, what="y to own both partitions")
        proved: list[bool] = []

        async def commit_of_partition_1() -> None:
            # A batch of partition 1 being committed under the runner's lock when the
            # partitions are stopped: it proves the ownership before publishing.
            async with runner.lock:
                await runner.first_lost.wait()
                proved.append(await instances.prove(runner.stops[1]))

        commit = asyncio.create_task(commit_of_partition_1())
        await etcd.stop()  # no renewal from now on: the lease cannot be proven

        async def all_stopped() -> bool:
            return runner.lost_done == {0, 1}

        try:
            await wait_for(all_stopped, timeout=20, what="both partitions to be stopped")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: lost started {sorted(runner.lost_started)}, done "
                                 f"{sorted(runner.lost_done)}, commit proved {proved}") from None
        await asyncio.wait_for(commit, 5)
        assert proved == [False]  # nothing of that batch leaves as the owner
        assert dict(instances.owned()) == {}
    finally:
        await etcd.start()
        await instances.stop()
