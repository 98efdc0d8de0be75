"""The node's web monitor in a real headless browser, on a live two-node cluster."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from chukcha.client import Client
from tests.bus.test_auth import two_nodes
from tests.integration.cluster_helpers import wait_for
from tests.webdriver import browser, browser_missing

pytestmark = [pytest.mark.timeout(120), pytest.mark.allow_blocking]


async def test_the_node_monitor_shows_a_live_cluster(tmp_path: Path) -> None:
    if (why := browser_missing()) is not None:
        pytest.fail(why)
    async with two_nodes(tmp_path) as (a, b), Client([a.url, b.url]) as client:
        await client.register_group("orders", "billing")
        await client.send_to(a.url, "orders", [{"id": f"o{i}", "n": i} for i in range(50)])

        async def replicated() -> bool:
            return sum(c.size for c in b.store.list_chunks("orders")) == sum(
                c.size for c in a.store.list_chunks("orders"))

        await wait_for(replicated, timeout=30, what="b to hold a's orders")
        async with aiohttp.ClientSession() as http, http.get(f"{b.url}/ui/data") as resp:
            data = await resp.json()
        assert [p["instance"] for p in data["peers"]] == ["a"]

        async with browser() as page:
            await page.open(f"{b.url}/ui")
            assert await page.text("#instance") == "b"
            peers = await page.text("#peers")
            assert "a" in peers and "up" in peers
            categories = await page.text("#categories")
            assert "orders" in categories
            total = sum(c.size for c in b.store.list_chunks("orders"))
            assert str(total) in categories
            groups = await page.text("#groups")
            assert "billing" in groups and str(total) in groups
            # The page refreshes itself: a new category shows up without a reload.
            await client.send_to(b.url, "payments", [{"id": "p1"}])

            async def refreshed() -> bool:
                return "payments" in await page.text("#categories")

            await wait_for(refreshed, timeout=20, what="the page to refresh")
