"""A running app's ``/metrics`` and its progress log, against a real node."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest

from chukcha import Client
from chukcha.processors import runner as runner_module
from chukcha.processors.runner import Runner
from chukcha.testing import run_node
from tests.bus.test_metrics import Samples, scrape, value
from tests.integration.cluster_helpers import wait_for
from tests.processors.poison_app import build


async def test_app_metrics_match_the_work_done(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner_module, "PROGRESS_INTERVAL", 0.0)  # a progress line per batch
    async with run_node(tmp_path / "d") as node, Client([node.url]) as client, \
            aiohttp.ClientSession() as http:
        orders = [{"id": f"o{i}", "customer": f"c{i % 2}", "amount": i} for i in range(10)]
        await client.send("orders", orders)
        await client.send("orders", orders[:3])  # duplicates: same IDs
        await client.send("orders", [{"id": "bad", "customer": "x", "amount": 1,
                                      "poison": True}])
        app = build("dead_letter", nodes=(node.url,), state_dir=str(tmp_path / "state"))
        runner = Runner(app, http="127.0.0.1:0")
        stop = asyncio.Event()
        with caplog.at_level(logging.INFO, logger="chukcha.processors.runner"):
            task = asyncio.create_task(runner.run(stop))
            try:
                async def started() -> bool:
                    return runner.monitor is not None and bool(runner.monitor.address)

                await wait_for(started, timeout=20, what="the app's HTTP port")
                assert runner.monitor is not None
                url = f"http://{runner.monitor.address}"
                m: Samples = {}

                async def done() -> bool:
                    nonlocal m
                    m = await scrape(http, url)
                    labels = {"app": "shop", "partition": "0"}
                    return (value(m, "chukcha_app_events_dead_lettered_total", **labels) == 1
                            and value(m, "chukcha_app_lag_bytes", app="shop",
                                      category="orders") == 0
                            and value(m, "chukcha_app_outbox_entries", **labels) == 0
                            # committed: the dedup index holds every ID (10 + the dead letter)
                            and value(m, "chukcha_app_dedup_ids", **labels) == 11)

                await wait_for(done, timeout=30, what="the app to process everything")
                labels = {"app": "shop", "partition": "0"}
                assert value(m, "chukcha_app_events_applied_total", **labels) == 10
                assert value(m, "chukcha_app_events_duplicate_total", **labels) == 3
                commits = value(m, "chukcha_app_commits_total", **labels)
                assert commits >= 1
                assert value(m, "chukcha_app_commit_duration_seconds_count", app="shop") == (
                    commits)
                assert value(m, "chukcha_app_partitions_owned", app="shop") == 1

                async def caught_up() -> bool:
                    return "app=shop category=orders caught up" in caplog.text

                await wait_for(caught_up, timeout=20, what="the caught-up line")
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
        assert "app=shop progress applied=" in caplog.text
        assert "app=shop category=orders caught up: applied=10 duplicates=3" in caplog.text
        assert "lag_bytes=orders:0" in caplog.text


async def test_app_metrics_count_changelog_records(tmp_path: Path) -> None:
    async with run_node(tmp_path / "d") as node, Client([node.url]) as client, \
            aiohttp.ClientSession() as http:
        await client.send("orders", [{"id": f"o{i}", "customer": "c", "amount": i}
                                     for i in range(5)])
        runner = Runner(build(nodes=(node.url,), state_dir=str(tmp_path / "s"),
                              changelog=True), http="127.0.0.1:0")
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        try:
            labels = {"app": "shop", "partition": "0"}

            async def published() -> bool:
                if runner.monitor is None or not runner.monitor.address:
                    return False
                m = await scrape(http, f"http://{runner.monitor.address}")
                return (value(m, "chukcha_app_events_applied_total", **labels) == 5
                        and value(m, "chukcha_app_changelog_published_total", **labels) >= 1
                        and value(m, "chukcha_app_changelog_unpublished", **labels) == 0)

            await wait_for(published, timeout=30, what="the changelog to be published")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
