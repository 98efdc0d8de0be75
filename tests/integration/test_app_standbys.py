"""Standbys (``chukcha run --etcd ... --standbys 1``), as real processes on a real 2-node bus
with real etcd: every partition gets a standby (the other instance), recorded in etcd and shown
by ``chukcha app status``; the standby's local store follows the owner's changelog (equal to
the owner's store after quiescence); SIGKILL of the owner and the standby takes over without
restoring the state from the bus; a third instance joining with an empty disk gets its share
only once its copies have caught up (no restore either); the state stays exact (totals equal,
one receipt content per ID, every input chunk acked)."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from chukcha.bus.app_coordination import AppView, read_app
from chukcha.partitioning import partition_dir_name
from chukcha.processors.changelog import read_head
from chukcha.processors.engine import read_table
from chukcha.state.changelog import Head
from chukcha.state.leveldb import LevelDBStore
from chukcha.testing import EtcdServer
from tests.integration.cluster_helpers import wait_for
from tests.integration.test_app_group import (
    APP,
    CLUSTER,
    PARTITIONS,
    Scenario,
    balanced,
    etcd,
    owners,
    scenario,
    wait_owners,
)
from tests.integration.test_app_instances import chukcha_cli
from tests.integration.test_processor_sigkill import Processor

pytestmark = [pytest.mark.timeout(240), pytest.mark.allow_blocking]  # subprocess orchestration

__all__ = ["etcd"]


def standbys_settled(view: AppView) -> bool:
    """Every partition has one owner and one standby, never the same instance."""
    return (balanced(owners(view))
            and all(view.standbys.get(p) == {"x", "y"} - {view.claims[p].owner}
                    for p in range(PARTITIONS)))


def copy_of(proc: Processor, state: Path, to: Path) -> None:
    """Copy ``state`` while ``proc`` is stopped (SIGSTOP): a consistent copy of its stores."""
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGSTOP)
    try:
        shutil.copytree(state, to, ignore=shutil.ignore_patterns("LOCK"))
    finally:
        proc.proc.send_signal(signal.SIGCONT)


def table_and_head(state: Path, partition: int) -> tuple[dict[str, object], Head | None]:
    store = LevelDBStore(state / partition_dir_name(partition))
    try:
        return read_table(store), read_head(store)
    finally:
        store.close()


async def join_with_an_empty_disk(sc: Scenario, etcd: EtcdServer
                                   ) -> tuple[Processor, dict[str, list[Any]]]:
    """z joins with an empty disk: the partitions it gets move only once its copies are ready
    (it follows them first), so it starts them without a restore too."""
    z = sc.instance("z", "state-z")
    z.cmd += ["--standbys", "1"]
    await z.start()
    await z.wait_ready()
    await wait_owners(etcd, lambda o: len(o) == PARTITIONS and set(o.values()) == set("xyz"),
                      "z to get its share")
    await sc.send_round()
    seen = await sc.receipts()
    log = await asyncio.to_thread(z.log.read_text)
    assert "copy caught up" in log
    assert "assigned (epoch" in log
    assert "restored from the bus" not in log  # every partition came from its warm copy
    return z, seen


def take_over(log: str, partition: int, epoch: int) -> str:
    """How the instance whose ``log`` this is brought ``partition`` current when it took it
    at ``epoch`` (the line of that take-over, not of an earlier one)."""
    line = re.search(rf"partition {partition} assigned \(epoch {epoch}\): ([^;]*);", log)
    assert line is not None, f"no assignment of partition {partition} at epoch {epoch} logged"
    return line[1]


async def test_a_standby_follows_and_takes_over_without_a_restore(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    async with scenario(tmp_path, etcd, seed=11) as sc:
        x, y = sc.instance("x", "state-x"), sc.instance("y", "state-y")
        for p in (x, y):
            p.cmd += ["--standbys", "1"]
            await p.start()
        for p in (x, y):
            await p.wait_ready()
        view = AppView()

        async def settled() -> bool:
            nonlocal view
            view = await read_app((etcd.endpoint,), CLUSTER, APP)
            return standbys_settled(view)

        await wait_for(settled, timeout=60, what="owners and standbys to settle")
        code, out = await chukcha_cli("app", "status", APP, "--etcd", etcd.endpoint,
                                      "--cluster", CLUSTER, "--node", sc.cluster.urls[0],
                                      "--json")
        assert code == 0, out
        status = orjson.loads(out)
        assert {p: c["standbys"] for p, c in status["claims"].items()} == {
            str(p): sorted(view.standbys[p]) for p in range(PARTITIONS)}
        assert all(set(c["standbys_ready"]) <= set(c["standbys"])
                   for c in status["claims"].values())
        assert {m: i["standby_of"] for m, i in status["instances"].items()} == {
            m: sorted(p for p in range(PARTITIONS) if m in view.standbys[p]) for m in "xy"}

        for _ in range(3):
            await sc.send_round()
        await sc.receipts()
        shared = owners(view)

        # After quiescence each standby copy equals its owner's store (and its last record).
        attempt = 0

        async def copies_equal() -> bool:
            nonlocal attempt
            attempt += 1
            base = tmp_path / f"copies{attempt}"
            copy_of(x, tmp_path / "state-x", base / "x")
            copy_of(y, tmp_path / "state-y", base / "y")
            for p, owner in shared.items():
                standby = "y" if owner == "x" else "x"
                mine = await asyncio.to_thread(table_and_head, base / owner, p)
                theirs = await asyncio.to_thread(table_and_head, base / standby, p)
                if mine != theirs or not mine[0]:
                    return False
            return True

        await wait_for(copies_equal, timeout=60, what="standby copies equal to the owners'")

        # SIGKILL x: y, the standby of x's partitions, takes them over with the tail only.
        assert await x.kill() == -9
        await sc.send_round()
        await wait_owners(etcd, lambda o: set(o.values()) == {"y"} and len(o) == PARTITIONS,
                          "y to take x's partitions over")
        seen = await sc.receipts()
        log = await asyncio.to_thread(y.log.read_text)
        taken = await read_app((etcd.endpoint,), CLUSTER, APP)
        for part in (part for part, owner in shared.items() if owner == "x"):
            assert take_over(log, part, taken.claims[part].epoch).startswith(
                ("standby copy current", "standby copy brought current"))
            assert f"restored partition {part} from the bus" not in log
        assert "standby copy rebuilt" not in log

        # x back (same disk): the partitions are shared again, with standbys; all exact.
        x2 = sc.instance("x", "state-x")
        x2.cmd += ["--standbys", "1"]
        await x2.start()
        await x2.wait_ready()
        await wait_for(settled, timeout=60, what="owners and standbys to settle again")
        await sc.send_round()
        await sc.receipts()

        z, seen = await join_with_an_empty_disk(sc, etcd)
        for p in (x2, y, z):
            assert await p.terminate() == 0
        await sc.check_end(seen)
