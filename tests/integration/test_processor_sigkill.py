"""The exactly-once proof: a processor subprocess SIGKILLed at random moments while every event
is written to two different nodes of a real 3-node cluster (so every event arrives twice). Three
kills in four are aimed at a running instance (a random delay after it logs that it runs), the
rest at a random moment from the spawn (its start-up).

After the last restart: the state equals exactly the expected totals; every receipt (emit) is on
the bus at least once and, counted by ID, exactly once (copies of one ID are identical); every
complete chunk of ``orders`` has been acked for the processor's group.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from chukcha import Client
from chukcha.client import Batch
from chukcha.partitioning import partition_category, partition_of
from chukcha.processors.engine import read_state_table, read_table
from chukcha.state.partitions import open_partition_stores
from chukcha.testing import ClusterProcess, run_cluster
from tests.integration.cluster_helpers import list_chunks, wait_for

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.timeout(150), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
KILLS = 22
PER_ROUND = 300
CUSTOMERS = 17


class Processor:
    """``chukcha run tests.processors.sigkill_app:app`` as a subprocess.

    Its output is copied to ``log`` line by line; :meth:`wait_ready` returns once the instance
    logs that it runs (state opened and loaded, client up), so that a kill can be aimed at its
    work rather than at Python's start-up.
    """

    def __init__(self, cluster: ClusterProcess, state_dir: Path, log: Path,
                 target: str = "tests.processors.sigkill_app:app") -> None:
        self.cmd = [sys.executable, "-m", "chukcha", "run", target,
                    "--nodes", ",".join(cluster.urls), "--state-dir", str(state_dir),
                    "--log-level", "INFO"]
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self._ready = asyncio.Event()
        self._copy: asyncio.Task[None] | None = None
        self.instances_up = 0
        """How many instances got past start-up (logged ``running``)."""

    async def start(self) -> None:
        self._ready = asyncio.Event()
        self.proc = await asyncio.create_subprocess_exec(
            *self.cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        self._copy = asyncio.create_task(self._copy_output(self.proc.stdout, self._ready))

    async def _copy_output(self, out: asyncio.StreamReader, ready: asyncio.Event) -> None:
        with self.log.open("ab") as log:  # small appends: the test allows blocking I/O
            while line := await out.readline():
                log.write(line)
                log.flush()
                if not ready.is_set() and b" running categories=" in line:
                    self.instances_up += 1
                    ready.set()

    async def wait_ready(self) -> None:
        try:
            async with asyncio.timeout(30):
                await self._ready.wait()
        except TimeoutError:
            raise AssertionError(f"processor not up in 30 s:\n{self.log.read_text()[-3000:]}"
                                 ) from None

    async def _exited(self) -> int:
        assert self.proc is not None and self._copy is not None
        code = await self.proc.wait()
        await self._copy  # the pipe is at EOF once the process is gone
        return code

    async def kill(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return await self._exited()

    async def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            return await self._exited()


def order(i: int, rng: random.Random) -> dict[str, Any]:
    return {"id": f"o{i}", "customer": f"c{rng.randrange(CUSTOMERS)}",
            "amount": rng.randrange(1, 1000)}


async def audit_copy(client: Client, partitions: int) -> list[str]:
    """Register the group ``audit`` on the app's repartitioned copy of the orders (so its
    chunks stay after the app acked them); returns the copy's partition categories."""
    hop = [partition_category("billing.orders", i) for i in range(partitions)]
    for category in hop:
        await client.register_group(category, "audit")
    return hop


async def check_copy(client: Client, url: str, hop: list[str], want: set[str]) -> None:
    """The app's repartitioned copy (read through the ``audit`` group, which kept it) holds,
    counted by ID, exactly the orders ``want``, each in the partition of its customer."""
    if not hop:
        return
    copied: dict[str, int] = {}
    for p, category in enumerate(hop):
        consumer = client.consumer(category, group="audit", node=url, register=False)
        try:
            while batches := await consumer.read(timeout=2.0):
                for batch in batches:
                    for m in batch.messages():
                        event = orjson.loads(m)
                        assert partition_of(event["customer"], len(hop)) == p
                        copied[event["id"]] = copied.get(event["id"], 0) + 1
        finally:
            await consumer.stop()
    assert copied.keys() == want
    logger.info("repartitioned copy: %d orders, %d copies (resent after kills)",
                len(copied), sum(copied.values()))


async def read_receipts(
    client: Client, url: str, want: set[str], log: Path
) -> dict[str, list[Any]]:
    """Every receipt on ``url`` (no group, nothing acked) until all IDs in ``want`` are seen."""
    seen: dict[str, list[Any]] = {}

    def take(batches: list[Batch]) -> None:
        for batch in batches:
            for m in batch.messages():
                event = orjson.loads(m)
                seen.setdefault(event["id"], []).append(event)

    consumer = client.consumer("receipts", node=url)
    try:
        try:
            async with asyncio.timeout(60):
                while not want <= seen.keys():
                    take(await consumer.read())
        except TimeoutError:
            missing = sorted(want - seen.keys())
            tail = (await asyncio.to_thread(log.read_text))[-4000:]
            raise AssertionError(f"{len(missing)} receipts missing, e.g. {missing[:5]}; "
                                 f"processor log:\n{tail}") from None
        # Drain what is left (resent duplicates must be identical, extra IDs must not exist).
        while batches := await consumer.read(timeout=1.0):
            take(batches)
    finally:
        await consumer.stop()
    return seen


def table_of(state_dir: Path) -> dict[str, Any]:
    return read_state_table(state_dir)


@pytest.mark.allow_blocking  # subprocess orchestration (os.open of the log file, waits)
async def test_sigkill_at_random_moments_applies_every_event_exactly_once(
    tmp_path: Path,
) -> None:
    await kill_scenario(tmp_path, "tests.processors.sigkill_app:app", KILLS, seed=1123)


@pytest.mark.allow_blocking  # subprocess orchestration (os.open of the log file, waits)
async def test_sigkill_with_8_partitions_equals_one_partition(tmp_path: Path) -> None:
    """The same with ``partitions=8`` and ``key=customer``: the union of the 8 partitions'
    tables equals the totals of a single-partition run (the expected totals, which the test
    above proves a single partition reaches), each customer only in its hash's partition.

    The input is plain (written with the Go-style ``/write``), so the app repartitions it into
    ``billing.orders.p0000`` …: counted by ID, that copy holds every order and nothing else
    (checked through a second group, ``audit``, that keeps its chunks)."""
    await kill_scenario(tmp_path, "tests.processors.sigkill_app:partitioned", 12, seed=88,
                        hop_partitions=8)
    stores = await asyncio.to_thread(open_partition_stores, tmp_path / "state", None)
    try:
        assert len(stores) == 8
        tables = [await asyncio.to_thread(read_table, s) for s in stores]
    finally:
        for s in stores:
            s.close()
    assert all(partition_of(k, 8) == p for p, table in enumerate(tables) for k in table)
    assert sum(1 for t in tables if t) > 1


async def kill_scenario(  # noqa: PLR0915 - one scenario, read top to bottom
    tmp_path: Path, target: str, kills: int, *, seed: int,
    hop_partitions: int = 0,
) -> None:
    """Run ``target`` under ``kills`` SIGKILLs while orders go to two nodes each; then check
    the state, the receipts and the acks (see the module docstring); with ``hop_partitions``
    also the app's repartitioned copy of the orders."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible kill schedule
    args = ("--replication-poll-wait", "2s", "--max-chunk-size", "16384")
    async with run_cluster(tmp_path / "cluster", args=args) as cluster, \
            Client(cluster.urls) as client:
        urls = cluster.urls
        proc = Processor(cluster, tmp_path / "state", tmp_path / "processor.log", target)
        hop = await audit_copy(client, hop_partitions)
        expected: dict[str, int] = {}
        sent = 0
        exit_codes: list[int] = []

        async def produce(round_no: int) -> None:
            nonlocal sent
            events = [order(sent + k, rng) for k in range(PER_ROUND)]
            sent += PER_ROUND
            for e in events:
                expected[e["customer"]] = expected.get(e["customer"], 0) + e["amount"]
            # Every event to two different nodes: the same ID arrives twice.
            first, second = urls[round_no % 3], urls[(round_no + 1) % 3]
            for part in range(0, PER_ROUND, 50):
                chunk = events[part:part + 50]
                await client.send_to(first, "orders", chunk)
                await client.send_to(second, "orders", chunk)

        t0 = asyncio.get_running_loop().time()
        for round_no in range(kills):
            await proc.start()
            if round_no % 4 == 3:
                # A random moment from the spawn: start-up (state open and load, the resend of
                # the previous instance's outbox, group registration) or the first batches.
                delay = rng.uniform(0.2, 1.8)
            else:
                # A random moment of the instance's work. Measured from its start-up, not from
                # the spawn: on a loaded machine Python's start-up alone can outlast any delay,
                # and then every kill would hit the interpreter before it opens the state.
                await proc.wait_ready()
                delay = rng.uniform(0.0, 1.0)
            # The producer writes while the processor reads, processes, commits and acks.
            await asyncio.gather(produce(round_no), asyncio.sleep(delay))  # a random moment
            exit_codes.append(await proc.kill())
        assert exit_codes == [-signal.SIGKILL] * kills
        assert proc.instances_up >= kills - kills // 4  # most kills hit a running instance
        logger.info("%d kills in %.1fs, %d of them of a running instance", kills,
                    asyncio.get_running_loop().time() - t0, proc.instances_up)

        # The last run: let it finish everything, then stop it gracefully. One more order, sent
        # only now, can be applied by this instance alone: its receipt proves that it is up (and
        # so that SIGTERM meets its handler, not Python's start-up).
        await proc.start()
        started = asyncio.get_running_loop().time()
        marker = order(sent, rng)
        sent += 1
        expected[marker["customer"]] = expected.get(marker["customer"], 0) + marker["amount"]
        await client.send_to(urls[1], "orders", [marker])
        await client.send_to(urls[2], "orders", [marker])
        receipts = await read_receipts(client, urls[0], {f"o{i}/0" for i in range(sent)},
                                       proc.log)
        logger.info("final run caught up in %.1fs", asyncio.get_running_loop().time() - started)
        assert await proc.terminate() == 0, proc.log.read_text()[-3000:]

        # 1. Exactly once in the state.
        assert await asyncio.to_thread(table_of, tmp_path / "state") == expected
        # 2. Every emit at least once; counted by ID exactly once; resent copies identical.
        assert receipts.keys() == {f"o{i}/0" for i in range(sent)}
        assert all(all(c == copies[0] for c in copies) for copies in receipts.values())
        # 3. Every complete chunk of "orders" is acked for the group: only each owner's open
        #    chunk is left, on the node the processor read from and (acks replicate) on all.
        async with aiohttp.ClientSession() as http:
            for url in urls:
                async def only_open_chunks(url: str = url) -> bool:
                    listing = await list_chunks(http, url, "orders")
                    return all(not c["complete"] for c in listing) and len(listing) <= 3

                await wait_for(only_open_chunks, timeout=30, what=f"acks on {url}")
            groups = await client.list_groups("orders")
        assert "billing" in str(groups)
        # 4. The repartitioned copy: every order, nothing else, each in its key's partition.
        await check_copy(client, urls[0], hop, {f"o{i}" for i in range(sent)})
