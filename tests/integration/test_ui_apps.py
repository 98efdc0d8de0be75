"""A node's web monitor shows the apps' partitions and their owners (from etcd)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from chukcha.testing import run_etcd, run_node
from tests.integration.test_app_instances import (
    APP,
    CLUSTER,
    PARTITIONS,
    Member,
    settled,
    wait_view,
)

pytestmark = [pytest.mark.timeout(180), pytest.mark.allow_blocking]


async def test_the_node_monitor_lists_app_partitions_and_owners(tmp_path: Path) -> None:
    async with run_etcd(tmp_path) as etcd:
        a, b = Member(tmp_path, etcd.endpoint, "a"), Member(tmp_path, etcd.endpoint, "b")
        try:
            await a.start()
            await b.start()
            view = await wait_view(etcd, settled({"a", "b"}), "a and b to share the partitions")
            async with run_node(tmp_path / "data", instance="n1",
                                etcd_endpoints=(etcd.endpoint,), cluster=CLUSTER) as node, \
                    aiohttp.ClientSession() as http:
                async with http.post(f"{node.url}/groups/register",
                                     params={"category": "orders", "group": APP}) as resp:
                    assert resp.status == 200, await resp.text()
                async with http.get(f"{node.url}/ui/data") as resp:
                    apps = (await resp.json())["apps"]
                assert apps[APP]["partitions"] == PARTITIONS
                assert apps[APP]["members"] == ["a", "b"]
                assert {int(p): c["owner"] for p, c in apps[APP]["claims"].items()} == {
                    p: c.owner for p, c in view.claims.items()}
                async with http.get(f"{node.url}/ui") as resp:
                    html = await resp.text()
                assert 'id="apps"' in html
                assert f"<td>{APP}</td>" in html and "<td>a</td>" in html and "<td>b</td>" in html
        finally:
            await a.kill()
            await b.kill()
