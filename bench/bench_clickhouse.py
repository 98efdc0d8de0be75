"""ClickHouse sink throughput, end to end: bus -> processor -> ClickHouse, 1,000-row batches.

Starts a ``chukcha node`` subprocess and a ClickHouse server (``chukcha.testing``), loads N
orders into the bus (not timed), then runs the ClickHouse example app (``examples.clickhouse_sink``)
in this process from a fresh state until its sink has stored every order, and checks with
``SELECT count(), sum(amount) ... FINAL`` that the table holds each order once. Every order line
has the same length, and the app reads ``1000 x line`` bytes per batch, so each flush is exactly
one 1,000-row ``INSERT``. Reported per run and as the median of the runs: events/s end to end and
the share of the wall time spent inside the ``INSERT`` requests. A second table measures the
sink alone (1,000-row inserts back to back, no bus) for reference.

    .venv/bin/python bench/bench_clickhouse.py                 # 5 runs of 100,000 orders
    .venv/bin/python bench/bench_clickhouse.py -n 20000 --runs 3

The app commits its state with an fsync per batch (the default policy). The node, ClickHouse and
the app share the machine's cores, so the figures are a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `examples` is not installed

import orjson

from chukcha.client import Client
from chukcha.processors import ProcessorConfig
from chukcha.testing import NodeProcess
from chukcha.testing_clickhouse import ClickHouseServer, run_clickhouse
from examples.clickhouse_sink import ClickHouseSink, build_app, order_row, orders_sink

__all__ = ["Run", "main"]

BATCH_ROWS = 1000


@dataclass(frozen=True, slots=True)
class Run:
    """One measured run."""

    events: int
    seconds: float
    flushes: int
    insert_seconds: float

    @property
    def events_s(self) -> float:
        return self.events / self.seconds

    @property
    def rows_per_flush(self) -> float:
        return self.events / self.flushes if self.flushes else 0.0

    @property
    def insert_share(self) -> float:
        return self.insert_seconds / self.seconds


def _order(i: int) -> dict[str, Any]:
    # Fixed-width fields: every line has the same length, so batches hold exactly BATCH_ROWS.
    return {"id": f"order-{i:010d}", "customer": f"cust{i % 1000:04d}", "amount": 1000 + i % 9000}


class _Stored:
    """Wraps the sink to learn (a push, not a poll) when every row has been stored."""

    def __init__(self, inner: ClickHouseSink, total: int) -> None:
        self.inner, self.total, self.rows = inner, total, 0
        self.done = asyncio.Event()

    async def flush(self, rows: Sequence[Any]) -> None:
        await self.inner.flush(rows)
        self.rows += len(rows)
        if self.rows >= self.total:
            self.done.set()


async def _load(node: NodeProcess, category: str, n: int) -> None:
    async with Client([node.url]) as client:
        for start in range(0, n, 10_000):
            await client.send(category, [_order(i) for i in range(start, min(n, start + 10_000))])


async def _one_run(node: NodeProcess, ch: ClickHouseServer, root: Path, run: int, n: int) -> Run:
    category, table = f"orders{run}", f"orders_bench{run}"
    await _load(node, category, n)
    line = len(orjson.dumps(_order(0))) + 1
    sink = orders_sink(ch.url, table)
    await sink.start()  # creates the table before the clock starts
    stored = _Stored(sink, n)
    app = build_app([node.url], str(root / f"state{run}"), stored, category=category,
                    config=ProcessorConfig(max_batch_bytes=BATCH_ROWS * line))
    stop = asyncio.Event()
    try:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(app.run_async(stop))
            async with asyncio.timeout(600):
                await stored.done.wait()
            seconds = time.perf_counter() - started
            stop.set()
        task.result()
    finally:
        await sink.stop()
    text = await ch.query(f"SELECT count(), sum(amount) FROM {table} FINAL FORMAT TSV")  # noqa: S608
    want = f"{n}\t{sum(_order(i)['amount'] for i in range(n))}\n"
    if text != want:
        raise SystemExit(f"run {run}: table holds {text!r}, expected {want!r}")
    stats = sink.stats
    return Run(n, seconds, stats.flushes, stats.insert_seconds)


async def _sink_alone(ch: ClickHouseServer, run: int, n: int) -> Run:
    table = f"orders_direct{run}"
    rows = [order_row(_order(i)) for i in range(n)]
    async with orders_sink(ch.url, table) as sink:
        started = time.perf_counter()
        for start in range(0, n, BATCH_ROWS):
            await sink.flush(rows[start:start + BATCH_ROWS])
        seconds = time.perf_counter() - started
        stats = sink.stats
    return Run(n, seconds, stats.flushes, stats.insert_seconds)


def _table(title: str, runs: list[Run]) -> None:
    print(f"\n{title}")
    print(f"{'run':>6} {'events':>9} {'seconds':>8} {'events/s':>10} {'flushes':>8} "
          f"{'rows/flush':>10} {'insert s':>9} {'insert %':>9}")
    for i, r in enumerate(runs, 1):
        print(f"{i:>6} {r.events:>9} {r.seconds:>8.2f} {r.events_s:>10.0f} {r.flushes:>8} "
              f"{r.rows_per_flush:>10.0f} {r.insert_seconds:>9.2f} {100 * r.insert_share:>8.1f}%")
    def med(f: Callable[[Run], float]) -> float:
        return statistics.median(f(r) for r in runs)

    print(f"{'median':>6} {runs[0].events:>9} {med(lambda r: r.seconds):>8.2f} "
          f"{med(lambda r: r.events_s):>10.0f} {med(lambda r: r.flushes):>8.0f} "
          f"{med(lambda r: r.rows_per_flush):>10.0f} {med(lambda r: r.insert_seconds):>9.2f} "
          f"{100 * med(lambda r: r.insert_share):>8.1f}%")


async def _main(n: int, runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-clickhouse-") as tmp:
        root = Path(tmp)
        node = NodeProcess(root / "node", "bench")
        await node.start()
        try:
            async with run_clickhouse(root / "clickhouse") as ch:
                version = (await ch.query("SELECT version()")).strip()
                e2e = [await _one_run(node, ch, root, r, n) for r in range(runs)]
                direct = [await _sink_alone(ch, r, n) for r in range(runs)]
        finally:
            await node.stop()
            node.close()
    print(f"ClickHouse {version}; {n} orders per run; {BATCH_ROWS}-row batches; "
          f"state fsync'ed per batch")
    _table("end to end: bus -> processor (dedup + LevelDB commit) -> ClickHouse", e2e)
    _table("sink alone: 1,000-row INSERTs back to back", direct)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("-n", "--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    if args.events < BATCH_ROWS or args.runs < 1:
        parser.error(f"need --events >= {BATCH_ROWS} and --runs >= 1")
    asyncio.run(_main(args.events, args.runs))


if __name__ == "__main__":
    main()
