"""The repartitioning hop's throughput: one input stream copied by key into 8 partitions.

Starts a ``chukcha node`` subprocess, loads N events of 200 bytes of JSON into a plain category
(one owner stream), then runs the app's repartitioning stage
(:class:`chukcha.processors.repartition.Repartitioner`, the same object the runner uses) in
this process, pinned to one CPU: read a batch (the next one is read meanwhile), take each
event's key (a field), write the lines into ``<app>.events.pNNNN`` (confirmed by the node),
ack. A run ends when all N events are written; the copy is counted. Prints one row per run
and the median; ``--profile`` adds a cProfile summary of one more run. ``--compare`` alternates
each run with the hop as first released (:class:`BeforeRepartitioner`), so both are measured
side by side under the same load.

    .venv/bin/python bench/bench_repartition.py                 # 200,000 events, 3 runs
    .venv/bin/python bench/bench_repartition.py -n 500000 --runs 5 --profile
    .venv/bin/python bench/bench_repartition.py --runs 5 --compare
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from chukcha import App, Client, Context
from chukcha.codecs import splice_id
from chukcha.loop import run_loop
from chukcha.partitioning import partition_category
from chukcha.processors import ProcessorConfig
from chukcha.processors.repartition import Repartitioner, repartition_category
from chukcha.testing import NodeProcess

__all__ = ["main"]

CATEGORY = "events"


class BeforeRepartitioner(Repartitioner):
    """The hop as first released (its step and JSON routing, kept here to compare against): a
    full decode, a hash and a dict per event; each step's writes and ack awaited in turn."""

    async def step(self, batches: list[Any]) -> None:
        parts: dict[int, list[bytes]] = {}
        for b in batches:
            self._before_route(b, parts)
        if parts:
            await asyncio.gather(*(self._write(p, lines) for p, lines in parts.items()))
            self.events += sum(len(lines) for lines in parts.values())
        self.routed = self.events
        for b in batches:
            self._written[b.owner] = b.position
        await self.ack()

    def _before_route(self, b: Any, parts: dict[int, list[bytes]]) -> None:
        n, owned = self._partitions, self._owned
        key_fn, loads = self._app.handlers[self._handler].key, orjson.loads
        blake2b, from_bytes = hashlib.blake2b, int.from_bytes
        pos = b.offset
        for line in b.data[:-1].split(b"\n") if b.data else ():
            off = pos
            pos += len(line) + 1
            try:
                event = loads(line)
            except orjson.JSONDecodeError:
                event = None
            eid = event.get("id") if type(event) is dict else None
            if eid is None or eid == "":
                eid = f"{self.source}:{b.chunk}:{off}"
                if type(event) is dict and "id" not in event:
                    line = splice_id(line, eid)  # noqa: PLW2901
            key: Any = eid
            if key_fn is not None and event is not None:
                try:
                    key = key_fn(event)
                except Exception:  # noqa: BLE001
                    key = eid
            if type(key) is not str:
                key = str(key) if type(key) is int else str(eid)
            p = from_bytes(blake2b(key.encode(), digest_size=8).digest(), "big") % n
            if owned is None or p in owned:
                parts.setdefault(p, []).append(line)


def make_events(n: int, keys: int) -> list[bytes]:
    events = []
    for i in range(n):
        head = b'{"id":"ev-%010d","k":"key%06d","amount":%d,"pad":"' % (i, i % keys, i % 97)
        events.append(head + b"x" * (200 - len(head) - 2) + b'"}')
    return events


def by_customer(event: dict[str, Any]) -> str:
    key: str = event["k"]
    return key


async def one_run(url: str, group: str, n: int, partitions: int, batch: int, *,
                  before: bool = False) -> float:
    """Copy all ``n`` events; returns the seconds it took."""
    app = App(group, nodes=[url], partitions=partitions,
              config=ProcessorConfig(max_batch_bytes=batch))

    @app.processor(CATEGORY, key=by_customer)
    def on_event(ctx: Context, event: dict[str, Any]) -> None:  # the keyed stage: not run
        raise NotImplementedError

    target = repartition_category(group, CATEGORY)
    async with Client([url]) as client:
        await client.create_partitions(target, partitions)
        consumer = client.consumer(CATEGORY, group=group, max_batch_bytes=batch)
        kind = BeforeRepartitioner if before else Repartitioner
        hop = kind(app, client, consumer, source=CATEGORY, target=target,
                   partitions=partitions)
        started = time.perf_counter()
        read = asyncio.create_task(consumer.read(timeout=5.0))
        try:
            while hop.routed < n:
                batches = await read
                if not batches:
                    raise RuntimeError(f"the input ended after {hop.events} of {n} events")
                # As the runner does: read ahead while this batch is written.
                read = asyncio.create_task(consumer.read(timeout=5.0))
                await hop.step(batches)
            await hop.ack()  # the last writes
        finally:
            read.cancel()
            await asyncio.wait([read])
            await consumer.stop()
        elapsed = time.perf_counter() - started
        copied = 0
        for p in range(partitions):
            copied += sum(c.size for c in await client.list_chunks(partition_category(target, p)))
    if copied < n * 200:
        raise RuntimeError(f"the copy holds {copied} bytes, fewer than {n} events")
    return elapsed


async def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-repartition-") as tmp:
        base = Path(tmp)
        node = NodeProcess(base / "node", "bench", ["--log-level", "WARNING"])
        await node.start()
        try:
            cpus = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cpus[0]})  # the hop: one core (the node: any)
            kinds = ["before", "now"] if args.compare else ["now"]
            runs = args.runs * len(kinds) + (1 if args.profile else 0)
            groups = [f"hop{i}" for i in range(runs)]
            events = make_events(args.events, args.keys)
            async with Client([node.url]) as client:
                for g in groups:
                    await client.register_group(CATEGORY, g)
                for i in range(0, len(events), 15_000):
                    await client.send(CATEGORY, events[i:i + 15_000])
            print(f"loaded {args.events:,} events of 200 B (one owner stream); hop pinned to "
                  f"CPU {cpus[0]} of {len(cpus)}; {args.partitions} partitions")
            print(f"{'run':>5} {'routing':>7} {'events':>9} {'seconds':>8} {'events/s':>10}")
            rates: dict[str, list[float]] = {k: [] for k in kinds}
            for i in range(args.runs):
                for j, kind in enumerate(kinds):  # alternate: the same load for both
                    seconds = await one_run(node.url, groups[i * len(kinds) + j], args.events,
                                            args.partitions, args.batch,
                                            before=kind == "before")
                    rates[kind].append(args.events / seconds)
                    print(f"{i + 1:>5} {kind:>7} {args.events:>9,} {seconds:>8.2f} "
                          f"{rates[kind][-1]:>10,.0f}")
            medians = {k: statistics.median(r) for k, r in rates.items()}
            for kind in kinds:
                print(f"{'median':>5} {kind:>7} {'':>9} {'':>8} {medians[kind]:>10,.0f}")
            if args.compare:
                print(f"ratio now/before of the medians: {medians['now'] / medians['before']:.2f}"
                      f"; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                seconds = await one_run(node.url, groups[-1], args.events, args.partitions,
                                        args.batch)
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
                print(f"\nprofile (one run under cProfile: {args.events / seconds:,.0f} "
                      "events/s; top functions by own time)")
                print("\n".join(line for line in out.getvalue().splitlines()
                                if line.strip())[:5000])
        finally:
            await node.stop()
            node.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--events", type=int, default=200_000)
    p.add_argument("--keys", type=int, default=10_000, help="distinct keys")
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=1 << 20, help="max_batch_bytes per read")
    p.add_argument("--profile", action="store_true", help="add a cProfile summary")
    p.add_argument("--compare", action="store_true",
                   help="alternate each run with the first release's routing (side by side)")
    args = p.parse_args(argv)
    run_loop(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
