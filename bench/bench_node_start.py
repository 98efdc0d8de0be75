"""How long ``chukcha node --workers N`` takes to start, and what the start costs.

Starts the node again and again (each run on a fresh data directory and a socket bound here)
and prints, per tree and worker count, the medians of:

- *first 200*: from the spawn until ``/listCategories`` answers 200 (what tests and scripts
  wait for; with workers, the writer serves it, and a front accepts only once the writer
  answers it);
- *settled*: until every process of the node has been idle for 0.2 s (from ``/proc``: the
  fronts' start-up is over too);
- *CPU*: the CPU seconds all the node's processes used until then (the steadiest figure on a
  shared machine);
- *PSS*: the memory of all the node's processes then (proportional set size: a page shared by
  several processes counts a share in each).

With ``--baseline SRC`` the same runs use the package in another source tree
(``git archive main | tar -x -C /tmp/before``), alternating with this tree's runs so machine
load hits both alike.

    .venv/bin/python bench/bench_node_start.py --runs 9 --workers 1,4
    .venv/bin/python bench/bench_node_start.py --runs 9 --workers 4 --baseline /tmp/before
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

from chukcha.testing import bind_loopback

__all__ = ["main"]

_TICK = os.sysconf("SC_CLK_TCK")


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (from ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _pss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in rollup.splitlines()
                     if line.startswith("Pss:"))
    return total / 1024


def _cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


async def one_start(workers: int, source: str | None) -> tuple[float, float, float, float]:
    """(first 200, settled, CPU seconds, PSS MiB) of one start."""
    sock = bind_loopback()  # SO_REUSEPORT: each worker binds its own socket on the port
    port = sock.getsockname()[1]
    env = dict(os.environ)
    if source is not None:  # PYTHONSAFEPATH: `-m` would put the working directory first
        env.update(PYTHONPATH=source, PYTHONSAFEPATH="1")
    with tempfile.TemporaryDirectory(prefix="chukcha-bench-start-") as tmp:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chukcha", "node", "--instance", "start", "--dirname",
            str(Path(tmp) / "data"), "--listen", f"127.0.0.1:{port}", "--listen-fd",
            str(sock.fileno()), "--workers", str(workers), "--log-level", "WARNING",
            pass_fds=[sock.fileno()], env=env)
        try:
            async with aiohttp.ClientSession() as http:
                while True:
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/listCategories") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    if proc.returncode is not None:
                        raise RuntimeError(f"the node exited with {proc.returncode}")
                    await asyncio.sleep(0.01)
            first = time.monotonic() - started
            # Settled: every process idle for 0.2 s (sampled every 50 ms).
            last, idle_since = _cpu(_tree(proc.pid)), time.monotonic()
            while time.monotonic() - idle_since < 0.2:
                await asyncio.sleep(0.05)
                now = _cpu(_tree(proc.pid))
                if now != last:
                    last, idle_since = now, time.monotonic()
            settled = idle_since - started
            return first, settled, last, _pss_mib(_tree(proc.pid))
        finally:
            proc.terminate()
            await proc.wait()
            sock.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--workers", default="1,4", help="comma-separated worker counts")
    p.add_argument("--baseline", metavar="SRC", help="another source tree, run alternately")
    args = p.parse_args()
    variants: list[tuple[str, str | None]] = [("this tree", None)]
    if args.baseline:
        variants.append(("baseline", args.baseline))
    counts = [int(w) for w in args.workers.split(",")]
    results: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    for run in range(args.runs):
        order = variants if run % 2 == 0 else variants[::-1]
        for workers in counts:
            for name, source in order:
                results.setdefault((name, workers), []).append(
                    await one_start(workers, source))
    print(f"load average {os.getloadavg()[0]:.1f} (1 min) at the end; {args.runs} runs each\n")
    print("| tree | workers | first 200 (s) | settled (s) | CPU (s) | PSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for (name, workers), rows in results.items():
        med = [statistics.median(col) for col in zip(*rows, strict=True)]
        print(f"| {name} | {workers} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.2f} | "
              f"{med[3]:.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
