"""A view in an app run through etcd: ``billing`` runs as a plain ``chukcha run``; ``audit``
(a view of billing's table) runs as a real ``chukcha run --etcd`` instance that gets its
partitions from etcd after it started; its lookups see billing's committed totals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chukcha import Client
from chukcha.partitioning import partition_category, partition_of
from chukcha.testing import EtcdServer, run_cluster, run_etcd
from tests.integration.cluster_helpers import wait_for
from tests.integration.test_app_group_timers import read_all
from tests.integration.test_processor_sigkill import Processor

pytestmark = [pytest.mark.timeout(240), pytest.mark.allow_blocking]  # subprocess orchestration

CUSTOMERS = ["ann", "bob", "cy", "dee", "eve"]


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


async def test_a_view_in_an_app_through_etcd_answers_lookups(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    async with run_cluster(tmp_path / "cluster", ("a", "b"), etcd=etcd.endpoint) as cluster, \
            Client(cluster.urls) as client:
        await client.create_partitions("checks", 2)
        await client.create_partitions("orders", 4)
        billing = Processor(cluster, tmp_path / "billing", tmp_path / "billing.log",
                            "tests.processors.changelog_app:app")
        await billing.start()
        await billing.wait_ready()
        orders: list[dict[str, Any]] = [{"id": f"o{i}-{c}", "customer": c, "amount": 10 * i + k}
                  for i in range(1, 4) for k, c in enumerate(CUSTOMERS)]
        await client.send("orders", orders, key=lambda o: o["customer"])
        expected = {c: sum(o["amount"] for o in orders if o["customer"] == c)
                    for c in CUSTOMERS}

        async def billed() -> bool:
            return len(await read_all(client, "receipts")) == len(orders)

        await wait_for(billed, timeout=60, what="billing to commit every order")

        audit = Processor(cluster, tmp_path / "audit", tmp_path / "audit.log",
                          "tests.processors.changelog_app:audit")
        audit.cmd += ["--etcd", etcd.endpoint, "--cluster", "test", "--instance", "x",
                      "--lease-ttl", "2"]
        await audit.start()
        await audit.wait_ready()
        for c in CUSTOMERS:
            await client.send(partition_category("checks", partition_of(c, 2)),
                              [{"id": f"check-{c}", "customer": c}])

        async def audited() -> bool:
            return len(await read_all(client, "audits")) == len(CUSTOMERS)

        await wait_for(audited, timeout=60, what="audit to answer every check")
        got = {copies[0]["customer"]: copies[0]["spent"]
               for copies in (await read_all(client, "audits")).values()}
        assert got == expected
        for p in (audit, billing):
            assert await p.terminate() == 0
