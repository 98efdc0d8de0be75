"""The node's HTTP/1.1 server: llhttp (``httptools``) parsing, a route table, bounded resources.

Why not aiohttp: a profile of ``/write`` (``bench/README`` section of the main README) showed
aiohttp's request and response machinery at ~80 % of the node's CPU per single-message write;
this server parses with the same C parser aiohttp and uvicorn use and writes each response with
one ``transport.write``.

What it keeps from the HTTP/1.1 a Chukcha client or peer speaks: keep-alive and pipelining
(answers in request order), ``Expect: 100-continue``, chunked request bodies, HTTP/1.0 (closed
after the answer unless it asks for keep-alive), any method on any route (the Go server ignores
the method). Streamed answers (``/replication/events``) use chunked encoding.

Resources are bounded (:class:`ServerLimits`): a connection cap (at the cap the longest-idle
keep-alive connection is closed to make room, else the newcomer gets a 503), a deadline for a
request's headers, a longest pause inside a body, an idle keep-alive timeout, a longest stall
while a client does not take its answer, a header size limit, the body limit (a
``Content-Length`` over it is answered 400 at once and the connection closed, before any
``100 Continue``), and one memory budget for bodies being received and answers being sent:
when it is spent, clients that stalled longest are disconnected first, so well-behaved clients
keep being served.

Routes and per-request checks (authentication) are added to :class:`Router`; the parser never
changes for them. Errors become plain-text responses in exactly one place
(:func:`error_response`); an unexpected exception is logged with its traceback and answered
``500`` with its type and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Coroutine
from ssl import SSLContext
from typing import Any, Final

from chukcha.bus.connection import Connection, ConnectionState
from chukcha.bus.connection_base import ConnectionBase
from chukcha.bus.routing import Observer, Router, ServerLimits, error_response
from chukcha.bus.web import StreamResponse

# Router, ServerLimits, Observer and error_response live in chukcha.bus.routing (the connection
# uses them too); they stay importable from here, the server's public face.
__all__ = ["HttpServer", "MemoryBudget", "Observer", "Router", "ServerLimits", "error_response"]

logger = logging.getLogger(__name__)


_POOL_BUFFERS: Final = 8
_POOL_BYTES: Final = 8 << 20
"""Idle big-body buffers kept for reuse: at most this many, and this many bytes
(:meth:`MemoryBudget.body_buffer`)."""


class MemoryBudget:
    """Bytes held for slow clients, across connections (see ``ServerLimits.memory_budget``),
    and the few big-body buffers kept for reuse (:meth:`body_buffer`): those count against it
    too and are the first thing given up when it is short."""

    def __init__(self, capacity: int, stall_grace: float) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self.pooled = 0  # bytes of the idle buffers kept for reuse
        self.reused = 0  # bodies received into a reused buffer (tests look)
        self._pool: list[bytearray] = []
        self._grace = stall_grace
        self._held: dict[ConnectionBase, int] = {}
        self._released: asyncio.Event | None = None

    def body_buffer(self, n: int) -> bytearray:
        """A buffer of exactly ``n`` bytes for a big body: an idle one when one fits without
        reallocation, else a new one.

        Why: a new buffer of a body's size was fresh memory every time (glibc gives big blocks
        back to the OS when they are freed): its page faults and zeroing were ~15 % of the
        node's CPU on bulk writes. Nothing of an earlier body is ever seen: the buffer is cut
        to or grown into ``n`` bytes, and a body is handed on only once all ``n`` arrived."""
        pool = self._pool
        for i, buf in enumerate(pool):
            # In place: a bytearray keeps its allocation when cut to half of it or more, and
            # grows into it.
            if len(buf) // 2 <= n < buf.__alloc__():
                del pool[i]
                self.pooled -= len(buf)
                if len(buf) > n:
                    del buf[n:]
                elif len(buf) < n:
                    buf.extend(bytes(n - len(buf)))
                self.reused += 1
                return buf
        return bytearray(n)

    def recycle(self, buf: bytearray) -> None:
        """Keep ``buf``, which nothing refers to any more, for a later body (within bounds,
        and only while the budget has room for it)."""
        if len(buf) > _POOL_BYTES or self.used + self.pooled + len(buf) > self.capacity:
            return
        pool = self._pool
        while pool and (len(pool) >= _POOL_BUFFERS or self.pooled + len(buf) > _POOL_BYTES):
            self.pooled -= len(pool.pop(0))  # the oldest goes
        pool.append(buf)
        self.pooled += len(buf)

    def held_by(self, conn: ConnectionBase) -> int:
        return self._held.get(conn, 0)

    def try_take(self, conn: ConnectionBase, n: int) -> bool:
        """Take ``n`` bytes for ``conn`` now, closing long-stalled holders if needed."""
        if self.pooled and self.used + self.pooled + n > self.capacity:
            self._pool.clear()  # idle buffers go first
            self.pooled = 0
        if self.used + n > self.capacity and self.used > 0:
            self._evict(self.used + n - self.capacity, keep=conn)
            if self.used + n > self.capacity and self.used > 0:
                return False
        self._held[conn] = self._held.get(conn, 0) + n
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    async def take(self, conn: ConnectionBase, n: int) -> None:
        """Take ``n`` bytes, waiting for holders to finish or to stall long enough."""
        loop = asyncio.get_running_loop()
        while not self.try_take(conn, n):
            stalled = [c.stalled_since for c in self._held if c is not conn and c.stalled_since]
            wait = self._grace - (loop.time() - min(stalled)) if stalled else self._grace
            if self._released is None or self._released.is_set():
                self._released = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.01, wait)):
                    await self._released.wait()

    def give_back(self, conn: ConnectionBase) -> None:
        n = self._held.pop(conn, 0)
        if n:
            self.used -= n
            if self._released is not None:
                self._released.set()

    def _evict(self, need: int, keep: ConnectionBase) -> None:
        now = asyncio.get_running_loop().time()
        stalled = sorted(
            (c.stalled_since, id(c), c) for c in self._held
            if c is not keep and c.stalled_since and now - c.stalled_since >= self._grace
        )
        for _, _, conn in stalled:
            if need <= 0:
                break
            need -= self._held.get(conn, 0)
            logger.warning("closing %s: stalled %.1f s holding %d bytes while memory is short",
                           conn.peer, now - conn.stalled_since, self._held.get(conn, 0))
            conn.abort()



class HttpServer:
    """Serves a :class:`Router` on a listening socket."""

    def __init__(self, router: Router, limits: ServerLimits | None = None) -> None:
        self.router = router
        self.limits = limits or ServerLimits()
        self.budget = MemoryBudget(self.limits.memory_budget, self.limits.stall_grace)
        self.connections: dict[ConnectionBase, None] = {}  # in the order they were opened
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._later: set[asyncio.Future[StreamResponse]] = set()  # later routes' answers
        self._closing = False
        self._all_closed: asyncio.Event | None = None
        self.deferred = 0  # requests the fast path answers at the end of this loop iteration
        self._deferred_answered: asyncio.Event | None = None

    async def start(self, sock: socket.socket, *, ssl: SSLContext | None = None) -> None:
        """Serve on the listening ``sock`` (TLS with ``ssl``)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.protocol, sock=sock,
                                                backlog=1024, ssl=ssl)

    def protocol(self) -> asyncio.Protocol:
        """A new connection's protocol (what the listening socket makes for each client)."""
        return Connection(self)

    async def adopt(self, sock: socket.socket, data: bytes) -> None:
        """Serve a connection another process accepted (a front worker's hand-over); ``data``:
        what it had read of it, parsed here before anything more is read."""
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: Connection(self, data), sock)

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let answers in progress finish (up to ``timeout``), close the rest."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            # A busy one (a gathered write answered at the end of this iteration, with the next
            # request's first bytes read) closes once its answer is sent (_finish: _closing).
            if conn.state is ConnectionState.IDLE or (
                conn.state is ConnectionState.HEADERS and not conn.busy
            ):
                conn.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Answers in progress: gathered writes (written at the end of a loop iteration), tasks,
        # later routes. Looked at again after each wait: a connection that was mid-body may have
        # completed a request meanwhile (answered, then closed: _finish while _closing).
        while self.deferred or self._tasks or self._later:
            left = deadline - loop.time()
            if left <= 0:
                break
            if self.deferred:
                self._deferred_answered = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._deferred_answered.wait()
                continue
            waiting: set[asyncio.Future[Any]] = {*self._tasks, *self._later}
            await asyncio.wait(waiting, timeout=left)
        for later in list(self._later):
            later.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            self._server = None

    def answered_later(self) -> None:
        """A connection answered a request its fast path deferred."""
        self.deferred -= 1
        if not self.deferred and self._deferred_answered is not None:
            self._deferred_answered.set()

    def _admit(self, conn: ConnectionBase) -> bool:
        if self._closing:
            return False
        if len(self.connections) >= self.limits.max_connections:
            oldest_idle = next((c for c in self.connections
                                if c.state is ConnectionState.IDLE), None)
            if oldest_idle is None:
                return False
            logger.info("connection cap %d reached: closing idle %s for a new client",
                        self.limits.max_connections, oldest_idle.peer)
            oldest_idle.close()
            self.connections.pop(oldest_idle, None)
        self.connections[conn] = None
        return True

    def _spawn(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
        # The caller's loop: asyncio.get_running_loop() costs a getpid() system call each time.
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

