"""A second instance of an app run without etcd is detected through the bus (heartbeats in
``<app>.instances``, :mod:`chukcha.processors.presence`) and refused with a clear error and
exit code 1, whatever its state directory; a restart of the same state directory after SIGKILL
is not refused; a running instance that sees another's fresh heartbeat stops (exit code 1);
the two indexes of a static split both run, the same index twice does not."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from chukcha import Client
from chukcha.processors.presence import Heartbeat, instances_category
from chukcha.testing import run_cluster
from tests.integration.test_processor_sigkill import Processor

pytestmark = [pytest.mark.timeout(120), pytest.mark.allow_blocking]  # subprocess orchestration

PLAIN = "tests.processors.sigkill_app:app"  # app "billing", 1 partition
SPLIT = "tests.processors.sigkill_app:partitioned"  # app "billing", 8 partitions


async def refused(p: Processor) -> str:
    """Wait (bounded) for ``p`` to exit with code 1; its log."""
    assert p.proc is not None
    async with asyncio.timeout(60):
        code = await p.proc.wait()
    log = p.log.read_text()
    assert code == 1, log[-3000:]
    assert p.instances_up == 0 or "stopping: another instance" in log, log[-3000:]
    return log


async def test_a_second_instance_is_refused_and_a_killed_one_restarts(tmp_path: Path) -> None:
    async with run_cluster(tmp_path / "cluster", ("a",)) as cluster:
        first = Processor(cluster, tmp_path / "s1", tmp_path / "first.log", PLAIN)
        await first.start()
        await first.wait_ready()
        assert first.proc is not None
        pid = first.proc.pid

        second = Processor(cluster, tmp_path / "s2", tmp_path / "second.log", PLAIN)
        await second.start()
        log = await refused(second)
        assert second.instances_up == 0  # never got to processing
        assert "another instance is running" in log
        assert f"pid {pid}" in log and str((tmp_path / "s1").resolve()) in log
        assert "--instance-index" in log and "--etcd" in log
        assert first.proc.returncode is None  # the first one is left alone

        # SIGKILL: its last heartbeat is fresh, but the same state directory is itself.
        assert await first.kill() == -9
        await first.start()
        await first.wait_ready()
        assert await first.terminate() == 0

        # A clean stop says so: another state directory may take over at once.
        await second.start()
        await second.wait_ready()
        assert await second.terminate() == 0


async def test_a_running_instance_stops_on_another_fresh_heartbeat(tmp_path: Path) -> None:
    async with run_cluster(tmp_path / "cluster", ("a",)) as cluster, \
            Client(cluster.urls) as client:
        p = Processor(cluster, tmp_path / "s", tmp_path / "p.log", PLAIN)
        await p.start()
        await p.wait_ready()
        other = Heartbeat("another-run", socket.gethostname(), 4242, "/elsewhere/state", 0, 1,
                          time.time())
        await client.send(instances_category("billing"), [other.encode()])
        log = await refused(p)
        assert "pid 4242" in log and "/elsewhere/state" in log


async def test_split_indexes_run_side_by_side_but_one_index_twice_is_refused(
    tmp_path: Path,
) -> None:
    async with run_cluster(tmp_path / "cluster", ("a",)) as cluster:
        procs = []
        for i in range(2):
            p = Processor(cluster, tmp_path / f"s{i}", tmp_path / f"p{i}.log", SPLIT)
            p.cmd += ["--instance-index", str(i), "--instances", "2"]
            procs.append(p)
            await p.start()
        for p in procs:
            await p.wait_ready()

        again = Processor(cluster, tmp_path / "again", tmp_path / "again.log", SPLIT)
        again.cmd += ["--instance-index", "1", "--instances", "2"]
        await again.start()
        log = await refused(again)
        assert "instance 1 of 2" in log

        unsplit = Processor(cluster, tmp_path / "unsplit", tmp_path / "unsplit.log", SPLIT)
        await unsplit.start()
        await refused(unsplit)  # all partitions: overlaps both

        for p in procs:
            assert p.proc is not None and p.proc.returncode is None
            assert await p.terminate() == 0
