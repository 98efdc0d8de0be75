"""State on the bus: what the changelog costs, and how fast a lost state is restored.

Starts a ``chukcha node`` subprocess, loads N events of 200 bytes of JSON (unique ``id``,
``--keys`` distinct keys), then runs the same app in this process, pinned to one CPU
(read-modify-write of one key per event, fsync per commit), alternately without and with
``changelog=True`` (side by side, ``--runs`` rounds): the ratio of the medians is the cost of
the changelog. After each changelog run the state directory is deleted and the partition's
store is rebuilt from the bus (:meth:`Changelog.restore_if_empty`), timed: restore keys/s is
the number of keys in the rebuilt store (state, dedup IDs, positions) per second. Every run
checks the final state (each event applied exactly once), the restored one its size too.

    .venv/bin/python bench/bench_changelog.py                  # 100,000 events, 3 rounds
    .venv/bin/python bench/bench_changelog.py -n 300000 --keys 100000 --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_processor import make_events

from chukcha import App, Client, Context
from chukcha.loop import run_loop
from chukcha.processors import ProcessorConfig
from chukcha.processors.changelog import Changelog
from chukcha.processors.engine import read_state_table, read_table
from chukcha.state.leveldb import LevelDBStore
from chukcha.testing import NodeProcess

__all__ = ["main"]

CATEGORY = "events"


class _Reader:
    """The restore's view of the bus (what the runner's IO does, without a run)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def publish(self, category: str, lines: list[bytes]) -> None:
        raise NotImplementedError

    async def complete_chunks(self, category: str) -> list[tuple[str, int]]:
        raise NotImplementedError

    async def ack_chunk(self, category: str, chunk: str, size: int, *,
                        fence: tuple[int, int] | None = None) -> None:
        raise NotImplementedError

    async def read_all(self, category: str) -> list[bytes]:
        lines: list[bytes] = []
        api = self._client.api
        for url in self._client.nodes:
            for info in await api.list_chunks(url, category):
                off = 0
                while data := await api.read(url, category, info.name, off, 4 << 20):
                    off += len(data)
                    lines.extend(data[:-1].split(b"\n"))
        return lines


async def one_run(url: str, state_dir: Path, group: str, n: int, *, changelog: bool) -> float:
    app = App(group, nodes=[url], state_dir=state_dir,
              config=ProcessorConfig(changelog=changelog, snapshot_every=0))
    done = asyncio.Event()
    count = 0

    @app.processor(CATEGORY)
    def on_event(ctx: Context, event: dict[str, Any]) -> None:
        nonlocal count
        key = event["k"]
        ctx.set(key, ctx.get(key, 0) + event["amount"])
        count += 1
        if count == n:
            done.set()

    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(app.run_async(stop))
    waiter = asyncio.create_task(done.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()
        raise RuntimeError("the app stopped before processing every event")
    stop.set()
    await task
    elapsed = time.perf_counter() - started
    table = await asyncio.to_thread(read_state_table, state_dir)
    if sum(table.values()) != sum(i % 97 for i in range(n)):
        raise RuntimeError("wrong state total")
    return n / elapsed


async def restore(client: Client, group: str, state_dir: Path) -> tuple[float, int, int]:
    """Rebuild partition 0 of ``group`` into an empty store; (seconds, keys, table size)."""
    store = await asyncio.to_thread(LevelDBStore, state_dir)
    try:
        changelog = Changelog(group, 0, _Reader(client))
        started = time.perf_counter()
        await changelog.restore_if_empty(store)
        elapsed = time.perf_counter() - started
        table = await asyncio.to_thread(read_table, store)
        keys = sum(1 for _ in await asyncio.to_thread(lambda: list(store.scan(b""))))
        return elapsed, keys, len(table)
    finally:
        await asyncio.to_thread(store.close)


async def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-changelog-") as tmp:
        base = Path(tmp)
        node = NodeProcess(base / "node", "bench", ["--log-level", "WARNING"])
        await node.start()
        try:
            cpus = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cpus[0]})
            events = make_events(args.events, args.keys)
            groups = [f"bench{i}" for i in range(2 * args.runs)]
            async with Client([node.url]) as client:
                for name in groups:
                    await client.register_group(CATEGORY, name)
                for i in range(0, len(events), 15_000):
                    await client.send(CATEGORY, events[i:i + 15_000])
                print(f"loaded {args.events:,} events of 200 B ({args.keys:,} keys); "
                      f"processor pinned to CPU {cpus[0]} of {len(cpus)}; load "
                      f"{os.getloadavg()[0]:.1f}")
                print(f"{'run':>4} {'changelog':>9} {'events/s':>10} {'restore s':>9} "
                      f"{'keys':>9} {'keys/s':>10}")
                rates: dict[bool, list[float]] = {False: [], True: []}
                restores: list[float] = []
                g = 0
                for i in range(args.runs):
                    for on in (False, True):
                        state = base / f"state{g}"
                        rate = await one_run(node.url, state, groups[g], args.events,
                                             changelog=on)
                        rates[on].append(rate)
                        extra = ""
                        if on:
                            await asyncio.to_thread(shutil.rmtree, state)
                            secs, keys, size = await restore(client, groups[g],
                                                             base / f"restored{g}")
                            if size != min(args.keys, args.events):
                                raise RuntimeError(f"restored {size} keys of state, not "
                                                   f"{min(args.keys, args.events)}")
                            restores.append(keys / secs)
                            extra = f"{secs:>9.2f} {keys:>9,} {keys / secs:>10,.0f}"
                        print(f"{i + 1:>4} {'on' if on else 'off':>9} {rate:>10,.0f} {extra}")
                        g += 1
            off, with_log = statistics.median(rates[False]), statistics.median(rates[True])
            print(f"median events/s: off {off:,.0f}, on {with_log:,.0f}; with the changelog "
                  f"{with_log / off:.2f}x (time per event {100 * (off / with_log - 1):+.0f} %)")
            print(f"median restore: {statistics.median(restores):,.0f} keys/s")
        finally:
            await node.stop()
            node.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--events", type=int, default=100_000)
    p.add_argument("--keys", type=int, default=10_000, help="distinct keys")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    run_loop(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
