"""Processor throughput: one processor on one core, exactly-once, fsync every commit.

Starts a ``chukcha node`` subprocess on a temporary directory, loads N events of 200 bytes of
JSON (each with a unique ``id``; ``--keys`` distinct customer keys), then runs an app in this
process, pinned to one CPU, whose callback does a read-modify-write of one key per event
(``ctx.set(k, ctx.get(k, 0) + amount)``); the framework does the dedup check, one LevelDB write
batch per consumer batch (state + dedup IDs + position) with fsync, and the acks. A run ends
when the N-th event is applied and its batch is committed (the app is then stopped; every
event applied exactly once is checked from the final state). Prints one row per run and the
median; ``--profile`` adds a cProfile summary of one more run.

``--partitions 1,8`` runs the app with each partition count side by side (alternating, in one
run of the script; the key is the event's ``k`` field, so 8 partitions keep 8 stores, each
fsync'ed per commit); ``--no-key`` drops the key function (the event ID is the key).

    .venv/bin/python bench/bench_processor.py                  # 200,000 events, 3 runs
    .venv/bin/python bench/bench_processor.py -n 500000 --runs 5 --profile
    .venv/bin/python bench/bench_processor.py --partitions 1,8 --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chukcha import App, Client, Context
from chukcha.loop import run_loop
from chukcha.processors import ProcessorConfig
from chukcha.processors.engine import read_state_table
from chukcha.testing import NodeProcess

__all__ = ["main"]

CATEGORY = "events"


@dataclass(frozen=True, slots=True)
class RunResult:
    events: int
    seconds: float
    commits: int


def make_events(n: int, keys: int) -> list[bytes]:
    events = []
    for i in range(n):
        head = b'{"id":"ev-%010d","k":"key%06d","amount":%d,"pad":"' % (i, i % keys, i % 97)
        events.append(head + b"x" * (200 - len(head) - 2) + b'"}')
    return events


def category_for(partitions: int) -> str:
    """The input of a run with ``partitions``: plain for 1, else partitioned with that count
    (so the keyed stage reads it as it is, without the repartitioning hop)."""
    return CATEGORY if partitions == 1 else f"{CATEGORY}{partitions}"


async def load(url: str, events: list[bytes], groups: list[str], counts: list[int]) -> None:
    async with Client([url]) as client:
        for c in counts:
            category = category_for(c)
            if c > 1:
                await client.create_partitions(category, c)
            for c2 in range(c):
                for g in groups:  # every group keeps every chunk until the runs are over
                    await client.register_group(
                        category if c == 1 else f"{category}.p{c2:04d}", g)
            step = 15_000  # ~3 MiB per write
            for i in range(0, len(events), step):
                await client.send(category, events[i:i + step],
                                  key=None if c == 1 else by_customer)


def by_customer(event: dict[str, Any]) -> str:
    key: str = event["k"]
    return key


async def one_run(url: str, state_dir: Path, group: str, n: int, batch: int, *,
                  partitions: int = 1, keyed: bool = True) -> RunResult:
    app = App(group, nodes=[url], state_dir=state_dir,
              config=ProcessorConfig(max_batch_bytes=batch), partitions=partitions)
    done = asyncio.Event()
    count = 0

    @app.processor(category_for(partitions), key=by_customer if keyed else None)
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
    # The N-th event is applied; stopping finishes (commits, fsyncs, acks) its batch.
    stop.set()
    await task
    elapsed = time.perf_counter() - started
    table = await asyncio.to_thread(read_state_table, state_dir)
    total = sum(i % 97 for i in range(n))
    if sum(table.values()) != total:
        raise RuntimeError(f"state total {sum(table.values())} != {total}")
    return RunResult(count, elapsed, 0)


async def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-processor-") as tmp:
        base = Path(tmp)
        node = NodeProcess(base / "node", "bench", ["--log-level", "WARNING"])
        await node.start()
        try:
            cpus = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cpus[0]})  # the processor: one core (the node: any)
            counts = [int(c) for c in args.partitions.split(",")]
            runs = args.runs * len(counts) + (1 if args.profile else 0)
            groups = [f"bench{i}" for i in range(runs)]
            events = make_events(args.events, args.keys)
            t0 = time.perf_counter()
            await load(node.url, events, groups, counts)
            print(f"loaded {args.events:,} events of 200 B in {time.perf_counter() - t0:.1f}s; "
                  f"processor pinned to CPU {cpus[0]} of {len(cpus)}")
            print(f"{'run':>5} {'parts':>5} {'events':>9} {'seconds':>8} {'events/s':>10}")
            rates: dict[int, list[float]] = {c: [] for c in counts}
            g = 0
            for i in range(args.runs):
                for c in counts:  # side by side: the counts alternate within each round
                    r = await one_run(node.url, base / f"state{g}", groups[g], args.events,
                                      args.batch, partitions=c, keyed=not args.no_key)
                    g += 1
                    rates[c].append(r.events / r.seconds)
                    print(f"{i + 1:>5} {c:>5} {r.events:>9,} {r.seconds:>8.2f} "
                          f"{rates[c][-1]:>10,.0f}")
            for c in counts:
                print(f"{'median':>5} {c:>5} {'':>9} {'':>8} "
                      f"{statistics.median(rates[c]):>10,.0f}")
            if len(counts) > 1:
                base_rate = statistics.median(rates[counts[0]])
                for c in counts[1:]:
                    print(f"ratio {c} partitions / {counts[0]}: "
                          f"{statistics.median(rates[c]) / base_rate:.2f}")
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                r = await one_run(node.url, base / "state-prof", groups[-1], args.events,
                                  args.batch, partitions=counts[-1],
                                  keyed=not args.no_key)
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
                print(f"\nprofile (one run under cProfile: {r.events / r.seconds:,.0f} events/s; "
                      "top functions by own time)")
                print("\n".join(line for line in out.getvalue().splitlines()
                                if line.strip())[:6000])
        finally:
            await node.stop()
            node.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--events", type=int, default=200_000)
    p.add_argument("--keys", type=int, default=10_000, help="distinct keys (customers)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=1 << 20, help="max_batch_bytes per read")
    p.add_argument("--profile", action="store_true",
                   help="add a cProfile summary (of the last partition count)")
    p.add_argument("--partitions", default="1", metavar="N[,N...]",
                   help="partition counts to compare side by side")
    p.add_argument("--no-key", action="store_true", help="no key function (the ID is the key)")
    args = p.parse_args(argv)
    run_loop(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
