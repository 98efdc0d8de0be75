"""Failover: from SIGKILL of an instance to its partitions processing again on another one,
without and with standbys, side by side in one run.

Starts etcd, a ``chukcha node`` and, for each setup, two instances of the same app
(``failover_app:app`` without standbys, ``failover_app:app_sb`` with ``--standbys N``;
``chukcha run --etcd``, 4 partitions, changelog on, lease TTL ``--ttl``); loads ``--keys`` keys
of state first (both apps read the same input). Each round, for each setup in turn, SIGKILLs
the instance owning partition 0, sends one probe event keyed to partition 0 and measures the
time until its receipt is on the bus, then restarts the killed instance (same state directory)
and waits until the partitions (and standbys) are shared again. From the survivor's log each
failover is split into: **detect** (kill -> the survivor's claim of partition 0: the lease
expiring in etcd and the watch telling the survivor), **ready** (claim -> partition 0 started:
the restore from the bus, or a standby's tail), and **first** (started -> the probe's receipt on
the bus: reading, processing, commit, changelog, emit). Prints each round and the medians.

    .venv/bin/python bench/bench_failover.py                     # 10,000 keys, 3 rounds
    .venv/bin/python bench/bench_failover.py --keys 1000000 --rounds 3 --ttl 3 --standbys 1
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from chukcha import Client
from chukcha.bus.app_coordination import AppView, read_app
from chukcha.client.consumer import Consumer
from chukcha.errors import ChukchaError
from chukcha.loop import run_loop
from chukcha.partitioning import partition_of
from chukcha.testing import NodeProcess, run_etcd

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
CLUSTER = "bench"
_CLAIMED = re.compile(r"^(\S+ \S+) INFO \S+: app=\S+ instance=\S+ partition 0 claimed")
_STARTED = re.compile(r"^(\S+ \S+) INFO \S+: app=\S+ instance=\S+ partition 0 assigned "
                      r"\(epoch \d+\): (.*); started in")


class Instance:
    def __init__(self, name: str, base: Path, node: str, etcd: str, *,
                 args: argparse.Namespace, setup: Setup) -> None:
        self.name = name
        self.cmd = [sys.executable, "-m", "chukcha", "run", f"failover_app:{setup.target}",
                    "--node", node, "--state-dir", str(base / f"state-{setup.app}-{name}"),
                    "--etcd", etcd, "--cluster", CLUSTER, "--instance", name,
                    "--lease-ttl", str(args.ttl), "--standbys", str(setup.standbys),
                    "--log-level", "INFO"]
        self.log = base / f"{setup.app}-{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log = await asyncio.to_thread(self.log.open, "ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.cmd, stdout=log, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(HERE)})
        finally:
            log.close()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0


@dataclass
class Setup:
    app: str
    target: str
    receipts: str
    standbys: int
    instances: dict[str, Instance] = field(default_factory=dict)
    consumer: Consumer | None = None
    seen: set[str] = field(default_factory=set)
    rows: list[tuple[float, float, float, float, str]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"standbys={self.standbys}"


async def view_of(etcd: str, app: str) -> AppView:
    return await read_app((etcd,), CLUSTER, app)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 600.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.02)  # polling the bus/etcd for the condition, bounded


def key_in(partition: int, tag: str) -> str:
    i = 0
    while partition_of(f"{tag}-{i}", 4) != partition:
        i += 1
    return f"{tag}-{i}"


def log_time(stamp: str) -> float:
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local, as logged


def phases(log: Path, offset: int) -> tuple[float | None, float | None, str]:
    """The survivor's claim and start of partition 0 (wall clock) after ``offset`` in its
    log, and how its store was made current."""
    claimed = started = None
    how = "?"
    with log.open("rb") as f:
        f.seek(offset)
        for raw in f:
            line = raw.decode(errors="replace")
            if claimed is None and (m := _CLAIMED.match(line)):
                claimed = log_time(m.group(1))
            elif m := _STARTED.match(line):
                started, how = log_time(m.group(1)), m.group(2)
    return claimed, started, how


async def settled(etcd: str, setup: Setup) -> bool:
    view = await view_of(etcd, setup.app)
    if sorted(Counter(c.owner for c in view.claims.values()).values()) != [2, 2]:
        return False
    return not setup.standbys or all(
        view.standbys.get(p) == {"x", "y"} - {view.claims[p].owner} for p in range(4))


async def has(setup: Setup, event_id: str) -> bool:
    if setup.consumer is None:
        raise RuntimeError("no receipts consumer")
    for batch in await setup.consumer.read(timeout=0.05):
        for m in batch.messages():
            setup.seen.add(orjson.loads(m)["event"])
    return event_id in setup.seen


async def failover(client: Client, etcd: str, setup: Setup, tag: str) -> None:
    owner = (await view_of(etcd, setup.app)).claims[0].owner
    victim = setup.instances[owner]
    survivor = next(i for n, i in setup.instances.items() if n != owner)
    offset = survivor.log_size()
    await victim.kill()
    killed, killed_wall = time.perf_counter(), time.time()
    probe = f"probe-{setup.app}-{tag}"
    await client.send("events", [{"id": probe, "k": key_in(0, probe), "amount": 1}],
                      key=lambda e: str(e["k"]))
    await until(functools.partial(has, setup, probe))
    total, done_wall = time.perf_counter() - killed, time.time()
    claimed, started, how = await asyncio.to_thread(phases, survivor.log, offset)
    detect = (claimed - killed_wall) if claimed else float("nan")
    ready = (started - claimed) if started and claimed else float("nan")
    first = (done_wall - started) if started else float("nan")
    setup.rows.append((total, detect, ready, first, how))
    print(f"{tag:>5} {setup.label:>10} {total:>8.2f} {detect:>7.2f} {ready:>7.2f} "
          f"{first:>7.2f}  {how}  (load {os.getloadavg()[0]:.1f})", flush=True)
    await victim.start()
    await until(functools.partial(settled, etcd, setup))
    # Let the restarted instance's standby copies catch up (steady state before the next
    # kill); a warm-up probe shows partition 0 processing again.
    warm = f"warm-{setup.app}-{tag}"
    await client.send("events", [{"id": warm, "k": key_in(0, warm), "amount": 1}],
                      key=lambda e: str(e["k"]))
    await until(functools.partial(has, setup, warm))
    await asyncio.sleep(3)  # a bench's settle time, not a test's synchronisation


def make_setups(args: argparse.Namespace) -> list[Setup]:
    setups = [Setup("failover", "app", "receipts", 0)]
    if args.standbys:
        setups.append(Setup("failover-sb", "app_sb", "receipts-sb", args.standbys))
    if args.only == "with":
        return setups[1:]
    if args.only == "without":
        return setups[:1]
    return setups


def report(args: argparse.Namespace, setups: list[Setup]) -> None:
    print(f"medians ({args.keys:,} keys, lease TTL {args.ttl} s, "
          f"load {os.getloadavg()[0]:.1f} at the end):")
    for s in setups:
        cols = list(zip(*s.rows, strict=True))
        med = [statistics.median(c) for c in cols[:4]]
        print(f"  {s.label:>10}: total {med[0]:.2f} s (min {min(cols[0]):.2f}, "
              f"max {max(cols[0]):.2f}); detect {med[1]:.2f}, ready {med[2]:.2f}, "
              f"first {med[3]:.2f}")


async def bench(args: argparse.Namespace) -> None:
    setups = make_setups(args)
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        base = Path(tmp)
        async with run_etcd(base) as etcd:
            node = NodeProcess(base / "node", "bench", ["--etcd", etcd.endpoint, "--cluster",
                                                        CLUSTER, "--log-level", "WARNING"])
            await node.start()
            try:
                async with Client([node.url]) as client:
                    async def partitioned() -> bool:
                        try:
                            await client.create_partitions("events", 4)
                        except ChukchaError:  # the node's etcd session is not up yet
                            return False
                        return True

                    await until(partitioned, timeout=30)
                    for s in setups:
                        await client.register_group(s.receipts, "bench-none")
                    for i in range(0, args.keys, 20_000):
                        batch = [{"id": f"load-{j}", "k": f"key{j}", "amount": 1}
                                 for j in range(i, min(i + 20_000, args.keys))]
                        await client.send("events", batch, key=lambda e: str(e["k"]))
                    loaded = time.perf_counter()
                    for s in setups:
                        s.instances = {n: Instance(n, base, node.url, etcd.endpoint,
                                                     args=args, setup=s)
                                       for n in ("x", "y")}
                        for inst in s.instances.values():
                            await inst.start()
                        s.consumer = client.consumer(s.receipts)
                    for s in setups:
                        await until(functools.partial(settled, etcd.endpoint, s))
                        await until(functools.partial(has, s, f"load-{args.keys - 1}"))
                    print(f"{args.keys:,} keys loaded and processed by {len(setups)} app(s) in "
                          f"{time.perf_counter() - loaded:.0f} s; lease TTL {args.ttl} s; "
                          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
                    await asyncio.sleep(3)  # settle: the standbys' first catch-up
                    print(f"{'round':>5} {'setup':>10} {'total s':>8} {'detect':>7} "
                          f"{'ready':>7} {'first':>7}  how partition 0 was made current")
                    for r in range(args.rounds):
                        for s in setups:
                            await failover(client, etcd.endpoint, s, str(r + 1))
                    for s in setups:
                        if s.consumer is not None:
                            await s.consumer.stop()
                report(args, setups)
            finally:
                for s in setups:
                    for inst in s.instances.values():
                        await inst.kill()
                await node.stop()
                node.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=10_000, help="keys of state before the kills")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ttl", type=int, default=3, help="the instances' lease TTL (s)")
    p.add_argument("--standbys", type=int, default=1,
                   help="standbys of the second setup (0: only the setup without)")
    p.add_argument("--only", choices=["both", "with", "without"], default="both",
                   help="run one setup only")
    args = p.parse_args(argv)
    run_loop(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
