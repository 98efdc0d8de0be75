"""An instance through etcd and one without (plain ``chukcha run``) of the same app on the same
bus detect each other through the heartbeats in ``<app>.instances`` and the one that comes
second is refused with a clear error and exit code 1 (either way round); the one running is
left alone; a running instance through etcd that sees a plain one's heartbeat stops. Instances
through etcd of one cluster do not refuse each other; two groups with the same ``--cluster``
name on two different etcd clusters (two real etcd servers) do: the heartbeats carry the etcd
cluster's ID."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chukcha import Client
from chukcha.bus.app_coordination import etcd_cluster_id
from chukcha.processors.presence import Heartbeat, instances_category
from chukcha.testing import EtcdServer, run_cluster, run_etcd
from tests.integration.test_duplicate_instance import refused
from tests.integration.test_processor_sigkill import Processor

pytestmark = [pytest.mark.timeout(180), pytest.mark.allow_blocking]  # subprocess orchestration

TARGET = "tests.processors.changelog_app:app"  # app "billing", 4 partitions, changelog on


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


@pytest.fixture
async def other_etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    (tmp_path / "other").mkdir()
    async with run_etcd(tmp_path / "other") as server:
        yield server


async def test_one_cluster_name_on_two_etcd_clusters_is_refused(
    tmp_path: Path, etcd: EtcdServer, other_etcd: EtcdServer
) -> None:
    first_id = await etcd_cluster_id((etcd.endpoint,))
    second_id = await etcd_cluster_id((other_etcd.endpoint,))
    assert first_id != second_id  # two etcd clusters, not two members of one
    async with run_cluster(tmp_path / "cluster", ("a", "b"), etcd=etcd.endpoint) as cluster, \
            Client(cluster.urls) as client:
        await client.create_partitions("orders", 4)

        def through(server: EtcdServer, name: str) -> Processor:
            p = Processor(cluster, tmp_path / f"state-{name}", tmp_path / f"{name}.log", TARGET)
            p.cmd += ["--etcd", server.endpoint, "--cluster", "test", "--instance", name,
                      "--lease-ttl", "2"]
            return p

        x = through(etcd, "x")
        await x.start()
        await x.wait_ready()
        y = through(other_etcd, "y")  # the same --cluster name, another etcd cluster
        await y.start()
        log = await refused(y)
        assert y.instances_up == 0  # never got to processing
        assert "another instance is running" in log
        assert f"etcd cluster id {first_id}" in log and second_id in log, log[-3000:]
        assert "one etcd cluster" in log
        assert x.proc is not None and x.proc.returncode is None  # left alone
        # Another instance on x's etcd cluster is not refused.
        x2 = through(etcd, "x2")
        await x2.start()
        await x2.wait_ready()
        for p in (x, x2):
            assert p.proc is not None and p.proc.returncode is None
            assert await p.terminate() == 0


async def test_an_etcd_instance_and_a_plain_one_refuse_each_other(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    async with run_cluster(tmp_path / "cluster", ("a", "b"), etcd=etcd.endpoint) as cluster, \
            Client(cluster.urls) as client:
        await client.create_partitions("orders", 4)

        def through_etcd(name: str) -> Processor:
            p = Processor(cluster, tmp_path / f"state-{name}", tmp_path / f"{name}.log", TARGET)
            p.cmd += ["--etcd", etcd.endpoint, "--cluster", "test", "--instance", name,
                      "--lease-ttl", "2"]
            return p

        x, x2 = through_etcd("x"), through_etcd("x2")
        for p in (x, x2):  # one cluster: they coordinate through etcd, no refusal
            await p.start()
        for p in (x, x2):
            await p.wait_ready()

        plain = Processor(cluster, tmp_path / "state-plain", tmp_path / "plain.log", TARGET)
        await plain.start()
        log = await refused(plain)
        assert plain.instances_up == 0  # never got to processing
        assert "another instance is running" in log
        assert "through etcd (cluster test, etcd cluster id" in log
        assert "--etcd" in log
        for p in (x, x2):
            assert p.proc is not None and p.proc.returncode is None  # left alone
            assert await p.terminate() == 0

        # The other way round: a plain instance runs, one through etcd is refused.
        await plain.start()
        await plain.wait_ready()
        y = through_etcd("y")
        await y.start()
        log = await refused(y)
        assert y.instances_up == 0
        assert "another instance is running" in log and "without etcd" in log
        assert plain.proc is not None and plain.proc.returncode is None
        assert await plain.terminate() == 0


async def test_a_running_etcd_instance_stops_on_a_plain_ones_heartbeat(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    async with run_cluster(tmp_path / "cluster", ("a", "b"), etcd=etcd.endpoint) as cluster, \
            Client(cluster.urls) as client:
        await client.create_partitions("orders", 4)
        x = Processor(cluster, tmp_path / "state-x", tmp_path / "x.log", TARGET)
        x.cmd += ["--etcd", etcd.endpoint, "--cluster", "test", "--instance", "x",
                  "--lease-ttl", "2"]
        await x.start()
        await x.wait_ready()
        plain = Heartbeat("a-plain-run", "elsewhere", 4343, "/plain/state", 0, 1, time.time())
        await client.send(instances_category("billing"), [plain.encode()])
        log = await refused(x)  # stops before its next batch, exit code 1
        assert "pid 4343" in log and "without etcd" in log
