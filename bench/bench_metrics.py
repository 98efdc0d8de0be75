"""What metrics cost: single-message writes to a node with metrics on and one with them off.

Starts two ``chukcha node`` subprocesses, identical except for ``--no-metrics``, and writes
single messages to them in alternating rounds (on, off, on, off, ...), so machine load hits
both alike; halfway through both are restarted with their start order swapped (on a busy
machine the process started first was slower even when both ran without metrics). Prints
per-round throughput and the medians, and the ratio on/off (the target is at least 0.95), and
the node's CPU time per write (from ``/proc``), which machine load disturbs less than
throughput does on a shared machine. The bulk-write phase does the same with
1 MiB bodies of 100-byte messages (counting their messages is the one per-byte cost metrics
add).

    .venv/bin/python bench/bench_metrics.py                 # 8 rounds of 4000 writes, 8 conns
    .venv/bin/python bench/bench_metrics.py --rounds 24 -n 2000 --bulk-n 10
    .venv/bin/python bench/bench_metrics.py --on-arg=--no-metrics   # A/A: the noise here
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import uvloop
from bench_bus import RawHttp

from chukcha.testing import NodeProcess

__all__ = ["main"]


async def single_writes(address: str, category: str, n: int, size: int, conns: int) -> float:
    """Messages per second for ``n`` single-message writes over ``conns`` connections."""
    host, _, port = address.rpartition(":")
    body = b"x" * (size - 1) + b"\n"
    target = f"/write?category={category}"
    counter = iter(range(n))

    async def worker() -> None:
        http = await RawHttp.connect(host, int(port))
        try:
            for _ in counter:
                status, data = await http.post(target, body)
                if status != 200:
                    raise RuntimeError(f"write failed: {status} {data!r}")
        finally:
            await http.close()

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(conns):
            tg.create_task(worker())
    return n / (time.perf_counter() - t0)


async def bulk_writes(address: str, category: str, n: int, conns: int) -> float:
    """MB per second for ``n`` writes of 1 MiB bodies (100-byte messages)."""
    host, _, port = address.rpartition(":")
    body = (b"y" * 99 + b"\n") * ((1 << 20) // 100)
    target = f"/write?category={category}"
    counter = iter(range(n))

    async def worker() -> None:
        http = await RawHttp.connect(host, int(port))
        try:
            for _ in counter:
                status, data = await http.post(target, body)
                if status != 200:
                    raise RuntimeError(f"write failed: {status} {data!r}")
        finally:
            await http.close()

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(conns):
            tg.create_task(worker())
    return n * len(body) / (time.perf_counter() - t0) / 1e6


def cpu_seconds(node: NodeProcess) -> float:
    """utime + stime of the node's process (Linux ``/proc``)."""
    if node.proc is None:
        raise RuntimeError("node is not running")
    fields = Path(f"/proc/{node.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace) -> int:
    single: dict[str, list[float]] = {"on": [], "off": []}
    bulk: dict[str, list[float]] = {"on": [], "off": []}
    cpu = {"on": 0.0, "off": 0.0}
    flags = {"on": list(args.on_arg), "off": ["--no-metrics"]}
    # Two halves with the processes' roles swapped: on a busy machine the process started
    # first was measurably slower even when both ran the same configuration (an A/A run).
    for half, slots in enumerate((("on", "off"), ("off", "on"))):
        with tempfile.TemporaryDirectory(prefix="chukcha-bench-metrics-") as tmp:
            nodes = {name: NodeProcess(Path(tmp) / name, name,
                                       ["--log-level", "WARNING", *flags[name]])
                     for name in slots}
            try:
                for name in slots:
                    await nodes[name].start()
                for r in range(half * args.rounds // 2, (half + 1) * args.rounds // 2):
                    order = ("on", "off") if r % 2 == 0 else ("off", "on")  # neither first
                    for name in order:
                        before = cpu_seconds(nodes[name])
                        single[name].append(await single_writes(
                            nodes[name].address, f"s{r}", args.n, args.s, args.c))
                        cpu[name] += cpu_seconds(nodes[name]) - before
                    for name in order:
                        bulk[name].append(await bulk_writes(
                            nodes[name].address, f"b{r}", args.bulk_n, args.c))
                    print(f"round {r + 1}: single on {single['on'][-1]:8.0f} off "
                          f"{single['off'][-1]:8.0f} msg/s | bulk on {bulk['on'][-1]:6.0f} "
                          f"off {bulk['off'][-1]:6.0f} MB/s", flush=True)
            finally:
                for node in nodes.values():
                    await node.stop()
                    node.close()
    args.rounds = len(single["on"])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nmetrics cost, {args.rounds} alternating rounds, {args.c} connections, "
          f"load average {load}")
    print(f"{'phase':<30} {'on (median)':>12} {'off (median)':>13} {'on/off':>7} "
          f"{'median of round ratios':>23}")
    for phase, unit, data in (("single-message writes", "msg/s", single),
                              ("1 MiB writes", "MB/s", bulk)):
        on, off = statistics.median(data["on"]), statistics.median(data["off"])
        paired = statistics.median(a / b for a, b in zip(data["on"], data["off"], strict=True))
        print(f"{phase + ' (' + unit + ')':<30} {on:12.0f} {off:13.0f} {on / off:7.3f} "
              f"{paired:23.3f}")
    writes = args.rounds * args.n
    per = {name: cpu[name] / writes * 1e6 for name in cpu}
    print(f"{'node CPU per single write (us)':<30} {per['on']:12.1f} {per['off']:13.1f} "
          f"{per['off'] / per['on']:7.3f}  (off/on: the throughput ratio when CPU-bound)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("-n", type=int, default=4000, help="single-message writes per round")
    parser.add_argument("-s", type=int, default=100, help="message size in bytes")
    parser.add_argument("-c", type=int, default=8, help="connections")
    parser.add_argument("--on-arg", action="append", default=[],
                        help="an extra flag for the 'on' node (--on-arg=--no-metrics: an A/A "
                             "run that shows this machine's noise)")
    parser.add_argument("--bulk-n", type=int, default=100, help="1 MiB writes per round")
    args = parser.parse_args(argv)
    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
