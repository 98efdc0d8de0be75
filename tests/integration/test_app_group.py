"""Instances of one app through etcd, as real ``chukcha run --etcd`` processes on a real
2-node bus: they share the partitions; SIGKILL one and the other takes its partitions over
(restoring their state from the changelog); a replacement with an empty disk joins and gets
its share handed over in order; every event written to both nodes. At the end the state on
the bus (each partition rebuilt from its changelog) equals the expected totals exactly, every
receipt has one content per ID, and every complete input chunk is acked."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from chukcha import Client
from chukcha.bus.app_coordination import AppView, read_app
from chukcha.partitioning import partition_category, partition_of
from chukcha.processors.changelog import Changelog
from chukcha.processors.engine import read_table
from chukcha.state.leveldb import LevelDBStore
from chukcha.testing import ClusterProcess, EtcdServer, run_cluster, run_etcd
from tests.integration.cluster_helpers import wait_for
from tests.integration.test_processor_sigkill import Processor, order, read_receipts

pytestmark = [pytest.mark.timeout(240), pytest.mark.allow_blocking]  # subprocess orchestration

TARGET = "tests.processors.changelog_app:app"  # 4 partitions, key = customer, changelog on
APP, CLUSTER, PARTITIONS = "billing", "test", 4
PER_ROUND = 150


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


def instance(cluster: ClusterProcess, etcd: EtcdServer, tmp_path: Path, name: str,
             state: str) -> Processor:
    p = Processor(cluster, tmp_path / state, tmp_path / f"{name}.log", TARGET)
    p.cmd += ["--etcd", etcd.endpoint, "--cluster", CLUSTER, "--instance", name,
              "--lease-ttl", "2"]
    return p


def balanced(claims: dict[int, str]) -> bool:
    """x and y hold two partitions each: the settled assignment (nothing moves from there)."""
    return sorted(Counter(claims.values()).items()) == [("x", 2), ("y", 2)]


def owners(view: AppView) -> dict[int, str]:
    return {p: c.owner for p, c in view.claims.items()}


async def wait_owners(etcd: EtcdServer, check: Callable[[dict[int, str]], bool],
                      what: str) -> dict[int, str]:
    last: dict[int, str] = {}

    async def ok() -> bool:
        nonlocal last
        last = owners(await read_app((etcd.endpoint,), CLUSTER, APP))
        return check(last)

    try:
        await wait_for(ok, timeout=60, what=what)
    except AssertionError as exc:
        # The claims of the last read (an f-string in ``what`` would show those before any).
        raise AssertionError(f"{exc} (last claims {last})") from None
    return last


class _Reader:
    """The changelog's view of the bus, for rebuilding the final state in the test."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def read_all(self, category: str) -> list[bytes]:
        lines: list[bytes] = []
        for url in self._client.nodes:
            for info in await self._client.api.list_chunks(url, category):
                off = 0
                while data := await self._client.api.read(url, category, info.name, off,
                                                          4 << 20):
                    off += len(data)
                    lines.extend(data[:-1].split(b"\n"))
        return lines

    async def publish(self, category: str, lines: list[bytes]) -> None:
        raise NotImplementedError

    async def complete_chunks(self, category: str) -> list[tuple[str, int]]:
        raise NotImplementedError

    async def ack_chunk(self, category: str, chunk: str, size: int, *,
                        fence: tuple[int, int] | None = None) -> None:
        raise NotImplementedError


async def state_on_the_bus(client: Client, base: Path, *, app: str = APP,
                           partitions: int = PARTITIONS) -> dict[str, Any]:
    """The app's table as the bus has it: every partition rebuilt from its changelog."""
    table: dict[str, Any] = {}
    for p in range(partitions):
        store = await asyncio.to_thread(LevelDBStore, base / f"rebuilt{p}")
        try:
            await Changelog(app, p, _Reader(client)).restore_if_empty(store)
            table.update(await asyncio.to_thread(read_table, store))
        finally:
            await asyncio.to_thread(store.close)
    return table


class Scenario:
    """The bus, the input, what was sent and what the state must be."""

    def __init__(self, tmp_path: Path, etcd: EtcdServer, cluster: ClusterProcess,
                 client: Client, *, inputs: list[str], seed: int) -> None:
        self.tmp_path, self.etcd, self.cluster, self.client = tmp_path, etcd, cluster, client
        self.inputs = inputs
        self.rng = random.Random(seed)  # noqa: S311 - reproducible input
        self.expected: dict[str, int] = {}
        self.sent = 0
        self.instances: list[Processor] = []

    def instance(self, name: str, state: str) -> Processor:
        p = instance(self.cluster, self.etcd, self.tmp_path, name, state)
        self.instances.append(p)  # killed when the scenario ends, if still running
        return p

    async def start_x_and_y(self) -> tuple[Processor, Processor, dict[int, str]]:
        """Start instances x and y, wait until they share the partitions, send a round and
        wait for its receipts: the opening of every scenario here. Returns the two and the
        shared assignment."""
        x, y = self.instance("x", "state-x"), self.instance("y", "state-y")
        for p in (x, y):
            await p.start()
        for p in (x, y):
            await p.wait_ready()
        shared = await wait_owners(self.etcd, balanced, "x and y to share the partitions")
        await self.send_round()
        await self.receipts()
        return x, y, shared

    async def send_round(self) -> None:
        events = [order(self.sent + k, self.rng) for k in range(PER_ROUND)]
        self.sent += PER_ROUND
        by_partition: dict[int, list[dict[str, Any]]] = {}
        for e in events:
            self.expected[e["customer"]] = self.expected.get(e["customer"], 0) + e["amount"]
            by_partition.setdefault(partition_of(e["customer"], PARTITIONS), []).append(e)
        for url in self.cluster.urls:  # every event on both nodes: the same ID twice
            for p, part in sorted(by_partition.items()):
                await self.client.send_to(url, partition_category("orders", p), part)

    async def receipts(self) -> dict[str, list[Any]]:
        return await read_receipts(self.client, self.cluster.urls[0],
                                   {f"o{i}/0" for i in range(self.sent)},
                                   self.tmp_path / "x.log")

    async def acked_all(self) -> bool:
        listings = [await self.client.list_chunks(c) for c in self.inputs]
        return all(not c.complete for listing in listings for c in listing)

    async def check_end(self, seen: dict[str, list[Any]]) -> None:
        """Every receipt once per ID, every input chunk acked, the state on the bus exact."""
        assert len(seen) == self.sent
        assert all(len({str(r) for r in copies}) == 1 for copies in seen.values())
        await wait_for(self.acked_all, what="every complete input chunk to be acked")
        assert await state_on_the_bus(self.client, self.tmp_path) == self.expected


@contextlib.asynccontextmanager
async def scenario(tmp_path: Path, etcd: EtcdServer, seed: int) -> AsyncIterator[Scenario]:
    async with run_cluster(tmp_path / "cluster", ("a", "b"), etcd=etcd.endpoint,
                           args=("--max-chunk-size", "4096")) as cluster, \
            Client(cluster.urls) as client:
        inputs = await client.create_partitions("orders", PARTITIONS)
        sc = Scenario(tmp_path, etcd, cluster, client, inputs=inputs, seed=seed)
        try:
            yield sc
        finally:  # a scenario that failed half-way leaves no instance running (nor stopped)
            for p in sc.instances:
                if p.proc is not None and p.proc.returncode is None:
                    await p.kill()


async def test_instances_share_take_over_and_hand_over_partitions_exactly_once(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    async with scenario(tmp_path, etcd, seed=5) as sc:
        x, y, shared = await sc.start_x_and_y()

        # SIGKILL y: after its lease (2 s) x owns everything, its state from the changelog.
        assert await y.kill() == -9
        await sc.send_round()
        await wait_owners(etcd, lambda o: set(o.values()) == {"x"} and len(o) == PARTITIONS,
                          "x to take y's partitions over")
        await sc.receipts()
        log = await asyncio.to_thread(x.log.read_text)
        for part in (part for part, owner in shared.items() if owner == "y"):
            assert f"restored partition {part} from the bus" in log  # not from y's disk

        # A replacement for y with an empty disk: x hands its share over in order.
        y2 = sc.instance("y", "state-y2")
        await y2.start()
        await y2.wait_ready()
        await wait_owners(etcd, balanced, "x to hand y2 its share")
        await sc.send_round()
        seen = await sc.receipts()
        await wait_for(sc.acked_all, what="every complete input chunk to be acked")
        for p in (x, y2):
            assert await p.terminate() == 0
        await sc.check_end(seen)
        assert "handed over" in await asyncio.to_thread(x.log.read_text)


async def test_a_paused_owner_is_fenced_and_the_state_stays_exact(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    """SIGSTOP an owner past its lease while input keeps coming; the other instance takes its
    partitions over and processes; SIGCONT: the former owner notices it lost them and stops
    them (whatever it still tries to ack is refused), and the state stays exact."""
    async with scenario(tmp_path, etcd, seed=9) as sc:
        x, y, _ = await sc.start_x_and_y()
        assert y.proc is not None
        y.proc.send_signal(signal.SIGSTOP)
        await sc.send_round()
        await wait_owners(etcd, lambda o: set(o.values()) == {"x"} and len(o) == PARTITIONS,
                          "x to take the paused y's partitions over")
        await sc.receipts()
        y.proc.send_signal(signal.SIGCONT)

        async def y_stopped_them() -> bool:
            text = await asyncio.to_thread(y.log.read_text)
            return "stops partitions" in text or "ownership lost" in text

        await wait_for(y_stopped_them, what="the resumed y to stop its former partitions")
        await wait_owners(etcd, balanced, "y to rejoin and get its share again")
        await sc.send_round()
        seen = await sc.receipts()
        await wait_for(sc.acked_all, what="every complete input chunk to be acked")
        for p in (x, y):
            assert await p.terminate() == 0
        await sc.check_end(seen)


async def test_an_etcd_outage_pauses_processing_and_it_resumes(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    """etcd goes away: the instances stop their partitions once their leases cannot be proven
    (no double processing), input keeps coming, etcd comes back: they resume (or rebalance)
    and the state is exact."""
    async with scenario(tmp_path, etcd, seed=13) as sc:
        x, y, _ = await sc.start_x_and_y()
        await etcd.stop()

        async def stopped(p: Processor) -> bool:
            return "stops partitions" in await asyncio.to_thread(p.log.read_text)

        for p in (x, y):
            await wait_for(functools.partial(stopped, p), what="the instances to stop")
        await sc.send_round()  # the nodes take input without etcd
        await etcd.start()
        await wait_owners(etcd, balanced, "x and y to own the partitions again")
        seen = await sc.receipts()
        for p in (x, y):
            assert await p.terminate() == 0
        await sc.check_end(seen)


async def test_a_failing_scenario_leaves_no_instance_running(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    """A scenario that fails half-way (here: raises) kills the instances it started, so that a
    failed test leaves no ``chukcha run`` process behind (a SIGSTOPped or stuck one would)."""
    with pytest.raises(RuntimeError, match="fails half-way"):
        async with scenario(tmp_path, etcd, seed=1) as sc:
            x = sc.instance("x", "state-x")
            await x.start()
            await x.wait_ready()
            proc = x.proc
            assert proc is not None
            proc.send_signal(signal.SIGSTOP)  # as a paused owner: SIGTERM alone would not do
            raise RuntimeError("the scenario fails half-way")
    assert proc is not None and proc.returncode == -signal.SIGKILL
