"""Load generator for one bus node: write, read back like the Go client, single-message writes.

Starts its own ``chukcha node`` subprocess (:class:`chukcha.testing.NodeProcess`) on a temporary
directory, writes N messages of S bytes in batches of B bytes over C connections, reads every
chunk back the way the Go simple client does (listChunks, read until an empty answer, next
chunk), verifies that every batch arrived exactly once and byte for byte, and prints a table.

    .venv/bin/python bench/bench_bus.py                       # everything, defaults below
    .venv/bin/python bench/bench_bus.py --mode single -n 50000 -c 8
    .venv/bin/python bench/bench_bus.py --runs 3              # fresh node per run, median row

The load generator shares the machine's cores with the node, so figures are a lower bound for
the node alone.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import uvloop

from chukcha.testing import NodeProcess

__all__ = ["RawHttp", "Result", "Verifier", "main"]

CATEGORY = "bench"
_PREFIX = 12  # every message starts with its zero-padded index and a space


@dataclass(frozen=True, slots=True)
class Result:
    """One measured phase."""

    phase: str
    messages: int
    nbytes: int
    seconds: float
    latencies: tuple[float, ...]
    node_cpu: float = float("nan")  # CPU seconds the node used per second of the phase
    # --workers: the same, of the writer, of all fronts, of the busiest front; and the phase's
    # connections per process ("w:30 f1:34"), as bench_vs_go measures them.
    writer_cpu: float = float("nan")
    fronts_cpu: float = float("nan")
    busiest_front_cpu: float = float("nan")
    conns: str = ""
    writer_writes: float = float("nan")  # /write requests the writer served (fronts: batches)

    @property
    def mb_s(self) -> float:
        return self.nbytes / self.seconds / 1e6

    @property
    def msgs_s(self) -> float:
        return self.messages / self.seconds

    def pct(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


def make_batches(n: int, size: int, batch: int) -> list[bytes]:
    """``n`` messages of ``size`` bytes (newline included) grouped into bodies of <= ``batch``."""
    if size < _PREFIX + 1:
        raise SystemExit(f"-s must be at least {_PREFIX + 1}")
    filler = (b"abcdefghijklmnopqrstuvwxyz" * (size // 26 + 1))[: size - _PREFIX - 1]
    per = max(1, batch // size)
    bodies: list[bytes] = []
    for start in range(0, n, per):
        stop = min(n, start + per)
        bodies.append(b"".join(b"%011d %b\n" % (i, filler) for i in range(start, stop)))
    return bodies


async def _write_all(url: str, bodies: Sequence[bytes], conns: int) -> Result:
    next_body = iter(range(len(bodies)))
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            for i in next_body:
                t0 = time.perf_counter()
                async with http.post(url, data=bodies[i]) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"write failed: {resp.status} {await resp.text()}")
                    await resp.read()
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(conns):
                tg.create_task(worker())
        elapsed = time.perf_counter() - t0
    nbytes = sum(len(b) for b in bodies)
    return Result("write", sum(b.count(b"\n") for b in bodies), nbytes, elapsed,
                  tuple(latencies))


class Checker(Protocol):
    """Checks the bytes of one chunk as they arrive, read by read."""

    def feed(self, data: bytes) -> None: ...
    def end(self) -> None: ...


async def _read_all(
    base: str, max_size: int, conns: int, category: str, checker: Callable[[str], Checker]
) -> Result:
    """Read every chunk to its end like the Go client (chunks in parallel, one per worker).

    Every answer is checked as it arrives and dropped, so memory stays bounded.
    """
    connector = aiohttp.TCPConnector(limit=conns)
    latencies: list[float] = []
    total = 0
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"{base}/listChunks", params={"category": category}) as resp:
            chunks = [c["name"] for c in await resp.json()]
        todo = iter(chunks)

        async def worker() -> None:
            nonlocal total
            for name in todo:
                check = checker(name)
                off = 0
                url = f"{base}/read?category={category}&chunk={name}&max_size={max_size}&off="
                while True:
                    t0 = time.perf_counter()
                    async with http.get(url + str(off)) as resp:
                        if resp.status != 200:
                            raise RuntimeError(f"read failed: {resp.status} {await resp.text()}")
                        data = await resp.read()
                    latencies.append(time.perf_counter() - t0)
                    if not data:
                        break
                    check.feed(data)
                    off += len(data)
                check.end()
                total += off

        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(conns):
                tg.create_task(worker())
        elapsed = time.perf_counter() - t0
    return Result("read", 0, total, elapsed, tuple(latencies))


class Verifier:
    """Every written body appears exactly once, byte for byte, and nothing else does.

    A write lands whole in one chunk, so each chunk is a concatenation of bodies. The check walks
    each answer body by body: one dict lookup where a body starts and one memcmp per piece, no
    Python loop per message and no copy.
    """

    def __init__(self, bodies: Sequence[bytes]) -> None:
        self._bodies = bodies
        self._views = [memoryview(b) for b in bodies]
        self._counts = [b.count(b"\n") for b in bodies]
        self._by_first = {int(b[: _PREFIX - 1]): i for i, b in enumerate(bodies)}
        self._seen = bytearray(len(bodies))
        self.messages = 0

    def chunk(self, name: str) -> Checker:
        return _ChunkCheck(self, name)

    def piece(self, name: str, data: bytes, body: int, at: int) -> tuple[int, int]:
        """Check ``data`` (the next bytes of chunk ``name``) that continues ``body`` at ``at``
        (``body`` -1: a new body starts); returns where the next piece continues."""
        pos = 0
        while pos < len(data):
            if body < 0:
                body = self._by_first.get(int(data[pos : pos + _PREFIX - 1]), -1)
                if body < 0:
                    raise AssertionError(f"{name}: not the start of a written batch")
                if self._seen[body]:
                    raise AssertionError(f"batch {body} read twice")
                self._seen[body] = 1
                self.messages += self._counts[body]
                at = 0
            view = self._views[body]
            take = min(len(view) - at, len(data) - pos)
            if not data.startswith(view[at : at + take], pos):
                raise AssertionError(f"{name}: batch {body} differs from what was written")
            pos += take
            at += take
            if at == len(view):
                body = -1
        return body, at

    def finish(self) -> None:
        missing = len(self._bodies) - sum(self._seen)
        if missing:
            raise AssertionError(f"{missing} written batches were not read back")


class _ChunkCheck:
    def __init__(self, verifier: Verifier, name: str) -> None:
        self._verifier, self._name = verifier, name
        self._body, self._at = -1, 0

    def feed(self, data: bytes) -> None:
        self._body, self._at = self._verifier.piece(self._name, data, self._body, self._at)

    def end(self) -> None:
        if self._body >= 0:
            raise AssertionError(f"{self._name} ends inside batch {self._body}")


class _Collect:
    def __init__(self, out: list[bytes]) -> None:
        self._out = out

    def feed(self, data: bytes) -> None:
        self._out.append(data)

    def end(self) -> None:
        pass


async def _write_all_raw(address: str, category: str, bodies: Sequence[bytes],
                         conns: int) -> Result:
    host, _, port = address.rpartition(":")
    next_body = iter(range(len(bodies)))
    latencies: list[float] = []
    target = f"/write?category={category}"

    async def worker() -> None:
        http = await RawHttp.connect(host, int(port))
        try:
            for i in next_body:
                t0 = time.perf_counter()
                status, data = await http.post(target, bodies[i])
                if status != 200:
                    raise RuntimeError(f"write failed: {status} {data!r}")
                latencies.append(time.perf_counter() - t0)
        finally:
            await http.close()

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(conns):
            tg.create_task(worker())
    elapsed = time.perf_counter() - t0
    return Result("write", sum(b.count(b"\n") for b in bodies), sum(len(b) for b in bodies),
                  elapsed, tuple(latencies))


async def _read_all_raw(
    base: str, max_size: int, conns: int, category: str, checker: Callable[[str], Checker]
) -> Result:
    """:func:`_read_all` over :class:`RawHttp` connections."""
    host, _, port = base.removeprefix("http://").rpartition(":")
    latencies: list[float] = []
    total = 0
    first = await RawHttp.connect(host, int(port))
    status, listing = await first.get(f"/listChunks?category={category}")
    await first.close()
    if status != 200:
        raise RuntimeError(f"listChunks failed: {status} {listing!r}")
    todo = iter(c["name"] for c in json.loads(listing))

    async def worker() -> None:
        nonlocal total
        http = await RawHttp.connect(host, int(port))
        try:
            for name in todo:
                check = checker(name)
                off = 0
                target = f"/read?category={category}&chunk={name}&max_size={max_size}&off="
                while True:
                    t0 = time.perf_counter()
                    status, data = await http.get(target + str(off))
                    if status != 200:
                        raise RuntimeError(f"read failed: {status} {data!r}")
                    latencies.append(time.perf_counter() - t0)
                    if not data:
                        break
                    check.feed(data)
                    off += len(data)
                check.end()
                total += off
        finally:
            await http.close()

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(conns):
            tg.create_task(worker())
    elapsed = time.perf_counter() - t0
    return Result("read", 0, total, elapsed, tuple(latencies))


class RawHttp:
    """A minimal keep-alive HTTP/1.1 client (the node always answers with Content-Length).

    aiohttp's client spends ~150 us of CPU per request plus copies of big bodies, which on a
    2-core box is taken from the node under test; this one builds the request with one format
    and parses only the status line and Content-Length.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def connect(cls, host: str, port: int) -> RawHttp:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
        return cls(reader, writer)

    async def request(self, method: bytes, target: str, body: bytes = b"") -> tuple[int, bytes]:
        head = b"%b %b HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n" % (
            method, target.encode(), len(body))
        if len(body) < 4096:
            self._writer.write(head + body)
        else:  # no copy of a big body
            self._writer.writelines([head, body])
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        data = await self._reader.readexactly(length) if length else b""
        return status, data

    async def post(self, target: str, body: bytes) -> tuple[int, bytes]:
        return await self.request(b"POST", target, body)

    async def get(self, target: str) -> tuple[int, bytes]:
        return await self.request(b"GET", target)

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


async def _single_raw(address: str, category: str, n: int, size: int, conns: int) -> Result:
    host, _, port = address.rpartition(":")
    filler = (b"x" * size)[: size - _PREFIX - 1]
    latencies: list[float] = []
    counter = iter(range(n))
    target = f"/write?category={category}"

    async def worker() -> None:
        http = await RawHttp.connect(host, int(port))
        try:
            for i in counter:
                body = b"%011d %b\n" % (i, filler)
                t0 = time.perf_counter()
                status, data = await http.post(target, body)
                if status != 200:
                    raise RuntimeError(f"write failed: {status} {data!r}")
                latencies.append(time.perf_counter() - t0)
        finally:
            await http.close()

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(conns):
            tg.create_task(worker())
    elapsed = time.perf_counter() - t0
    return Result("single", n, n * size, elapsed, tuple(latencies))


async def _single(url: str, n: int, size: int, conns: int) -> Result:
    filler = (b"x" * size)[: size - _PREFIX - 1]
    latencies: list[float] = []
    counter = iter(range(n))
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            for i in counter:
                body = b"%011d %b\n" % (i, filler)
                t0 = time.perf_counter()
                async with http.post(url, data=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"write failed: {resp.status} {await resp.text()}")
                    await resp.read()
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(conns):
                tg.create_task(worker())
        elapsed = time.perf_counter() - t0
    return Result("single", n, n * size, elapsed, tuple(latencies))


async def _check_single(base: str, category: str, n: int, size: int) -> None:
    """Every single-message write is there exactly once (order across connections is free)."""
    pieces: list[bytes] = []
    await _read_all(base, 1 << 20, 1, category, lambda _name: _Collect(pieces))
    lines = b"".join(pieces).split(b"\n")[:-1]
    if len(lines) != n or any(len(x) != size - 1 for x in lines):
        raise AssertionError(f"single: read {len(lines)} messages, wrote {n}")
    if sorted(int(x[: _PREFIX - 1]) for x in lines) != list(range(n)):
        raise AssertionError("single: the messages read back are not the ones written")


async def run_once(args: argparse.Namespace, bodies: list[bytes]) -> list[Result]:
    results: list[Result] = []
    if args.url:
        # An already running node (ours or the Go server, for comparison); use a fresh category.
        return await _phases(args, bodies, args.url.rstrip("/"))
    with tempfile.TemporaryDirectory(prefix="chukcha-bench-") as tmp:
        node = NodeProcess(Path(tmp) / "data", "bench", ["--log-level", "WARNING", *args.node_arg])
        try:
            await node.start()
            pid = node.proc.pid if node.proc is not None else None
            results = await _phases(args, bodies, node.url, pid)
        finally:
            code = await node.stop()
            node.close()
        if code != 0:
            print(node.log_text(), file=sys.stderr)
            raise RuntimeError(f"node exited with {code}")
    return results


def _cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process (Linux /proc), NaN when unknown."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measured(pid: int | None, phase: Awaitable[Result]) -> Result:
    before = _cpu_seconds(pid)
    result = await phase
    used = _cpu_seconds(pid) - before
    return dataclasses.replace(result, node_cpu=used / result.seconds)


async def _phases(
    args: argparse.Namespace, bodies: list[bytes], url: str, pid: int | None = None
) -> list[Result]:
    results: list[Result] = []
    # A fresh category per run, so that a node given with --url may hold older data.
    cat = f"{CATEGORY}{time.time_ns()}" if args.url else CATEGORY
    if args.mode in ("write", "read", "all"):
        if args.client == "raw":
            write = _write_all_raw(url.removeprefix("http://"), cat, bodies, args.c)
        else:
            write = _write_all(f"{url}/write?category={cat}", bodies, args.c)
        results.append(await _measured(pid, write))
        verifier = Verifier(bodies)
        reader = _read_all_raw if args.client == "raw" else _read_all
        read = await _measured(pid, reader(url, args.read_size, args.c, cat, verifier.chunk))
        verifier.finish()
        read = dataclasses.replace(read, messages=verifier.messages)
        if read.messages != args.n:
            raise AssertionError(f"read {read.messages} messages, wrote {args.n}")
        results.append(read)
    if args.mode in ("single", "all"):
        single_c = args.single_c or args.c
        if args.client == "raw":
            address = url.removeprefix("http://")
            single = await _measured(pid, _single_raw(address, f"{cat}_single", args.single_n,
                                                      args.s, single_c))
        else:
            single = await _measured(pid, _single(f"{url}/write?category={cat}_single",
                                                  args.single_n, args.s, single_c))
        results.append(single)
        await _check_single(url, f"{cat}_single", args.single_n, args.s)
    return results


def print_table(rows: Sequence[Result], title: str) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{title}  (load average {load}; node CPU in cores)")
    print(f"{'phase':<8} {'messages':>10} {'MB':>9} {'sec':>7} {'MB/s':>8} {'msgs/s':>11} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'node CPU':>9}")
    for r in rows:
        print(f"{r.phase:<8} {r.messages:>10} {r.nbytes / 1e6:>9.1f} {r.seconds:>7.2f} "
              f"{r.mb_s:>8.1f} {r.msgs_s:>11.0f} {r.pct(50):>8.2f} {r.pct(99):>8.2f} "
              f"{r.node_cpu:>9.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=3_000_000, help="messages to write and read back")
    p.add_argument("-s", type=int, default=100, help="message size in bytes, newline included")
    p.add_argument("-b", type=int, default=1 << 20, help="write batch (body) size in bytes")
    p.add_argument("-c", type=int, default=4, help="concurrent connections")
    p.add_argument("--mode", choices=["write", "read", "single", "all"], default="all",
                   help="write and read are measured together (read needs the written data)")
    p.add_argument("--read-size", type=int, default=1 << 20, help="max_size of each /read")
    p.add_argument("--single-n", type=int, default=60_000, help="single-message writes")
    p.add_argument("--single-c", type=int, default=8, help="connections for single writes")
    p.add_argument("--client", choices=["raw", "aiohttp"], default="raw",
                   help="load generator's HTTP client (raw: a minimal keep-alive client)")
    p.add_argument("--url", default="", help="bench this running node instead of starting one")
    p.add_argument("--runs", type=int, default=1, help="repeat on a fresh node; print medians")
    p.add_argument("--node-arg", action="append", default=[],
                   help="extra chukcha node flag (repeatable): --node-arg=-sync-each-write")
    args = p.parse_args(argv)
    bodies = make_batches(args.n, args.s, args.b) if args.mode != "single" else []
    runs: list[list[Result]] = []
    for i in range(args.runs):
        # uvloop for the load generator too: less of the shared CPU goes to the client.
        results = uvloop.run(run_once(args, bodies))
        print_table(results, f"run {i + 1}/{args.runs}: n={args.n} s={args.s} b={args.b} "
                    f"c={args.c} single_c={args.single_c}")
        runs.append(results)
    if args.runs > 1:
        medians = []
        for j, first in enumerate(runs[0]):
            pick = sorted((r[j] for r in runs), key=lambda r: r.mb_s)[len(runs) // 2]
            medians.append(dataclasses.replace(pick, phase=first.phase))
        print_table(medians, f"median of {args.runs} runs (by MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
