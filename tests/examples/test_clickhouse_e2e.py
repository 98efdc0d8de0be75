"""End to end: bus -> the ClickHouse example app (a subprocess, killed with SIGKILL mid-run) ->
a real ClickHouse server. Every event is written to two nodes; the table ends up holding each
event once (``FINAL``) with exact sums."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from chukcha.client import Client
from chukcha.testing import NodeProcess, bind_loopback
from chukcha.testing_clickhouse import ClickHouseError, ClickHouseServer

ROOT = Path(__file__).resolve().parents[2]
TABLE = "orders_e2e"


class ExampleProcess:
    """``python -m examples.clickhouse_sink`` with its settings in the environment."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self._env = {**os.environ, **env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self._log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self._log_start = 0

    async def start(self) -> None:
        self._log_start = len(self.log())  # where this instance's lines begin
        with self._log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "examples.clickhouse_sink", cwd=ROOT, env=self._env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        self.starts += 1

    async def wait_running(self) -> None:
        """Until the latest instance logged that it runs (its SIGTERM handler is installed by
        then: a SIGTERM during Python's start-up would kill it with the default action)."""
        async with asyncio.timeout(60):
            while " running categories=" not in self.log()[self._log_start:]:
                assert self.proc is not None
                assert self.proc.returncode is None, self.log()[-3000:]
                await asyncio.sleep(0.05)  # polling the process's log: it has no other signal

    async def kill(self) -> None:
        assert self.proc is not None
        assert self.proc.returncode is None, self.log()  # it was running until now
        self.proc.send_signal(signal.SIGKILL)
        assert await self.proc.wait() == -signal.SIGKILL

    async def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode

    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""


@asynccontextmanager
async def two_nodes(root: Path) -> AsyncIterator[tuple[NodeProcess, NodeProcess]]:
    socks = [bind_loopback(), bind_loopback()]
    peers = ",".join(
        f"{name}={s.getsockname()[0]}:{s.getsockname()[1]}"
        for name, s in zip("ab", socks, strict=True)
    )
    nodes = [NodeProcess(root / name, name, ["--peers", peers], sock=s)
             for name, s in zip("ab", socks, strict=True)]
    try:
        for n in nodes:
            await n.start()
        yield nodes[0], nodes[1]
    finally:
        for n in nodes:
            await n.stop()
            n.close()


async def _distinct(ch: ClickHouseServer) -> int:
    try:
        return int(await ch.query(f"SELECT count() FROM {TABLE} FINAL"))  # noqa: S608
    except ClickHouseError:
        return 0  # the app has not created the table yet


async def _wait_rows(ch: ClickHouseServer, proc: ExampleProcess, at_least: int) -> int:
    """Poll the real server (it has no push) until FINAL holds ``at_least`` rows."""
    async with asyncio.timeout(60):
        while (n := await _distinct(ch)) < at_least:
            assert proc.proc is not None
            assert proc.proc.returncode is None, proc.log()[-3000:]
            await asyncio.sleep(0.05)
    return n


def _orders(start: int, count: int) -> list[dict[str, Any]]:
    return [{"id": f"order-{i:06d}", "customer": f"cust{i % 11}", "amount": i % 97 + 1}
            for i in range(start, start + count)]


async def _send_twice(client: Client, nodes: Sequence[NodeProcess],
                      orders: list[dict[str, Any]]) -> None:
    # The same events (same IDs) to both nodes: a producer retry that landed twice.
    for node in nodes:
        await client.send_to(node.url, "orders", orders)


@pytest.mark.allow_blocking  # subprocess orchestration with small synchronous file calls
@pytest.mark.timeout(120)
async def test_sigkilled_processor_leaves_each_event_once_with_exact_sums(
    tmp_path: Path, clickhouse: ClickHouseServer
) -> None:
    rounds, per_round = 4, 1000
    total = rounds * per_round
    async with two_nodes(tmp_path) as (a, b), Client([a.url, b.url]) as client:
        app = ExampleProcess({
            "CHUKCHA_NODES": a.url,  # reads b's copies from a, replicated
            "CHUKCHA_STATE_DIR": str(tmp_path / "state"),
            "CHUKCHA_BATCH_BYTES": "4096",  # many small batches: kills land mid-backlog
            "CLICKHOUSE_URL": clickhouse.url,
            "CLICKHOUSE_TABLE": TABLE,
        }, tmp_path / "app.log")
        await app.start()
        for r in range(rounds):
            await _send_twice(client, (a, b), _orders(r * per_round, per_round))
            # Kill it while it works through this round's backlog, then start it again.
            await _wait_rows(clickhouse, app, r * per_round + per_round // 4)
            await app.kill()
            await app.start()
        # One more kill right after a restart, before it can have committed much.
        await _wait_rows(clickhouse, app, total // 2)
        await app.kill()
        await app.start()
        assert await _wait_rows(clickhouse, app, total) == total
        await app.wait_running()
        assert await app.terminate() == 0, app.log()[-3000:]

    expected = Counter[str]()
    counts = Counter[str]()
    for order in _orders(0, total):
        expected[order["customer"]] += order["amount"]
        counts[order["customer"]] += 1
    text = await clickhouse.query(
        f"SELECT customer, count(), sum(amount) FROM {TABLE} FINAL "  # noqa: S608
        "GROUP BY customer ORDER BY customer FORMAT TSV"
    )
    got = {c: (int(n), int(s)) for c, n, s in (line.split("\t") for line in text.splitlines())}
    assert got == {c: (counts[c], expected[c]) for c in expected}
    assert await clickhouse.query(
        f"SELECT count(), uniqExact(id), sum(amount) FROM {TABLE} FINAL FORMAT TSV"  # noqa: S608
    ) == f"{total}\t{total}\t{sum(expected.values())}\n"
    # Whatever copies the crashes left are physically there until a merge...
    raw = int(await clickhouse.query(f"SELECT count() FROM {TABLE}"))  # noqa: S608
    assert raw >= total
    # ...and a merge collapses them for real.
    await clickhouse.query(f"OPTIMIZE TABLE {TABLE} FINAL")
    assert int(await clickhouse.query(f"SELECT count() FROM {TABLE}")) == total  # noqa: S608
    assert app.starts == rounds + 2
