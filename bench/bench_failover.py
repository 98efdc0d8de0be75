"""Failover: from SIGKILL of an instance to its partitions processing again on another one.

Starts etcd, a ``chukcha node`` and two instances of ``failover_app:app`` (``chukcha run
--etcd``, 4 partitions, changelog on, lease TTL ``--ttl``); loads ``--keys`` keys of state
first. Each round SIGKILLs the instance owning partition 0, sends one probe event keyed to
partition 0 and measures the time until its receipt is on the bus (lease expiry + claim +
restore from the changelog + processing), then restarts the killed instance and waits until the
partitions are shared again. Prints each round, the median and the lease TTL; there are no
standbys yet, so the restore of the partition's state is inside the figure.

    .venv/bin/python bench/bench_failover.py                     # 10,000 keys, 5 rounds
    .venv/bin/python bench/bench_failover.py --keys 1000000 --rounds 5 --ttl 5
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

from chukcha import Client
from chukcha.bus.app_coordination import read_app
from chukcha.errors import ChukchaError
from chukcha.loop import run_loop
from chukcha.partitioning import partition_of
from chukcha.testing import NodeProcess, run_etcd

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
CLUSTER = "bench"


class Instance:
    def __init__(self, name: str, base: Path, node: str, etcd: str, ttl: int) -> None:
        self.name = name
        self.cmd = [sys.executable, "-m", "chukcha", "run", "failover_app:app", "--node", node,
                    "--state-dir", str(base / f"state-{name}"), "--etcd", etcd, "--cluster",
                    CLUSTER, "--instance", name, "--lease-ttl", str(ttl),
                    "--log-level", "WARNING"]
        self.log = base / f"{name}.log"
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


async def owners(etcd: str) -> dict[int, str]:
    view = await read_app((etcd,), CLUSTER, "failover")
    return {p: c.owner for p, c in view.claims.items()}


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 300.0) -> None:
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


async def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        base = Path(tmp)
        async with run_etcd(base) as etcd:
            node = NodeProcess(base / "node", "bench", ["--etcd", etcd.endpoint, "--cluster",
                                                        CLUSTER, "--log-level", "WARNING"])
            await node.start()
            instances = {n: Instance(n, base, node.url, etcd.endpoint, args.ttl)
                         for n in ("x", "y")}
            try:
                async with Client([node.url]) as client:
                    async def partitioned() -> bool:
                        try:
                            await client.create_partitions("events", 4)
                        except ChukchaError:  # the node's etcd session is not up yet
                            return False
                        return True

                    await until(partitioned, timeout=30)
                    await client.register_group("receipts", "bench-none")
                    for i in range(0, args.keys, 20_000):
                        batch = [{"id": f"load-{j}", "k": f"key{j}", "amount": 1}
                                 for j in range(i, min(i + 20_000, args.keys))]
                        await client.send("events", batch, key=lambda e: str(e["k"]))
                    for inst in instances.values():
                        await inst.start()

                    async def shared() -> bool:
                        o = await owners(etcd.endpoint)
                        return sorted(Counter(o.values()).values()) == [2, 2]

                    await until(shared)
                    seen: set[str] = set()
                    consumer = client.consumer("receipts")

                    async def has(event_id: str) -> bool:
                        for batch in await consumer.read(timeout=0.05):
                            for m in batch.messages():
                                seen.add(orjson.loads(m)["event"])
                        return event_id in seen

                    await until(functools.partial(has, f"load-{args.keys - 1}"))
                    print(f"{args.keys:,} keys loaded and processed; lease TTL {args.ttl} s; "
                          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
                    print(f"{'round':>5} {'failover s':>10}")
                    times: list[float] = []
                    for r in range(args.rounds):
                        victim = instances[(await owners(etcd.endpoint))[0]]
                        await victim.kill()
                        killed = time.perf_counter()
                        probe = f"probe-{r}"
                        await client.send("events", [{"id": probe, "k": key_in(0, probe),
                                                      "amount": 1}], key=lambda e: str(e["k"]))
                        await until(functools.partial(has, probe))
                        times.append(time.perf_counter() - killed)
                        print(f"{r + 1:>5} {times[-1]:>10.2f}")
                        await victim.start()
                        await until(shared)
                    await consumer.stop()
                print(f"median failover: {statistics.median(times):.2f} s (lease TTL {args.ttl} s,"
                      f" no standbys: the partition's state is restored from the bus)")
            finally:
                for inst in instances.values():
                    await inst.kill()
                await node.stop()
                node.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=10_000, help="keys of state before the kills")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ttl", type=int, default=3, help="the instances' lease TTL (s)")
    args = p.parse_args(argv)
    run_loop(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
