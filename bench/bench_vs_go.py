"""Side by side with the Go server: the table of issue 10, in one run, with ratios.

For each run, a fresh Go node (``--go PATH``, the original server's binary) and a fresh node of
ours are started one after the other (each run starts with the next one in turn) on temporary
directories and driven by the same load generator (``bench_bus``'s minimal keep-alive client):

- single-message writes (100 B) over 8 and over 64 connections;
- bulk writes of 100 B messages in 1 MiB batches over 4 connections, then bulk reads of all of
  it (1 MiB per ``/read``), every byte verified;
- ``sync=1`` single-message writes over 64 connections, ours with and without group commit
  (the Go server has no per-request fsync: its column is its plain write rate, for reference);
- mixed traffic (``--only mixed``, not in the default set): bulk writers (1 MiB bodies, 4
  connections, for ``--mixed-seconds``) and, at the same time on 8 other connections, small
  single writes to another category, each connection sending one every 2 ms: the small
  writes' p50/p99/max (what a user with mixed traffic sees while a bulk loader runs) and the
  bulk MB/s; every byte written is accounted for (``/listChunks`` sizes).

Every phase checks that what was written is read back exactly once. Medians over ``--runs``.

    .venv/bin/python bench/bench_vs_go.py --go ../shared/bin/chukcha-go
    .venv/bin/python bench/bench_vs_go.py --go PATH --runs 3 --single-n 60000 -n 3000000
    .venv/bin/python bench/bench_vs_go.py --go PATH --node-arg=--workers=16   # other flags
    .venv/bin/python bench/bench_vs_go.py --go PATH --only bulk --runs 5   # bulk phases only
    .venv/bin/python bench/bench_vs_go.py --go PATH --baseline /tmp/main-src   # before/after
    .venv/bin/python bench/bench_vs_go.py --go PATH --only mixed --runs 5  # small during bulk

The load generator shares the machine with the node under test (on 2 cores it takes about one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import uvloop
from bench_bus import (
    RawHttp,
    Result,
    Verifier,
    _Collect,
    _cpu_seconds,
    _read_all_raw,
    _single_raw,
    _write_all_raw,
    make_batches,
)

from chukcha.testing import NodeProcess, bind_loopback

__all__ = ["main"]

_S = 100  # message size


@dataclasses.dataclass
class Target:
    name: str
    address: str
    pid: int | None


@contextlib.asynccontextmanager
async def _go(path: str) -> AsyncIterator[Target]:
    with tempfile.TemporaryDirectory(prefix="chukcha-bench-go-") as tmp:
        sock = bind_loopback()
        port = sock.getsockname()[1]
        sock.close()  # the Go server binds by itself
        address = f"127.0.0.1:{port}"
        proc = await asyncio.create_subprocess_exec(
            path, "-instance", "gobench", "-dirname", tmp, "-listen", address,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            await _wait_ready(address, proc)
            yield Target("go", address, proc.pid)
        finally:
            proc.terminate()
            await proc.wait()


@contextlib.asynccontextmanager
async def _ours(args: Sequence[str], source: str | None = None) -> AsyncIterator[Target]:
    with tempfile.TemporaryDirectory(prefix="chukcha-bench-py-") as tmp:
        node = NodeProcess(Path(tmp) / "data", "pybench", ["--log-level", "WARNING", *args])
        try:
            if source is None:
                await node.start()
            else:  # the node's package from another source tree (before/after in one run)
                # PYTHONSAFEPATH: `python -m` puts the working directory first on sys.path,
                # before PYTHONPATH, which made the baseline run this tree's package.
                saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PYTHONSAFEPATH")}
                # Entries already there stay, after it (bench/loop_holds, a profiler's hook).
                path = os.pathsep.join(p for p in (source, saved["PYTHONPATH"]) if p)
                os.environ.update(PYTHONPATH=path, PYTHONSAFEPATH="1")
                try:
                    await node.start()
                finally:
                    for key, value in saved.items():
                        if value is None:
                            os.environ.pop(key, None)
                        else:
                            os.environ[key] = value
            pid = node.proc.pid if node.proc is not None else None
            yield Target("ours", node.address, pid)
        finally:
            await node.stop()
            node.close()


async def _wait_ready(address: str, proc: asyncio.subprocess.Process) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + 15
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"the Go server exited with {proc.returncode}")
        try:
            http = await RawHttp.connect(host, int(port))
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        await http.close()
        return


def _workers(pid: int | None) -> list[tuple[str, int]]:
    """``pid`` and the workers it forked (a ``--workers`` node's writer and fronts), each with
    its role: ``writer`` (named ``chukcha-writer``, or the first child of a tree that does not
    name them), ``front``, or ``node`` (a single process)."""
    if pid is None:
        return []
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        kids = []
    if not kids:
        return [("node", pid)]
    found: list[tuple[str, int]] = [("supervisor", pid)]
    for i, kid in enumerate(sorted(kids)):
        try:
            comm = Path(f"/proc/{kid}/comm").read_text().strip()
        except OSError:
            continue
        named = comm.removeprefix("chukcha-")
        found.append((named if named in ("writer", "front") else
                      "writer" if i == 0 else "front", kid))
    return found


def _cpu_by_role(pid: int | None) -> dict[str, float]:
    """CPU seconds of ``pid``'s processes, by role (:func:`_workers`), and ``all``."""
    if pid is None:
        return {"all": float("nan")}
    by: dict[str, float] = {"all": 0.0}
    for role, p in _workers(pid):
        with contextlib.suppress(OSError):
            used = _cpu_seconds(p)
            by[role] = by.get(role, 0.0) + used
            by["all"] += used
            if role == "front":
                by[f"front {p}"] = used
    return by


def _connections(pid: int | None, port: int) -> dict[str, int]:
    """Established TCP connections on ``port`` each of ``pid``'s processes holds, by role
    (fronts one by one): how evenly the clients are spread."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "01":  # ESTABLISHED
                    inodes.add(f[9])
    held: dict[str, int] = {}
    fronts = 0
    for role, p in _workers(pid):
        if role == "supervisor":
            continue
        n = 0
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{p}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = str(fd.readlink())
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        n += 1
        if role == "front":
            fronts += 1
        held[f"f{fronts}" if role == "front" else role] = n
    return held


async def _writes_served(address: str) -> float:
    """The ``/write`` requests the node's writer answered so far, from its ``/metrics`` (with
    ``--workers``, a front's coalesced batch is one); NaN without metrics."""
    host, _, port = address.rpartition(":")
    http = await RawHttp.connect(host, int(port))
    try:
        status, text = await http.get("/metrics")
    finally:
        await http.close()
    if status != 200:
        return float("nan")
    return sum(float(line.rsplit(b" ", 1)[1]) for line in text.splitlines()
               if line.startswith(b'chukcha_http_requests_total{endpoint="/write"'))


async def _measured(pid: int | None, phase: Awaitable[Result], port: int = 0,
                    address: str = "") -> Result:
    before = _cpu_by_role(pid)
    writes0 = await _writes_served(address) if address else float("nan")
    seen: dict[str, int] = {}

    async def watch() -> None:  # the spread once the phase's connections are open
        await asyncio.sleep(0.3)
        seen.update(_connections(pid, port))

    watcher = asyncio.ensure_future(watch()) if port else None
    result = await phase
    if watcher is not None:
        watcher.cancel()
    after = _cpu_by_role(pid)
    writes = await _writes_served(address) - writes0 if address else float("nan")
    used = {k: after[k] - before.get(k, 0.0) for k in after}
    s = result.seconds
    result = dataclasses.replace(
        result, node_cpu=used["all"] / s, writer_writes=writes,
        conns=" ".join(f"{k if k.startswith('f') else k[0]}:{v}" for k, v in seen.items())
        if len(seen) > 1 else "")
    if "writer" in used:
        result = dataclasses.replace(
            result, writer_cpu=used["writer"] / s, fronts_cpu=used.get("front", 0.0) / s,
            busiest_front_cpu=max((v for k, v in used.items() if k.startswith("front ")),
                                  default=0.0) / s)
    return result


async def _check_single(address: str, category: str, n: int) -> None:
    pieces: list[bytes] = []
    await _read_all_raw(f"http://{address}", 1 << 20, 1, category, lambda _: _Collect(pieces))
    lines = b"".join(pieces).split(b"\n")[:-1]
    if sorted(int(x[:11]) for x in lines) != list(range(n)):
        raise AssertionError(f"{category}: read {len(lines)} messages back, wrote {n}")


async def _single(t: Target, category: str, n: int, conns: int, sync: bool = False) -> Result:
    # bench_bus puts the category into the target as is: "&sync=1" rides along.
    target_cat = f"{category}&sync=1" if sync else category
    result = await _measured(t.pid, _single_raw(t.address, target_cat, n, _S, conns),
                             int(t.address.rpartition(":")[2]), t.address if t.name == "ours"
                             else "")
    await _check_single(t.address, category, n)
    if sync and t.name == "ours":
        per_fsync = await asyncio.to_thread(_writes_per_fsync, t.address, category)
        if per_fsync:
            result = dataclasses.replace(result, conns=" ".join(
                x for x in (result.conns, f"{per_fsync:.1f} w/fsync") if x))
    return result


def _writes_per_fsync(address: str, category: str) -> float:
    """Durable writes per fsync of ``category`` so far, from the node's ``/metrics`` (0: a tree
    without those metrics)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(f'{{category="{category}"}} ')
        if value and name in ("chukcha_write_fsyncs_total", "chukcha_fsynced_writes_total"):
            found[name] = float(value)
    fsyncs = found.get("chukcha_write_fsyncs_total", 0.0)
    return found.get("chukcha_fsynced_writes_total", 0.0) / fsyncs if fsyncs else 0.0


async def _bulk(t: Target, bodies: list[bytes], n: int) -> tuple[Result, Result]:
    # Warm-up, not measured: the first big bodies pay one-time costs (our node imports numpy
    # for its message counters; both fill their allocators), which a short phase would show.
    await _write_all_raw(t.address, "warmup", bodies[:16], 4)
    await _read_all_raw(f"http://{t.address}", 1 << 20, 4, "warmup", Verifier(bodies[:16]).chunk)
    write = await _measured(t.pid, _write_all_raw(t.address, "bulk", bodies, 4))
    verifier = Verifier(bodies)
    read = await _measured(t.pid, _read_all_raw(f"http://{t.address}", 1 << 20, 4, "bulk",
                                                verifier.chunk))
    verifier.finish()
    if verifier.messages != n:
        raise AssertionError(f"read {verifier.messages} messages back, wrote {n}")
    return write, dataclasses.replace(read, messages=verifier.messages)


_MIXED_SMALL_CONNS = 8
_MIXED_PACE = 0.002  # seconds between a small connection's writes


async def _mixed(t: Target, bodies: list[bytes], seconds: float) -> tuple[Result, Result]:
    """Bulk writers and paced small writers at the same time (see the module's doc)."""
    host, _, port = t.address.rpartition(":")
    # Warm-up (creates the categories): what was written is checked at the end.
    written = {"mbulk": (await _write_all_raw(t.address, "mbulk", bodies[:8], 4)).nbytes,
               "msmall": (await _single_raw(t.address, "msmall", 16, _S, 1)).nbytes}
    warm = written["mbulk"]
    done = asyncio.Event()
    small: list[float] = []
    bulk: list[float] = []

    async def bulk_writer(k: int) -> None:
        http = await RawHttp.connect(host, int(port))
        try:
            for i in range(k, 1 << 40, 4):
                if done.is_set():
                    break
                body = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                status, data = await http.post("/write?category=mbulk", body)
                if status != 200:
                    raise RuntimeError(f"bulk write failed: {status} {data!r}")
                bulk.append(time.perf_counter() - t0)
                written["mbulk"] += len(body)
        finally:
            await http.close()

    async def small_writer(k: int) -> None:
        http = await RawHttp.connect(host, int(port))
        try:
            await asyncio.sleep(_MIXED_PACE * k / _MIXED_SMALL_CONNS)  # spread, not in step
            nxt = time.perf_counter()
            while not done.is_set():
                t0 = time.perf_counter()
                status, data = await http.post("/write?category=msmall", b"%011d %b\n" % (
                    len(small), b"y" * (_S - 13)))
                if status != 200:
                    raise RuntimeError(f"small write failed: {status} {data!r}")
                if not done.is_set():
                    small.append(time.perf_counter() - t0)
                written["msmall"] += _S
                nxt = max(nxt + _MIXED_PACE, time.perf_counter())
                await asyncio.sleep(nxt - time.perf_counter())
        finally:
            await http.close()

    cpu0 = _cpu_by_role(t.pid)["all"]
    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for k in range(_MIXED_SMALL_CONNS):
            tg.create_task(small_writer(k))
        for k in range(4):
            tg.create_task(bulk_writer(k))
        await asyncio.sleep(seconds)
        done.set()
        elapsed = time.perf_counter() - t0
    cpu = (_cpu_by_role(t.pid)["all"] - cpu0) / elapsed
    await _check_sizes(t, written)
    return (Result("mixed bulk", 0, written["mbulk"] - warm, elapsed, tuple(bulk), cpu),
            Result("mixed small", len(small), len(small) * _S, elapsed, tuple(small), cpu))


async def _check_sizes(t: Target, written: dict[str, int]) -> None:
    """Every byte written to each category is in its chunks (``/listChunks`` sizes)."""
    host, _, port = t.address.rpartition(":")
    http = await RawHttp.connect(host, int(port))
    try:
        for category, want in written.items():
            status, listing = await http.get(f"/listChunks?category={category}")
            have = sum(c["size"] for c in json.loads(listing)) if status == 200 else -1
            if have != want:
                raise AssertionError(f"{t.name}: {category} holds {have} bytes, wrote {want}")
    finally:
        await http.close()


Row = dict[str, Result]


async def _one_run(args: argparse.Namespace, bodies: list[bytes], turn: int) -> dict[str, Row]:
    rows: dict[str, Row] = {}

    def put(phase: str, who: str, result: Result) -> None:
        rows.setdefault(phase, {})[who] = result

    starters: list[tuple[str, Callable[[], contextlib.AbstractAsyncContextManager[Target]]]] = [
        ("go", lambda: _go(args.go)), ("ours", lambda: _ours(args.node_arg)),
    ]
    for i, source in enumerate(args.baseline):  # the first one is "baseline" (as it was)
        label = "ours, baseline" + (f" {Path(source).name}" if i else "")
        starters.append((label, functools.partial(_ours, args.node_arg, source)))
    if args.also_arg:  # the same tree with other flags (e.g. --workers=1 against 2)
        label = "ours, " + " ".join(args.also_arg)
        starters.append((label, lambda: _ours(args.also_arg)))
    # Each run starts with the next node in turn: a node measured right after another one pays
    # for what that one left behind (dirty pages being written back, a warm or cold CPU), so a
    # fixed order would favour or handicap the same node in every run.
    k = turn % len(starters)
    starters = starters[k:] + starters[:k]
    only = set(args.only or ("single", "bulk", "sync"))
    for who, start in starters:
        async with start() as t:
            if "single" in only:
                put("single, 8 conns", who, await _single(t, "s8", args.single_n, 8))
                put("single, 64 conns", who, await _single(t, "s64", args.single_n, 64))
            if "bulk" in only:
                write, read = await _bulk(t, bodies, args.n)
                put("bulk write, 4 conns", who, write)
                put("bulk read, 4 conns", who, read)
            if "sync" in only:
                sync = await _single(t, "sync", args.sync_n, 64, sync=True)
                put("sync=1 single, 64 conns", who, sync)  # Go ignores sync=1: no fsync there
            if "mixed" in only:
                bulk, small = await _mixed(t, bodies, args.mixed_seconds)
                put("mixed: bulk write, 4 conns", who, bulk)
                put("mixed: small writes, 8 conns", who, small)
    if "sync" in only:
        async with _ours([*args.node_arg, "--no-group-commit"]) as t:
            put("sync=1 single, 64 conns", "ours, no group commit",
                await _single(t, "sync", args.sync_n, 64, sync=True))
    return rows


def _rate(r: Result, bulk: bool) -> float:
    return r.mb_s if bulk else r.msgs_s


def _print(runs: list[dict[str, Row]], title: str) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{title} (load average {load}; rates: messages/s, bulk: MB/s; CPU: node CPU "
          f"per message in us, bulk: per MB in ms; --workers: of that, the writer's, all "
          f"fronts' and the busiest front's, the writes per /write the writer served (a front's "
          f"batch is one), and the connections each process held)")
    print(f"{'phase':<40} {'Go':>10} {'ours':>10} {'ratio':>7} {'Go p99':>8} {'our p99':>8} "
          f"{'Go CPU':>8} {'our CPU':>8} {'writer':>7} {'fronts':>7} {'busiest':>7} "
          f"{'w/batch':>7}  conns")
    phases: list[str] = []
    for run in runs:
        phases += [p for p in run if p not in phases]
    for phase in phases:
        bulk = phase.startswith(("bulk", "mixed: bulk"))
        who_all = sorted({w for run in runs for w in run.get(phase, {})},
                         key=lambda w: (w != "go", w))
        for who in who_all:
            if who == "go":
                continue
            go = [run[phase].get("go") for run in runs if phase in run]
            ours = [run[phase][who] for run in runs if who in run.get(phase, {})]
            go_rate = _median([_rate(r, bulk) for r in go if r is not None])
            our_rate = _median([_rate(r, bulk) for r in ours])
            label = phase if who == "ours" else f"{phase}, {who.removeprefix('ours, ')}"
            ratio = our_rate / go_rate if go_rate and not math.isnan(go_rate) else float("nan")
            print(f"{label:<40} {go_rate:>10.0f} {our_rate:>10.0f} {ratio:>6.2f}x "
                  f"{_median([r.pct(99) for r in go if r is not None]):>8.2f} "
                  f"{_median([r.pct(99) for r in ours]):>8.2f} "
                  f"{_median([_cpu(r, bulk) for r in go if r is not None]):>8.{1 + bulk}f} "
                  f"{_median([_cpu(r, bulk) for r in ours]):>8.{1 + bulk}f} "
                  f"{_median([_cpu(r, bulk, r.writer_cpu) for r in ours]):>7.{1 + bulk}f} "
                  f"{_median([_cpu(r, bulk, r.fronts_cpu) for r in ours]):>7.{1 + bulk}f} "
                  f"{_median([_cpu(r, bulk, r.busiest_front_cpu) for r in ours]):>7.{1 + bulk}f} "
                  f"{_median([_per_batch(r) for r in ours]):>7.1f}  "
                  f"{' | '.join(r.conns for r in ours if r.conns)}")
    print("(the Go server has no per-request fsync: its sync=1 column is a plain write; "
          "w/fsync: our durable writes per fsync, from /metrics; with --workers, the "
          "fronts' batches)")
    mixed = [p for p in phases if p.startswith("mixed: small")]
    for phase in mixed:
        print(f"\n{'small writes during bulk (ms)':<40} {'p50':>7} {'p99':>7} {'p99.9':>7} "
              f"{'max':>7} {'n':>7}")
        who_all = sorted({w for run in runs for w in run.get(phase, {})},
                         key=lambda w: (w != "go", w))
        for who in who_all:
            rs = [run[phase][who] for run in runs if who in run.get(phase, {})]
            print(f"{who:<40} {_median([r.pct(50) for r in rs]):>7.2f} "
                  f"{_median([r.pct(99) for r in rs]):>7.2f} "
                  f"{_median([r.pct(99.9) for r in rs]):>7.2f} "
                  f"{_median([r.pct(100) for r in rs]):>7.2f} "
                  f"{_median([float(len(r.latencies)) for r in rs]):>7.0f}")


def _per_batch(r: Result) -> float:
    """Writes per ``/write`` the writer served (1 without fronts; NaN: not measured)."""
    return r.messages / r.writer_writes if r.writer_writes else math.nan


def _cpu(r: Result, bulk: bool, share: float | None = None) -> float:
    """CPU per message (in us) or per MB (in ms): the node's, or ``share``'s (a part of it,
    in CPU seconds per second of the phase as ``node_cpu``)."""
    used = (r.node_cpu if share is None else share) * r.seconds
    return used / (r.nbytes / 1e6) * 1e3 if bulk else used / max(1, r.messages) * 1e6


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--go", required=True, help="path of the Go server's binary (chukcha-go)")
    p.add_argument("--runs", type=int, default=3, help="runs (fresh nodes each); medians")
    p.add_argument("-n", type=int, default=1_000_000, help="bulk: 100-byte messages")
    p.add_argument("--single-n", type=int, default=40_000, help="single-message writes")
    p.add_argument("--sync-n", type=int, default=10_000, help="sync=1 single-message writes")
    p.add_argument("--node-arg", action="append", default=[],
                   help="extra flag for our node (repeatable): --node-arg=--workers=4")
    p.add_argument("--baseline", metavar="SRC", action="append", default=[],
                   help="also run our node from this source tree (e.g. `git archive main` "
                        "unpacked), alternating with the others: before/after in one run "
                        "(repeatable: more trees, labelled by their folder's name)")
    p.add_argument("--also-arg", action="append", default=[],
                   help="also run our node with these flags instead of --node-arg "
                        "(repeatable): --node-arg=--workers=2 --also-arg=--workers=1")
    p.add_argument("--only", action="append", choices=("single", "bulk", "sync", "mixed"),
                   help="run only these phases (repeatable; default: single, bulk and sync)")
    p.add_argument("--mixed-seconds", type=float, default=3.0,
                   help="mixed: how long the bulk and small writers run together")
    args = p.parse_args(argv)
    if not Path(args.go).is_file():
        print(f"no Go binary at {args.go}", file=sys.stderr)
        return 2
    bodies = make_batches(args.n, _S, 1 << 20)
    runs: list[dict[str, Row]] = []
    for i in range(args.runs):
        runs.append(uvloop.run(_one_run(args, bodies, i)))
        _print(runs[-1:], f"run {i + 1}/{args.runs}")
    if args.runs > 1:
        _print(runs, f"median of {args.runs} runs")
    print(json.dumps({"cores": os.cpu_count(), "runs": args.runs, "n": args.n,
                      "single_n": args.single_n, "sync_n": args.sync_n}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
