"""An error inside the partition listener (a restore that finds no node answering, a commit that
fails while handing over) must not kill the instance's etcd session silently: the partition is
released and taken again with a backoff (the reason logged) until the cause goes away, shown
by ``chukcha app status`` meanwhile, and a hand-over that fails still releases the claim, so
the partition moves on. Real etcd, the
instances in this process (the listener is what the test controls)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from chukcha.assignment import affinity
from chukcha.bus.app_coordination import AppInstances, read_app
from chukcha.errors import ClientError
from chukcha.testing import EtcdServer, run_etcd, run_node
from tests.integration.cluster_helpers import wait_for
from tests.integration.test_app_instances import chukcha_cli

# grpc joins a thread when the test's last etcd channel closes.
pytestmark = [pytest.mark.allow_blocking, pytest.mark.timeout(90)]

CLUSTER, APP = "test", "listener"


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


class Scripted:
    """A listener whose ``assigned``/``revoking`` fail the first ``fail_*`` times."""

    def __init__(self, *, fail_assigned: int = 0, fail_revoking: int = 0) -> None:
        self.fail_assigned = fail_assigned
        self.fail_revoking = fail_revoking
        self.assigned_epochs: list[tuple[int, int]] = []
        self.revoked: list[int] = []
        self.lost_parts: list[int] = []

    async def assigned(self, partition: int, epoch: int) -> None:
        self.assigned_epochs.append((partition, epoch))
        if self.fail_assigned:
            self.fail_assigned -= 1
            raise ClientError(f"no node answered reading '{APP}.changelog.p{partition:04d}'")

    async def revoking(self, partition: int) -> None:
        self.revoked.append(partition)
        if self.fail_revoking:
            self.fail_revoking -= 1
            raise ClientError("committing failed: no node answered")

    async def lost(self, partition: int) -> None:
        self.lost_parts.append(partition)

    async def follow(self, partitions: frozenset[int]) -> None:
        return


async def test_a_failed_assigned_releases_the_claim_and_is_retried(
        etcd: EtcdServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chukcha.bus")
    listener = Scripted(fail_assigned=2)
    inst = AppInstances((etcd.endpoint,), CLUSTER, APP, "i1", 1, listener=listener,
                        lease_ttl=2)
    failed = asyncio.ensure_future(inst.wait_failed())
    await inst.start()
    try:
        async def owned() -> bool:
            return 0 in inst.owned()

        await wait_for(owned, 30, "partition 0 taken after the listener's errors")
        assert not failed.done(), "a listener error that goes away must not fail the instance"
        epochs = [e for _, e in listener.assigned_epochs]
        assert len(epochs) == 3, listener.assigned_epochs
        # Each try is a new claim (released after the failure): a new, larger epoch.
        assert epochs == sorted(set(epochs)), epochs
        assert inst.owned() == {0: epochs[-1]}
        view = await read_app((etcd.endpoint,), CLUSTER, APP)
        assert view.claims[0].epoch == epochs[-1]
        # The listener cleaned up after each failure, and the log says why.
        assert listener.lost_parts == [0, 0]
        assert "no node answered reading 'listener.changelog.p0000'" in caplog.text
        assert "retrying in" in caplog.text
    finally:
        failed.cancel()
        await inst.stop()


async def test_a_failed_hand_over_still_releases_the_partition(etcd: EtcdServer) -> None:
    first_listener = Scripted(fail_revoking=1)
    first = AppInstances((etcd.endpoint,), CLUSTER, APP, "a", 2, listener=first_listener,
                         lease_ttl=2)
    second_listener = Scripted()
    second = AppInstances((etcd.endpoint,), CLUSTER, APP, "b", 2, listener=second_listener,
                          lease_ttl=2)
    await first.start()
    try:
        async def first_owns_both() -> bool:
            return set(first.owned()) == {0, 1}

        await wait_for(first_owns_both, 30, "the first instance owning both partitions")
        await second.start()

        async def balanced() -> bool:
            return len(first.owned()) == 1 and len(second.owned()) == 1

        await wait_for(balanced, 30, "one partition moved to the second instance")
        moved = next(iter(second.owned()))
        assert first_listener.revoked == [moved]  # failed, yet released
        assert first_listener.lost_parts == [moved]  # and cleaned up
        assert first._task is not None and not first._task.done()  # the session lives on
    finally:
        await second.stop()
        await first.stop()


async def test_stop_releases_every_partition_when_a_hand_over_fails(etcd: EtcdServer) -> None:
    listener = Scripted(fail_revoking=1)
    inst = AppInstances((etcd.endpoint,), CLUSTER, APP, "a", 3, listener=listener,
                        lease_ttl=30)
    await inst.start()

    async def owns_all() -> bool:
        return set(inst.owned()) == {0, 1, 2}

    await wait_for(owns_all, 30, "the instance owning every partition")
    await inst.stop()
    assert listener.revoked == [0, 1, 2]  # the first failed, the others still went on
    assert inst.owned() == {}
    view = await read_app((etcd.endpoint,), CLUSTER, APP)
    assert view.claims == {} and view.members == {}  # the lease was revoked (ttl 30 s)


async def test_a_partition_that_keeps_failing_is_retried_with_backoff_until_stop(
        etcd: EtcdServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chukcha.bus")
    listener = Scripted(fail_assigned=1_000)
    inst = AppInstances((etcd.endpoint,), CLUSTER, APP, "i1", 1, listener=listener,
                        lease_ttl=30)
    await inst.start()
    try:
        async def failed_thrice() -> bool:
            return len(listener.assigned_epochs) >= 3

        await wait_for(failed_thrice, 30, "three tries to start partition 0")
        assert inst.owned() == {}  # never reported as owned while it cannot start
        assert "failure 2 in a row" in caplog.text and "retrying in 1.0 s" in caplog.text
        assert inst._task is not None and not inst._task.done()
    finally:
        await inst.stop()
    # Nothing pending after stop (the retry's wake-up is cancelled), nothing left in etcd.
    assert not inst._wakeups._handles
    view = await read_app((etcd.endpoint,), CLUSTER, APP)
    assert view.claims == {} and view.members == {}


async def test_a_partition_that_keeps_failing_is_shown_by_app_status_until_it_starts(
        tmp_path: Path, etcd: EtcdServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chukcha.bus")
    listener = Scripted(fail_assigned=1_000)
    inst = AppInstances((etcd.endpoint,), CLUSTER, APP, "i1", 2, listener=listener,
                        lease_ttl=30)
    await inst.start()
    try:
        async with run_node(tmp_path / "data") as node:
            status = ("app", "status", APP, "--etcd", etcd.endpoint, "--cluster", CLUSTER,
                      "--node", node.url)

            async def failed_thrice() -> bool:
                tries = [p for p, _ in listener.assigned_epochs]
                return tries.count(0) >= 3 and tries.count(1) >= 3

            await wait_for(failed_thrice, 30, "three tries to start each partition")
            failing: dict[str, Any] = {}

            async def shown() -> bool:
                nonlocal failing
                code, out = await chukcha_cli(*status, "--json")
                assert code == 0, out
                failing = orjson.loads(out).get("failing", {})
                return set(failing) == {"0", "1"} and all(
                    f[0]["failures"] >= 3 for f in failing.values())

            await wait_for(shown, 30, "app status to show both partitions failing")
            (f0,) = failing["0"]
            assert f0["instance"] == "i1"
            assert f0["error"] == (
                "ClientError: no node answered reading 'listener.changelog.p0000'")
            assert isinstance(f0["since"], float)
            code, text = await chukcha_cli(*status)
            assert code == 0, text
            assert "partition 0 cannot start on i1" in text, text
            assert "no node answered reading 'listener.changelog.p0000'" in text
            # The log says what to do, not only what failed.
            assert "failure 3 in a row" in caplog.text
            assert "stays unprocessed" in caplog.text and "app status" in caplog.text

            listener.fail_assigned = 0  # the cause goes away: both start, nothing shown

            async def both_owned() -> bool:
                return set(inst.owned()) == {0, 1}

            await wait_for(both_owned, 60, "both partitions started")

            async def cleared() -> bool:
                code, out = await chukcha_cli(*status, "--json")
                return code == 0 and not orjson.loads(out).get("failing")

            await wait_for(cleared, 30, "app status to show no failing partition")
            code, text = await chukcha_cli(*status)
            assert "cannot start" not in text
    finally:
        await inst.stop()


async def test_a_failing_partition_the_assignment_moves_is_no_longer_retried_or_shown(
        etcd: EtcdServer) -> None:
    # Two names, the second preferred for partition 0 (rendezvous hash) when nobody holds it:
    # between two tries the failing partition is free, so it moves to the joining instance.
    first, second = sorted(("a", "b"), key=lambda m: affinity(m, 0))
    failing = Scripted(fail_assigned=1_000)
    one = AppInstances((etcd.endpoint,), CLUSTER, APP, first, 1, listener=failing,
                       lease_ttl=30)
    two = AppInstances((etcd.endpoint,), CLUSTER, APP, second, 1, listener=Scripted(),
                       lease_ttl=30)
    await one.start()
    try:
        async def shown() -> bool:
            view = await read_app((etcd.endpoint,), CLUSTER, APP)
            return first in view.failing.get(0, {})

        await wait_for(shown, 30, "the failing partition recorded in etcd")
        await two.start()

        async def moved() -> bool:
            view = await read_app((etcd.endpoint,), CLUSTER, APP)
            return 0 in two.owned() and not view.failing

        await wait_for(moved, 30, "the partition started on the other instance, not shown")
        tries = len(failing.assigned_epochs)

        async def quiet() -> bool:  # no further try on the first instance
            return not one._wakeups._handles

        await wait_for(quiet, 10, "the first instance's retry cancelled")
        assert len(failing.assigned_epochs) == tries
    finally:
        await two.stop()
        await one.stop()
