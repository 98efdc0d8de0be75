"""A paused owner whose lease expired in the middle of a batch must not send that batch's
emits when it resumes: the partition runs elsewhere by then, and the same emit IDs would reach
the bus with other content (here: the sender's pid; in an app, another interleaving).

Instance y runs in this process and stops inside its first callback, the whole process with
it (the event loop too: no lease renewal, no expiry check), for longer than its lease; instance
x (a real ``chukcha run --etcd``) takes the partition over and processes the order; then y
resumes, commits its batch locally and finds its ownership unprovable."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from chukcha import Client
from chukcha.bus.app_coordination import read_app
from chukcha.processors.group import GroupConfig
from chukcha.processors.runner import Runner
from chukcha.testing import EtcdServer, run_cluster, run_etcd
from tests.integration import zombie_emit_app
from tests.integration.cluster_helpers import read_all, wait_for
from tests.integration.test_processor_sigkill import Processor

pytestmark = [pytest.mark.timeout(180), pytest.mark.allow_blocking]

CLUSTER, TTL = "test", 2


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


async def receipts(http: aiohttp.ClientSession, url: str) -> dict[str, set[int]]:
    """Every receipt on the bus: its ID -> the pids that sent it."""
    seen: dict[str, set[int]] = {}
    for line in await read_all(http, url, "receipts"):
        event = orjson.loads(line)
        seen.setdefault(event["id"], set()).add(event["by"])
    return seen


async def owner(etcd: EtcdServer) -> str | None:
    claim = (await read_app((etcd.endpoint,), CLUSTER, "zshop")).claims.get(0)
    return claim.owner if claim is not None else None


async def test_a_paused_owner_does_not_send_the_emits_of_its_batch(
    tmp_path: Path, etcd: EtcdServer, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    app = zombie_emit_app.app
    monkeypatch.setattr(app, "state_dir", tmp_path / "state-y")
    async with run_cluster(tmp_path / "cluster", ("a", "b"), etcd=etcd.endpoint) as cluster, \
            Client(cluster.urls) as client, aiohttp.ClientSession() as http:
        await client.create_partitions("orders", 1)
        monkeypatch.setattr(app, "nodes", tuple(cluster.urls))
        stop = asyncio.Event()
        y = asyncio.create_task(Runner(app, group=GroupConfig(
            (etcd.endpoint,), CLUSTER, instance="y", lease_ttl=TTL)).run(stop))
        x = Processor(cluster, tmp_path / "state-x", tmp_path / "x.log",
                      "tests.integration.zombie_emit_app:app")
        x.cmd += ["--etcd", etcd.endpoint, "--cluster", CLUSTER, "--instance", "x",
                  "--lease-ttl", str(TTL)]
        try:
            async def y_owns() -> bool:
                return await owner(etcd) == "y"

            await wait_for(y_owns, timeout=60, what="y to own the partition")
            await x.start()
            await x.wait_ready()
            assert await owner(etcd) == "y"  # sticky: x joined without taking it
            monkeypatch.setattr(zombie_emit_app, "PAUSE_FIRST", TTL * 3.0)
            await client.send("orders", [{"id": "o1"}], key=lambda e: e["id"])

            async def y_lost_it() -> bool:
                return "ownership lost" in caplog.text

            await wait_for(y_lost_it, timeout=90, what="the resumed y to stop the partition")
            assert x.proc is not None
            seen = await receipts(http, cluster.urls[0])
            assert seen == {"r-o1": {x.proc.pid}}, (seen, os.getpid())
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(y, 60)
            if x.proc is not None and x.proc.returncode is None:
                await x.terminate()
