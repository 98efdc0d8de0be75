"""What slow and idle clients can make a node hold (issue 11, point 4), and whether it still serves.

Starts a ``chukcha node`` per scenario (fresh data directory), fills a chunk with 17 MiB, then:

- ``readers``: 200 clients ask for 16 MiB (``/read?max_size=16777216``) and never read the answer
  (a 4 KiB receive buffer);
- ``bodies``: 200 clients send the headers and 3.9 MiB of a 4 MiB write body, then stall;
- ``idle``: 1,100 connections are opened and left idle.

During each, a well-behaved client reads 1 MiB and writes a message (its latency is printed);
the node's peak resident memory (``VmHWM``, summed over its processes with ``--workers``, which
counts pages shared since the fork once per process) and its memory after the stalled clients
close are taken from ``/proc``. ``--node-arg`` passes flags to the node, e.g. a bigger
``--memory-budget`` to compare.

    .venv/bin/python bench/bench_slow_clients.py
    .venv/bin/python bench/bench_slow_clients.py --node-arg=--memory-budget=100GiB  # no bound
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import uvloop
from bench_bus import RawHttp

from chukcha.testing import NodeProcess

__all__ = ["main"]

_MiB = 1 << 20
_REFUSED: list[int] = []


def _mem(pid: int, field: str) -> int:
    """``field`` of ``pid`` and its children (``--workers``: the supervisor, the writer and the
    fronts), summed: for ``VmHWM`` an upper bound of the peak they held together."""
    total = 0
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for p in [pid, *map(int, children)]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                total += int(line.split()[1]) * 1024
    return total


async def _open(host: str, port: int, first: bytes) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, port))
    if first:
        try:
            await loop.sock_sendall(sock, first)
        except OSError:  # refused by a limit (503 or a close): the node protected itself
            _REFUSED.append(1)
    return sock


async def _well_behaved(host: str, port: int, chunk: str) -> str:
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(30):
            http = await RawHttp.connect(host, port)
            status, data = await http.get(
                f"/read?category=big&chunk={chunk}&off=0&max_size={_MiB}")
            status2, _ = await http.post("/write?category=small", b"hello\n")
            await http.close()
    except (OSError, TimeoutError) as exc:
        return f"FAILED ({type(exc).__name__})"
    ms = (time.perf_counter() - t0) * 1000
    return f"{status}/{status2} in {ms:.0f} ms" if data else f"{status} empty"


async def _scenario(name: str, node_args: list[str]) -> str:
    with tempfile.TemporaryDirectory(prefix="chukcha-slow-") as tmp:
        node = NodeProcess(Path(tmp) / "data", "slow", ["--log-level", "WARNING", *node_args])
        await node.start()
        try:
            if node.proc is None:
                raise RuntimeError("the node did not start")
            pid = node.proc.pid
            host, _, port_s = node.address.rpartition(":")
            port = int(port_s)
            http = await RawHttp.connect(host, port)
            body = b"x" * 99 + b"\n"
            for _ in range(17):
                status, _ = await http.post("/write?category=big", body * (_MiB // 100))
                if status != 200:
                    raise RuntimeError(f"write failed: {status}")
            await http.close()
            chunk = "slow-chunk000000000"
            base = _mem(pid, "VmRSS")
            socks: list[socket.socket] = []
            _REFUSED.clear()
            if name == "readers":
                req = (b"GET /read?category=big&chunk=%b&off=0&max_size=%d HTTP/1.1\r\n"
                       b"Host: x\r\n\r\n" % (chunk.encode(), 16 * _MiB))
                for _ in range(200):
                    socks.append(await _open(host, port, req))
            elif name == "bodies":
                head = b"POST /write?category=w HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                for _ in range(200):
                    socks.append(await _open(host, port, head % (4 * _MiB) + body * 40_000))
            else:
                for _ in range(1100):
                    socks.append(await _open(host, port, b""))
            await asyncio.sleep(3)  # let the stalled clients pile up: this is a load, not a sync
            during = await _well_behaved(host, port, chunk)
            await asyncio.sleep(2)
            peak = _mem(pid, "VmHWM")
            for s in socks:
                s.close()
            await asyncio.sleep(2)
            after = _mem(pid, "VmRSS")
            return (f"{name:<8} {len(socks):>6} {len(_REFUSED):>8} {base / _MiB:>9.0f} "
                    f"{peak / _MiB:>9.0f} {after / _MiB:>9.0f}   {during}")
        finally:
            await node.stop()
            node.close()


async def _main(args: argparse.Namespace) -> None:
    print(f"node flags: {' '.join(args.node_arg) or '(defaults)'}")
    print(f"{'scenario':<8} {'conns':>6} {'refused':>8} {'base MiB':>9} {'peak MiB':>9} "
          f"{'after MiB':>9}   well-behaved client during (read 1 MiB / write)")
    for name in args.scenario:
        print(await _scenario(name, args.node_arg), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", action="append", choices=["readers", "bodies", "idle"])
    p.add_argument("--node-arg", action="append", default=[], help="extra chukcha node flag")
    args = p.parse_args(argv)
    args.scenario = args.scenario or ["readers", "bodies", "idle"]
    uvloop.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
