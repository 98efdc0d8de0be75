"""Catch-up with many small chunks vs a few large ones (issue 11, point 5).

The same history (``--mb`` MiB of 1 KiB messages) is written to node ``a`` as many small chunks
(``--small`` KiB each, via ``--max-chunk-size``) and as a few large ones (``--large`` MiB).
Then, per layout:

1. **replica catch-up**: node ``b`` starts (static ``--peers``) and downloads the history;
   MB/s = history size / (time from ``b`` serving until its listing equals ``a``'s).
2. **consumer walk**: a :class:`chukcha.client.Consumer` (no group) reads the whole history
   from ``a``, chunk after chunk; MB/s = history size / time until every byte was returned.
   Twice, alternating which goes first: with the default read-ahead and with
   ``read_ahead=0`` (one round trip per chunk, the consumer before read-ahead).

A fresh pair of node subprocesses per run; the load generator and both nodes share the cores.

    .venv/bin/python bench/bench_catchup.py                       # 3 runs, 128 MiB, medians
    .venv/bin/python bench/bench_catchup.py --runs 5 --mb 256 --small 64 --large 16

Before/after a change of the node: ``--baseline SRC`` runs, alternating with the current code,
nodes that import ``chukcha`` from ``SRC`` (a directory holding an older ``chukcha/``, e.g.
``git archive <commit> chukcha | tar -x -C /tmp/base``); the consumer is the current one.

    .venv/bin/python bench/bench_catchup.py --runs 3 --baseline /tmp/base --layouts small
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

import aiohttp

from chukcha.client import Client, ConsumerConfig
from chukcha.testing import ClusterProcess

__all__ = ["main"]

CATEGORY = "bench"
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


async def _listing(http: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with http.get(f"{url}/listChunks", params={"category": CATEGORY}) as r:
        return {c["name"]: c["size"] for c in (await r.json() or [])}


async def _fill(http: aiohttp.ClientSession, url: str, total: int, chunk: int) -> None:
    """Write ``total`` bytes in bodies of at most ``chunk`` (and 4 MiB), one at a time (so each
    small body fills exactly one chunk)."""
    body = (b"m" * 1023 + b"\n") * (min(chunk, 4 << 20) // 1024)
    for _ in range(max(1, total // len(body))):
        async with http.post(f"{url}/write", params={"category": CATEGORY}, data=body) as r:
            if r.status != 200:
                raise RuntimeError(await r.text())


async def _replica(http: aiohttp.ClientSession, cluster: ClusterProcess,
                   want: dict[str, int]) -> tuple[float, float]:
    """Seconds until ``b`` holds ``want``, and the CPU seconds both nodes used meanwhile."""
    a, b = cluster["a"], cluster["b"]
    await b.start()
    pids = [n.proc.pid if n.proc else None for n in (a, b)]
    cpu0 = sum([await asyncio.to_thread(_cpu_seconds, p) for p in pids])
    started = time.perf_counter()
    # The replica downloads in order: it holds everything once it holds the last message of
    # the last chunk (a cheap probe; a listing of 2,048 chunks every 10 ms would cost the
    # replica more CPU than the catch-up itself).
    last = max(want)
    params = {"category": CATEGORY, "chunk": last, "off": str(want[last] - 1024),
              "max_size": "1024"}
    while True:
        async with http.get(f"{b.url}/read", params=params) as r:
            if r.status == 200 and len(await r.read()) == 1024:
                break
        await asyncio.sleep(0.01)  # benchmark probe of the replica's state
    elapsed = time.perf_counter() - started
    if await _listing(http, b.url) != want:
        raise RuntimeError("the replica's listing differs from the owner's")
    cpu1 = sum([await asyncio.to_thread(_cpu_seconds, p) for p in pids])
    return elapsed, cpu1 - cpu0


async def _consume(url: str, size: int, config: ConsumerConfig) -> float:
    started = time.perf_counter()
    got = 0
    async with Client(url) as client, client.consumer(CATEGORY, config=config) as consumer:
        while got < size:
            for batch in await consumer.read(timeout=30):
                got += len(batch.data)
    return time.perf_counter() - started


async def one_run(base: Path, mb: int, chunk: int, flip: bool,
                  src: str | None) -> tuple[int, float, float, float, float]:
    """Returns (chunks, replica MB/s, replica MB per CPU-second of both nodes, consumer
    MB/s, consumer MB/s without read-ahead); the nodes import chukcha from ``src`` if set."""
    if src is not None:
        os.environ["PYTHONPATH"] = src
    else:
        os.environ.pop("PYTHONPATH", None)
    cluster = ClusterProcess(base, ("a", "b"), args=(
        "--log-level", "WARNING", "--max-chunk-size", str(chunk)))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        try:
            await asyncio.to_thread(base.mkdir, parents=True, exist_ok=True)
            a = cluster["a"]
            await a.start()
            await _fill(http, a.url, mb << 20, chunk)
            want = await _listing(http, a.url)
            size = sum(want.values())
            replica_s, cpu_s = await _replica(http, cluster, want)
            configs = [ConsumerConfig(), ConsumerConfig(read_ahead=0)]
            walks = [await _consume(a.url, size, cfg) for cfg in configs[::-1 if flip else 1]]
            ahead_s, plain_s = walks[::-1 if flip else 1]
            return (len(want), size / replica_s / 1e6, size / max(cpu_s, 0.01) / 1e6,
                    size / ahead_s / 1e6, size / plain_s / 1e6)
        finally:
            await cluster.stop()


async def amain(args: argparse.Namespace) -> None:
    layouts = [(f"{args.small} KiB chunks", args.small << 10),
               (f"{args.large} MiB chunks", args.large << 20)]
    if args.layouts != "both":
        layouts = layouts[:1] if args.layouts == "small" else layouts[1:]
    variants: list[tuple[str, str | None]] = [("", None)]
    if args.baseline:
        variants = [(" before", args.baseline), (" after", None)]
    runs = [(name + v, chunk, src) for name, chunk in layouts for v, src in variants]
    results: dict[str, list[tuple[int, float, float, float, float]]] = {
        n: [] for n, _, _ in runs}
    with tempfile.TemporaryDirectory(prefix="bench-catchup-") as tmp:
        for run in range(args.runs):
            order = runs if run % 2 == 0 else runs[::-1]
            for i, (name, chunk, src) in enumerate(order):  # side by side, alternating
                r = await one_run(Path(tmp) / f"run{run}-{i}", args.mb, chunk, run % 2 == 1, src)
                results[name].append(r)
                print(f"run {run + 1} {name}: {r[0]} chunks, replica {r[1]:.1f} MB/s "
                      f"({r[2]:.0f} MB per CPU-s), consumer {r[3]:.1f} MB/s "
                      f"(no read-ahead {r[4]:.1f})", file=sys.stderr)
    med = statistics.median
    print(f"\n{args.mb} MiB history, {args.runs} runs, medians; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'layout':25} {'chunks':>7} {'replica MB/s':>13} {'MB/CPU-s':>9} "
          f"{'consumer MB/s':>14} {'no read-ahead':>14}")
    for name, rs in results.items():
        print(f"{name:25} {rs[0][0]:>7} {med(r[1] for r in rs):>13.1f} "
              f"{med(r[2] for r in rs):>9.0f} {med(r[3] for r in rs):>14.1f} "
              f"{med(r[4] for r in rs):>14.1f}")
    print("(MB/CPU-s: history size per CPU-second used by both nodes during the catch-up; "
          "steadier than wall-clock MB/s on a busy machine)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mb", type=int, default=128, help="history size (MiB)")
    parser.add_argument("--small", type=int, default=64, help="small chunk size (KiB)")
    parser.add_argument("--large", type=int, default=16, help="large chunk size (MiB)")
    parser.add_argument("--layouts", choices=("both", "small", "large"), default="both",
                        help="which layouts to run (default both)")
    parser.add_argument("--baseline", metavar="SRC",
                        help="also run nodes importing chukcha from SRC (an older checkout's "
                             "directory holding chukcha/), alternating: before/after")
    args = parser.parse_args()
    if args.baseline:
        args.baseline = str(Path(args.baseline).resolve())
        # The nodes must not import the chukcha/ of the current directory (python -m puts it
        # first on sys.path): run them from elsewhere.
        os.chdir(tempfile.gettempdir())
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
