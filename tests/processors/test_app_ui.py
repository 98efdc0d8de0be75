"""An app's web monitor in a real headless browser: its counters and the query box."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from chukcha import Client
from chukcha.processors.runner import Runner
from chukcha.testing import run_node
from tests.integration.cluster_helpers import wait_for
from tests.processors.poison_app import build
from tests.webdriver import browser, browser_missing

pytestmark = [pytest.mark.timeout(120), pytest.mark.allow_blocking]


async def test_the_app_monitor_shows_counters_and_answers_a_query(tmp_path: Path) -> None:
    if (why := browser_missing()) is not None:
        pytest.fail(why)
    async with run_node(tmp_path / "d") as node, Client([node.url]) as client:
        await client.send("orders", [{"id": "o1", "customer": "ann", "amount": 5},
                                     {"id": "o2", "customer": "ann", "amount": 7},
                                     {"id": "o3", "customer": "bob", "amount": 1}])
        runner = Runner(build(nodes=(node.url,), state_dir=str(tmp_path / "s")),
                        http="127.0.0.1:0")
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        try:
            async def ready() -> bool:
                if runner.monitor is None or not runner.monitor.address:
                    return False
                found, value = await runner.monitor.lookup("bob")
                return found and value == 1

            await wait_for(ready, timeout=30, what="the app to process the orders")
            assert runner.monitor is not None
            url = f"http://{runner.monitor.address}"
            async with aiohttp.ClientSession() as http, \
                    http.get(f"{url}/ui/query", params={"key": "ann"}) as resp:
                assert await resp.json() == {"key": "ann", "found": True, "value": 12}
            async with browser() as page:
                await page.open(f"{url}/ui")
                assert "3" in await page.text("#partitions")  # applied
                assert "orders" in await page.text("#lag")
                await page.type("#key", "ann")
                await page.click("#lookup")

                async def answered() -> bool:
                    return await page.text("#result") == "12"

                await wait_for(answered, timeout=10, what="the query's answer")
                await page.script('document.getElementById("key").value = ""')
                await page.type("#key", "nobody")
                await page.click("#lookup")

                async def missing() -> bool:
                    return await page.text("#result") == "not found"

                await wait_for(missing, timeout=10, what="the 'not found' answer")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
