"""Throughput of one app run as 1, 2 and 4 instances (static split) on this machine.

Starts a ``chukcha node`` subprocess, creates the input ``events`` with ``--partitions``
partitions and loads N events of 200 bytes of JSON into it by key (``--keys`` distinct keys),
then, for each instance count (alternating, ``--runs`` rounds), starts that many
``chukcha run instances_app:app --instances K --instance-index I`` processes (each with its own
state directory, fsync per commit) as a fresh consumer group. The time of a run is from the
first instance logging that it runs to the last one printing that it applied its whole share
(each instance knows its share: the events whose key hashes to its partitions). Prints each run,
the medians and the ratios to one instance. On a machine with few cores the instances and the
node share them: quote the core count and the load with the figures.

    .venv/bin/python bench/bench_instances.py                    # 100,000 events, 3 rounds
    .venv/bin/python bench/bench_instances.py -n 300000 --runs 5 --counts 1,2,4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_processor import make_events

from chukcha import Client
from chukcha.loop import run_loop
from chukcha.partitioning import partition_of
from chukcha.processors.split import StaticSplit
from chukcha.testing import NodeProcess

__all__ = ["main"]

HERE = Path(__file__).resolve().parent


async def one_run(url: str, base: Path, name: str, count: int, *, partitions: int,
                  shares: list[int]) -> float:
    procs: list[asyncio.subprocess.Process] = []
    started: list[float] = []
    done: list[float] = []

    async def watch(proc: asyncio.subprocess.Process) -> None:
        out = proc.stdout
        if out is None:
            raise RuntimeError("no pipe")
        while line := await out.readline():
            if b" running categories=" in line:
                started.append(time.time())
            elif line.startswith(b"DONE "):
                done.append(float(line.split()[1]))
                return

    watchers = []
    for i in range(count):
        owned = StaticSplit(i, count).owned(partitions)
        env = {**os.environ, "BENCH_APP": name, "BENCH_PARTITIONS": str(partitions),
               "BENCH_EXPECT": str(sum(shares[p] for p in owned)), "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(HERE)}
        cmd = [sys.executable, "-m", "chukcha", "run", "instances_app:app", "--node", url,
               "--state-dir", str(base / f"{name}-{i}"), "--log-level", "INFO"]
        if count > 1:
            cmd += ["--instances", str(count), "--instance-index", str(i)]
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
        procs.append(proc)
        watchers.append(asyncio.create_task(watch(proc)))
    try:
        async with asyncio.timeout(600):
            await asyncio.gather(*watchers)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            await proc.wait()
    if len(done) != count:
        raise RuntimeError(f"only {len(done)} of {count} instances finished")
    return max(done) - min(started)


async def bench(args: argparse.Namespace) -> None:
    counts = [int(c) for c in args.counts.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-instances-") as tmp:
        base = Path(tmp)
        node = NodeProcess(base / "node", "bench", ["--log-level", "WARNING"])
        await node.start()
        try:
            events = make_events(args.events, args.keys)
            shares = [0] * args.partitions
            for i in range(args.events):
                shares[partition_of(f"key{i % args.keys:06d}", args.partitions)] += 1
            names = [f"bench{r}x{c}" for r in range(args.runs) for c in counts]
            async with Client([node.url]) as client:
                parts = await client.create_partitions("events", args.partitions)
                for name in names:  # every group registered before anything is acked
                    c = int(name.rsplit("x", 1)[1])
                    for p, part in enumerate(parts):  # a partition: its owner's group only
                        await client.register_group(part, StaticSplit(p % c, c).group(name))
                for i in range(0, len(events), 15_000):
                    await client.send("events", events[i:i + 15_000],
                                      key=lambda e: str(e["k"]))
            print(f"loaded {args.events:,} events of 200 B into {args.partitions} partitions; "
                  f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
            print(f"{'run':>4} {'instances':>9} {'seconds':>8} {'events/s':>10}")
            rates: dict[int, list[float]] = {c: [] for c in counts}
            for r in range(args.runs):
                for c in counts:
                    secs = await one_run(node.url, base, f"bench{r}x{c}", c,
                                         partitions=args.partitions, shares=shares)
                    rates[c].append(args.events / secs)
                    print(f"{r + 1:>4} {c:>9} {secs:>8.2f} {rates[c][-1]:>10,.0f}")
            first = statistics.median(rates[counts[0]])
            for c in counts:
                med = statistics.median(rates[c])
                print(f"median {c} instance(s): {med:,.0f} events/s "
                      f"({med / first:.2f}x {counts[0]} instance(s))")
            print(f"load average after: {os.getloadavg()[0]:.1f}")
        finally:
            await node.stop()
            node.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--events", type=int, default=100_000)
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--counts", default="1,2,4", metavar="K[,K...]")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    run_loop(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
