"""CPU per request of the node's own Python (no sockets): the HTTP server and handlers alone.

A node runs in this process (``chukcha.testing.run_node``, metrics and auth check on, as
``chukcha node``); requests are fed straight into one of its server's connections (the
protocol's ``data_received``) with a transport that only counts the answer bytes, so what is
timed is exactly the work the node does per request in Python: parsing callbacks, routing,
checks, the handler, the chunk store's append (a real ``os.write``), metrics and the answer's
bytes. The kernel's share (``recv``/``send``/``epoll``) and the event loop's are not in it:
``bench/bench_vs_go.py`` measures the whole node side by side with the Go server.

    .venv/bin/python bench/bench_hotpath.py            # microseconds per request, best of 5
    PYTHONPATH=/tmp/other-tree .venv/bin/python bench/bench_hotpath.py   # another tree's node

(The venv's editable install points at this tree: another tree is only measured with its path
first on ``PYTHONPATH``.)

Phases: single-message ``/write``s (100 B; answered on the fast path) from 8 and 64
connections, and the same through a front worker (``--workers``: the front and the writer's
private socket in this process, so the relay's CPU on both sides counts), a single write, the
same pipelined 8 per data_received, a ``sync=1`` write (the async path with its group fsync;
slower by the fsync), a small ``/read`` (4 KiB), and an unknown path (404).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

from chukcha.bus.front import FrontWorker
from chukcha.bus.server import HttpServer
from chukcha.testing import bind_loopback, run_node

__all__ = ["main"]


class _Sink:
    """A transport that takes every answer and counts it."""

    def __init__(self) -> None:
        self.bytes = 0
        self.answers = 0
        self._want = 0
        self._reached: asyncio.Future[None] | None = None

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        self.answers += data.count(b"HTTP/1.")
        if self._reached is not None and self.answers >= self._want:
            self._reached.set_result(None)
            self._reached = None

    async def answered(self, n: int) -> None:
        """Return once ``n`` answers were written (those of the async path come later)."""
        if self.answers < n:
            self._want = n
            self._reached = asyncio.get_running_loop().create_future()
            await self._reached

    def writelines(self, data: Sequence[bytes]) -> None:
        for piece in data:
            self.write(piece)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _phase(server: HttpServer, request: bytes, n: int, per_feed: int = 1) -> float:
    """Microseconds per request: ``n`` requests fed ``per_feed`` at a time, answers awaited."""
    conn: Any = server.protocol()
    sink = _Sink()
    conn.connection_made(sink)
    data = request * per_feed
    feeds = n // per_feed
    gc.collect()
    t0 = time.process_time()
    for i in range(1, feeds + 1):
        conn.data_received(data)
        await sink.answered(i * per_feed)
    elapsed = time.process_time() - t0
    conn.connection_lost(None)
    return elapsed / (feeds * per_feed) * 1e6


async def _phase_conns(server: HttpServer, request: bytes, n: int, conns: int) -> float:
    """Microseconds per request: ``conns`` connections each sending one request, answers
    awaited, ``n // conns`` rounds (what coalescing needs: requests from many connections)."""
    pairs: list[tuple[Any, _Sink]] = []
    for _ in range(conns):
        conn: Any = server.protocol()
        sink = _Sink()
        conn.connection_made(sink)
        pairs.append((conn, sink))
    rounds = n // conns
    gc.collect()
    t0 = time.process_time()
    for i in range(1, rounds + 1):
        for conn, _ in pairs:
            conn.data_received(request)
        for _, sink in pairs:
            await sink.answered(i)
    elapsed = time.process_time() - t0
    for conn, _ in pairs:
        conn.connection_lost(None)
    return elapsed / (rounds * conns) * 1e6


def _post(target: str, body: bytes) -> bytes:
    return b"POST %b HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n%b" % (
        target.encode(), len(body), body)


async def _run(n: int, repeat: int) -> dict[str, float]:
    body = b"%011d %b\n" % (0, b"x" * 87)
    phases = {
        "write, 100 B": (_post("/write?category=b", body), 1),
        "write, 100 B, 8 pipelined": (_post("/write?category=b", body), 8),
        "write sync=1, 100 B": (_post("/write?category=b&sync=1", body), 1),
        "read, 4 KiB": (b"GET /read?category=b&chunk=CHUNK&off=0&max_size=4096 HTTP/1.1\r\n"
                        b"Host: bench\r\n\r\n", 1),
        "unknown path (404)": (b"GET /nothing HTTP/1.1\r\nHost: bench\r\n\r\n", 1),
    }
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="chukcha-bench-hot-") as tmp:
        private = str(Path(tmp) / "writer.sock")
        async with run_node(Path(tmp) / "data", "hot", internal_socket=private) as node:
            server = node.server
            # --workers: the whole node's CPU (front and writer are both in this process, the
            # relay's unix socket included) against the writer serving the clients itself.
            front = FrontWorker(private, node.server.limits, max_message_size=1 << 20)
            sock = bind_loopback()
            sock.setblocking(False)
            await front.start(sock)
            for conns in (8, 64):
                write = _post("/write?category=f", body)
                for _ in range(repeat):
                    for name, srv in ((f"write, 100 B, {conns} conns", server),
                                      (f"front: write, 100 B, {conns} conns", front.server)):
                        us = await _phase_conns(srv, write, n, conns)
                        best[name] = min(best.get(name, us), us)
            await front.stop(1.0)
            chunk = (await node.store.write("b", body)).chunk
            for name, (template, per_feed) in phases.items():
                request = template.replace(b"CHUNK", chunk.encode())
                count = n // 10 if "sync" in name else n
                for _ in range(repeat):
                    us = await _phase(server, request, count, per_feed)
                    best[name] = min(best.get(name, us), us)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=20_000, help="requests per phase and repeat")
    p.add_argument("--repeat", type=int, default=5, help="repeats; the best is printed")
    args = p.parse_args(argv)
    best = uvloop.run(_run(args.n, args.repeat))
    print(f"{'phase':<32} {'us per request (CPU, best of ' + str(args.repeat) + ')':>36}")
    for name, us in best.items():
        print(f"{name:<32} {us:>36.1f}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
