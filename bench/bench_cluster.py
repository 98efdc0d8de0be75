"""Cluster benchmark: replication catch-up, ``min_sync_replicas=1`` latency, idle CPU.

Three ``chukcha node`` subprocesses on loopback with static ``--peers``
(:class:`chukcha.testing.ClusterProcess`), a fresh cluster per run:

1. **catch-up**: node ``a`` alone receives ``--mb`` MiB; then ``b`` and ``c`` start and download
   it. Reported per replica: history size / (time from its start until it holds every chunk).
2. **min_sync=1**: ``-n`` sequential single-message writes to ``a`` with ``min_sync_replicas=1``
   (each answers only after a replica downloaded it and reported back); p50 / p99 latency.
3. **idle CPU**: user+system CPU of each node process over ``--idle`` seconds with nothing to do
   (from ``/proc/<pid>/stat``), as a percentage of one core.

    .venv/bin/python bench/bench_cluster.py                 # 3 runs, medians
    .venv/bin/python bench/bench_cluster.py --runs 5 --mb 512

The load generator and all three nodes share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from chukcha.testing import ClusterProcess

__all__ = ["RunResult", "main"]

CATEGORY = "bench"
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class RunResult:
    catchup_mb_s: tuple[float, ...]  # per replica
    catchup_mb_per_cpu_s: tuple[float, ...]  # per replica: MB replicated per CPU-second used
    sync_p50_ms: float
    sync_p99_ms: float
    idle_cpu_pct: tuple[float, ...]  # per node


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


async def _listing(http: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with http.get(f"{url}/listChunks", params={"category": CATEGORY}) as r:
        return {c["name"]: c["size"] for c in (await r.json() or [])}


async def _fill(http: aiohttp.ClientSession, url: str, total: int) -> None:
    body = (b"m" * 1023 + b"\n") * 4096  # 4 MiB writes of 1 KiB messages
    sem = asyncio.Semaphore(4)

    async def one() -> None:
        async with sem, http.post(f"{url}/write", params={"category": CATEGORY},
                                  data=body) as r:
            if r.status != 200:
                raise RuntimeError(await r.text())

    await asyncio.gather(*(one() for _ in range(max(1, total // len(body)))))


async def _wait_copy(http: aiohttp.ClientSession, url: str, want: dict[str, int]) -> float:
    while True:
        if await _listing(http, url) == want:
            return time.perf_counter()
        await asyncio.sleep(0.01)  # benchmark probe of the replica's state


async def one_run(base: Path, mb: int, n_sync: int, idle: float) -> RunResult:
    cluster = ClusterProcess(base, ("a", "b", "c"), args=("--log-level", "WARNING"))
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            await asyncio.to_thread(base.mkdir, parents=True, exist_ok=True)
            a, b, c = cluster["a"], cluster["b"], cluster["c"]
            await a.start()
            await _fill(http, a.url, mb << 20)
            want = await _listing(http, a.url)
            size = sum(want.values())
            await asyncio.gather(b.start(), c.start())
            # Node start-up (a Python process) is not replication: count from when both serve.
            # They may have downloaded a little before that, so this slightly flatters.
            started = time.perf_counter()
            replica_pids = [n.proc.pid for n in (b, c) if n.proc is not None]
            cpu0 = [await asyncio.to_thread(_cpu_seconds, p) for p in replica_pids]
            done = await asyncio.gather(*(_wait_copy(http, n.url, want) for n in (b, c)))
            cpu1 = [await asyncio.to_thread(_cpu_seconds, p) for p in replica_pids]
            catchup = tuple(size / max(d - started, 1e-3) / 1e6 for d in done)
            # Wall-clock figures depend on what else runs on the machine; CPU per MB does not.
            per_cpu = tuple(size / max(y - x, 0.01) / 1e6 for x, y in zip(cpu0, cpu1,
                                                                          strict=True))
            await cluster.wait_connected()

            lat: list[float] = []
            for i in range(n_sync):
                t = time.perf_counter()
                async with http.post(f"{a.url}/write", params={
                    "category": "sync", "min_sync_replicas": "1",
                }, data=f"single message {i}\n".encode()) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(await r.text())
                lat.append(time.perf_counter() - t)
            lat.sort()

            pids = [n.proc.pid for n in (a, b, c) if n.proc is not None]
            before = [await asyncio.to_thread(_cpu_seconds, p) for p in pids]
            t1 = time.perf_counter()
            await asyncio.sleep(idle)  # measuring idleness: nothing else to wait for
            elapsed = time.perf_counter() - t1
            after = [await asyncio.to_thread(_cpu_seconds, p) for p in pids]
            cpu = tuple(100 * (y - x) / elapsed for x, y in zip(before, after, strict=True))
            return RunResult(catchup, per_cpu, lat[len(lat) // 2] * 1e3,
                             lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, cpu)
        finally:
            await cluster.stop()


async def amain(args: argparse.Namespace) -> None:
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        for run in range(args.runs):
            r = await one_run(Path(tmp) / f"run{run}", args.mb, args.n, args.idle)
            results.append(r)
            print(f"run {run + 1}: catch-up {', '.join(f'{x:.0f}' for x in r.catchup_mb_s)} "
                  f"MB/s ({', '.join(f'{x:.0f}' for x in r.catchup_mb_per_cpu_s)} MB per "
                  f"CPU-s); min_sync=1 p50 {r.sync_p50_ms:.2f} ms p99 {r.sync_p99_ms:.2f} ms; "
                  f"idle CPU {', '.join(f'{x:.2f}' for x in r.idle_cpu_pct)} %",
                  file=sys.stderr)
    med = statistics.median
    rows = [
        ("replication catch-up per replica",
         f"{med(x for r in results for x in r.catchup_mb_s):.0f}", "MB/s", ">= 200 (Go ~60)"),
        ("catch-up cost per replica",
         f"{med(x for r in results for x in r.catchup_mb_per_cpu_s):.0f}", "MB/CPU-s",
         "(wall-clock figure / this = cores busy)"),
        ("min_sync_replicas=1 write p50", f"{med(r.sync_p50_ms for r in results):.2f}", "ms",
         "< 5 (Go 29)"),
        ("min_sync_replicas=1 write p99", f"{med(r.sync_p99_ms for r in results):.2f}", "ms", ""),
        ("idle CPU per node", f"{med(x for r in results for x in r.idle_cpu_pct):.2f}",
         "% of a core", "< 1 (Go ~4)"),
    ]
    print(f"\n3 nodes on loopback, {args.runs} runs, {args.mb} MiB history, "
          f"{args.n} min_sync writes, {args.idle:g} s idle; medians; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'measure':36} {'value':>9} {'unit':12} target")
    for name, value, unit, target in rows:
        print(f"{name:36} {value:>9} {unit:12} {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mb", type=int, default=256, help="history size for catch-up (MiB)")
    parser.add_argument("-n", type=int, default=1000, help="min_sync_replicas=1 writes")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle measurement")
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
