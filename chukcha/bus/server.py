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
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from enum import Enum
from http import HTTPStatus
from ssl import SSLContext
from typing import Any, Final, cast
from urllib.parse import unquote

import httptools

from chukcha.bus.web import (
    Check,
    FastHandler,
    FileResponse,
    Handler,
    Headers,
    Request,
    Response,
    StreamResponse,
)
from chukcha.errors import BodyTooLargeError, ChukchaError

__all__ = ["HttpServer", "MemoryBudget", "Observer", "Router", "ServerLimits", "error_response"]

logger = logging.getLogger(__name__)

_SMALL_BODY: Final = 64 << 10
"""Bodies and answers up to this size do not count against the memory budget (the connection
cap bounds them)."""
_DIRECT_BODY: Final = _SMALL_BODY
"""A body with a ``Content-Length`` over this is received straight into one buffer of its
size (:class:`_BodyReader`), not through the parser's pieces."""
_FILE_PIECE: Final = 128 << 10
"""A big answer from a file is read and sent this much at a time."""
_MAX_PIPELINED: Final = 64
"""Parsed requests queued on one connection before it stops reading."""
_REASONS: Final = {s.value: s.phrase.encode() for s in HTTPStatus}


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Bounds on what clients may hold (``chukcha node --help`` lists the flags).

    Attributes:
        max_connections: open connections at most; at the cap the longest-idle keep-alive
            connection is closed for a newcomer, and with none idle the newcomer is answered
            503 and closed.
        header_timeout: seconds from a request's first byte to the end of its headers.
        body_timeout: longest pause (seconds) between two pieces of a request body.
        keepalive_timeout: an idle keep-alive connection is closed after this many seconds.
        send_timeout: a connection whose client takes no byte of its answer for this long is
            closed.
        max_header_size: bytes of request line and headers at most (431 above).
        max_body_size: request body at most (400 and close above; the node sets its batch
            limit here).
        memory_budget: bytes held at once for request bodies being received and answers
            waiting for slow clients (bodies and answers up to 64 KiB are not counted). When a
            new body or answer does not fit, connections stalled for ``stall_grace`` seconds or
            more are closed (longest stalled first); a body that still does not fit is answered
            503, an answer waits.
        stall_grace: how long a connection must have stalled before the budget may close it.
    """

    max_connections: int = 1000
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    send_timeout: float = 60.0
    max_header_size: int = 64 << 10
    max_body_size: int = 4 << 20
    memory_budget: int = 96 << 20
    stall_grace: float = 1.0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        for name in ("header_timeout", "body_timeout", "keepalive_timeout", "send_timeout",
                     "stall_grace"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_header_size < 1024 or self.max_body_size < 1:
            raise ValueError("max_header_size must be at least 1024 and max_body_size positive")
        if self.memory_budget < self.max_body_size:
            raise ValueError("memory_budget must be at least max_body_size")

    @property
    def tick(self) -> float:
        """How often a connection checks its timeouts."""
        return max(0.02, min(1.0, self.header_timeout / 4, self.body_timeout / 4,
                             self.send_timeout / 4, self.stall_grace / 2))


Observer = Callable[[str, int, float], None]
"""Told of every answer: the route (``other`` for an unknown path), the status, the seconds."""


class Router:
    """Paths to handlers (any method, as the Go server), the checks every request passes and
    the observers told of every answer (metrics)."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.fast_routes: dict[str, FastHandler] = {}
        self.checks: list[Check] = []
        self.observers: list[Observer] = []
        self.fallback: Handler | None = None  # for paths without a route (else 404)

    def add_routes(self, routes: Mapping[str, Handler]) -> None:
        for path, handler in routes.items():
            if path in self.routes:
                raise ValueError(f"route {path} is defined twice")
            self.routes[path] = handler

    def add_fast_routes(self, routes: Mapping[str, FastHandler]) -> None:
        """Synchronous fast paths of routes added before (see :data:`~chukcha.bus.web.FastHandler`):
        tried first, inside the parser's callback, when the connection has no answer pending."""
        for path, handler in routes.items():
            if path not in self.routes:
                raise ValueError(f"fast route {path} has no route")
            self.fast_routes[path] = handler

    def add_check(self, check: Check) -> None:
        self.checks.append(check)

    def add_observer(self, observer: Observer) -> None:
        self.observers.append(observer)


def error_response(exc: BaseException, request: Request | None) -> Response:
    """The plain-text answer for an exception (the server's one mapping point)."""
    if isinstance(exc, ChukchaError):
        if request is not None:
            logger.debug("%s %s -> %d %s", request.method, request.path_qs, exc.http_status, exc)
        resp = Response(status=exc.http_status, text=f"{exc}\n")
        if isinstance(exc, BodyTooLargeError):
            resp.force_close()
        return resp
    where = f"{request.method} {request.path_qs}" if request is not None else "request"
    logger.error("%s failed", where, exc_info=exc)
    return Response(status=500, text=f"internal error: {type(exc).__name__}: {exc}\n")


class MemoryBudget:
    """Bytes held for slow clients, across connections (see ``ServerLimits.memory_budget``)."""

    def __init__(self, capacity: int, stall_grace: float) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._grace = stall_grace
        self._held: dict[_Connection, int] = {}
        self._released: asyncio.Event | None = None

    def held_by(self, conn: _Connection) -> int:
        return self._held.get(conn, 0)

    def try_take(self, conn: _Connection, n: int) -> bool:
        """Take ``n`` bytes for ``conn`` now, closing long-stalled holders if needed."""
        if self.used + n > self.capacity and self.used > 0:
            self._evict(self.used + n - self.capacity, keep=conn)
            if self.used + n > self.capacity and self.used > 0:
                return False
        self._held[conn] = self._held.get(conn, 0) + n
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    async def take(self, conn: _Connection, n: int) -> None:
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

    def give_back(self, conn: _Connection) -> None:
        n = self._held.pop(conn, 0)
        if n:
            self.used -= n
            if self._released is not None:
                self._released.set()

    def _evict(self, need: int, keep: _Connection) -> None:
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


class _State(Enum):
    IDLE = "idle"  # keep-alive, between requests
    HEADERS = "headers"  # a request's first byte arrived, its headers did not end yet
    BODY = "body"  # reading a request body
    BUSY = "busy"  # the parsed request(s) are being answered


class HttpServer:
    """Serves a :class:`Router` on a listening socket."""

    def __init__(self, router: Router, limits: ServerLimits | None = None) -> None:
        self.router = router
        self.limits = limits or ServerLimits()
        self.budget = MemoryBudget(self.limits.memory_budget, self.limits.stall_grace)
        self.connections: dict[_Connection, None] = {}  # in the order they were opened
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._all_closed: asyncio.Event | None = None

    async def start(self, sock: socket.socket, *, ssl: SSLContext | None = None) -> None:
        """Serve on the listening ``sock`` (TLS with ``ssl``)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.protocol, sock=sock,
                                                backlog=1024, ssl=ssl)

    def protocol(self) -> asyncio.Protocol:
        """A new connection's protocol (what the listening socket makes for each client)."""
        return _Connection(self)

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let answers in progress finish (up to ``timeout``), close the rest."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.state is _State.IDLE or conn.state is _State.HEADERS:
                conn.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
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

    def _admit(self, conn: _Connection) -> bool:
        if self._closing:
            return False
        if len(self.connections) >= self.limits.max_connections:
            oldest_idle = next((c for c in self.connections if c.state is _State.IDLE), None)
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


class _DateCache:
    """The ``Date`` header, formatted once a second, and the whole head of the most common
    answer (an empty HTTP/1.1 200: a write) with it."""

    second = 0
    value = b""
    empty_ok = b""


def _date() -> bytes:
    now = int(time.time())
    if _DateCache.second != now:
        _DateCache.second = now
        _DateCache.value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
        _DateCache.empty_ok = b"HTTP/1.1 200 OK\r\nDate: %b\r\nContent-Length: 0\r\n\r\n" % (
            _DateCache.value)
    return _DateCache.value


def _empty_ok() -> bytes:
    """The head of an empty HTTP/1.1 200 kept alive (what :meth:`_Connection._head` makes)."""
    _date()
    return _DateCache.empty_ok


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, answers them in order, enforces the limits."""

    def __init__(self, server: HttpServer) -> None:
        self._srv = server
        self._limits = server.limits
        self._router = server.router
        # The protocol is made inside the loop. Kept: asyncio.get_running_loop() makes a
        # getpid() system call each time (one per request was a quarter of them).
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self.peer = "?"
        self.state = _State.IDLE
        self._since = 0.0  # when the current state began (the body: the last piece)
        self.stalled_since = 0.0  # sending: paused since; receiving a big body: last piece
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        # The request being parsed.
        self._url: bytes | bytearray = b""  # bytes when it came in one piece (mostly)
        self._headers = Headers()
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_len = 0
        self._direct: bytearray | None = None  # a big body's buffer (see _BodyReader)
        self._direct_len = 0
        self._expect_continue = False
        # Parsed requests waiting for their turn, and the answer in progress.
        self._pending: deque[Request] = deque()
        self._busy = False
        self._reading_paused = False
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._streaming = False
        self._chunked_out = False
        self._stream_sized = False
        self._unreleased: list[Callable[[], None]] = []  # Response.release once sent

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if not self._srv._admit(self):  # noqa: SLF001 - the server's own helper
            logger.warning("refusing %s: %d connections open (the cap)", self.peer,
                           len(self._srv.connections))
            self._closed = True
            body = b"too many connections, retry later\n"
            transport.write(self._head(503, b"text/plain; charset=utf-8", len(body), close=True)
                            + body)
            transport.close()
            return
        transport.set_write_buffer_limits(high=_SMALL_BODY, low=_SMALL_BODY // 4)
        self._since = self._loop.time()
        self._timer = self._loop.call_later(self._limits.tick, self._check_timeouts)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._unreleased.clear()  # the buffers are never reused: the transport may hold them
        # The parser and this protocol refer to each other: drop what they hold now, not at
        # the next cyclic garbage collection.
        self._body = []
        self._direct = None
        self._pending.clear()
        self._srv.connections.pop(self, None)
        self._srv.budget.give_back(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("the client closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True
        self.stalled_since = self._loop.time()

    def resume_writing(self) -> None:
        self._write_paused = False
        self.stalled_since = 0.0
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if self.state is _State.IDLE:
            self.state = _State.HEADERS
            self._since = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            self._fail(400, f"bad request: {exc}")
            return
        if self._direct is not None and self.state is _State.BODY and self._transport is not None:
            # The rest of a big body goes straight into its buffer (all of ``data`` was body).
            self._transport.set_protocol(_BodyReader(self, self._direct, self._direct_len))

    def eof_received(self) -> bool:
        return False  # close our side too (answers in progress are dropped)

    # --- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = Headers()
        self._header_bytes = 0
        self._body = []
        self._body_len = 0
        self._direct = None
        self._expect_continue = False
        if self.state is not _State.HEADERS:
            self.state = _State.HEADERS
            self._since = self._loop.time()

    def on_url(self, url: bytes) -> None:
        if not self._url:
            self._url = url
        elif isinstance(self._url, bytearray):
            self._url += url
        else:  # a second piece: gather in a bytearray (no quadratic copying)
            self._url = bytearray(self._url) + url
        self._header_bytes += len(url)
        if self._header_bytes > self._limits.max_header_size:
            self._fail(431, "request line and headers are over the limit of "
                            f"{self._limits.max_header_size} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._limits.max_header_size:
            self._fail(431, "request line and headers are over the limit of "
                            f"{self._limits.max_header_size} bytes")
            return
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._closed:
            return
        headers = self._headers
        length_text = dict.get(headers, "content-length")
        if length_text is not None and length_text.isdigit():
            length = int(length_text)
            if length > self._limits.max_body_size:
                # Answered now, before reading (or asking for, with 100-continue) the body.
                self._fail(400, str(BodyTooLargeError(self._limits.max_body_size)))
                return
            if length > _SMALL_BODY and not self._srv.budget.try_take(self, length):
                self._fail(503, "server busy: too much memory is held by slow clients, "
                                "retry later")
                return
            if length > _DIRECT_BODY and dict.get(headers, "transfer-encoding") is None:
                self._direct = bytearray(length)
                self._direct_len = 0
        expect = dict.get(headers, "expect")
        self._expect_continue = (
            expect is not None and expect.lower() == "100-continue"
            and self._parser.get_http_version() == "1.1"
        )
        self.state = _State.BODY
        self._since = self._loop.time()
        if self._expect_continue and not self._busy and not self._pending:
            self._send_continue()

    def on_body(self, body: bytes) -> None:
        if self._closed:
            return
        if self._direct is not None:  # the body's first bytes came with its headers
            end = self._direct_len + len(body)
            self._direct[self._direct_len:end] = body
            self._direct_len = end
            self._since = self.stalled_since = asyncio.get_running_loop().time()
            return
        self._body_len += len(body)
        if self._body_len > self._limits.max_body_size:
            self._fail(400, str(BodyTooLargeError(self._limits.max_body_size)))
            return
        if self._body_len > _SMALL_BODY and "content-length" not in self._headers:
            taken = self._srv.budget.held_by(self)
            if self._body_len > taken and not self._srv.budget.try_take(
                self, max(_SMALL_BODY, self._body_len - taken)
            ):
                self._fail(503, "server busy: too much memory is held by slow clients, "
                                "retry later")
                return
        self._body.append(body)
        now = self._loop.time()
        self._since = now
        if self._body_len > _SMALL_BODY:
            self.stalled_since = now

    def on_message_complete(self) -> None:
        if self._closed:
            return
        parser = self._parser
        url = self._url if isinstance(self._url, bytes) else bytes(self._url)
        path_b, _, query_b = url.partition(b"?")
        if not path_b.startswith(b"/"):  # absolute form: http://host/path
            parsed = httptools.parse_url(url)
            path_b, query_b = parsed.path or b"/", parsed.query or b""
        path = path_b.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        body: bytes | bytearray
        if self._direct is not None:
            body, self._direct = self._direct, None
        else:
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = Request(
            parser.get_method().decode("latin-1"), path, query_b.decode("latin-1"),
            self._headers, body, version=parser.get_http_version(),
            keep_alive=parser.should_keep_alive(), remote=self.peer, conn=self,
        )
        self._body = []
        self.stalled_since = 0.0
        self.state = _State.BUSY
        if self._busy:
            self._pending.append(request)
            if len(self._pending) >= _MAX_PIPELINED and self._transport is not None:
                self._transport.pause_reading()
                self._reading_paused = True
            return
        fast = self._router.fast_routes.get(path)
        if fast is not None and not self._write_paused:
            # The fast path: answered here, inside the parser's callback, with no task.
            resp = self._answer_now(request, fast)
            if resp is not None:
                if self._srv.budget.used:
                    self._srv.budget.give_back(self)  # a big body's share, if it had one
                if self._finish(request, resp):
                    self.close()
                else:
                    self.state = _State.IDLE
                    self._since = self._loop.time()
                return
        self._busy = True
        self._srv._spawn(self._loop, self._answer(request))  # noqa: SLF001 - the server's own helper

    def body_received(self) -> None:
        """A big body is all in its buffer (:class:`_BodyReader`): the request is complete.

        The parser still waits for the body it never saw; a new one takes over at the next
        request (the old one still answers for this request's method, version and keep-alive)."""
        self.on_message_complete()
        self._parser = httptools.HttpRequestParser(self)
        if self._transport is not None and not self._closed:
            self._transport.set_protocol(self)

    # --- answering -------------------------------------------------------------------------

    async def _answer(self, request: Request | None) -> None:
        while request is not None and not self._closed:
            close = await self._answer_one(request)
            if self._write_paused and not self._closed:
                await self._wait_drained()
            self._srv.budget.give_back(self)
            if close or self._closed:
                self.close()
                return
            request = self._pending.popleft() if self._pending else None
            if self._reading_paused and len(self._pending) < _MAX_PIPELINED // 2:
                self._reading_paused = False
                if self._transport is not None:
                    self._transport.resume_reading()
        self._busy = False
        if self.state is _State.BUSY:
            self.state = _State.IDLE
            self._since = self._loop.time()
        elif self.state is _State.BODY and self._expect_continue:
            self._send_continue()  # the next request waited for its turn to be asked for

    def _answer_now(self, request: Request, fast: FastHandler) -> StreamResponse | None:
        """Run the checks and a route's fast path: the answer (observed), or ``None`` when the
        request needs the route's handler."""
        observers = self._router.observers
        t0 = time.perf_counter() if observers else 0.0
        try:
            for check in self._router.checks:
                refused = check(request)
                if refused is not None:
                    resp: StreamResponse = refused
                    break
            else:
                answer = fast(request)
                if answer is None:
                    return None
                resp = answer
        except Exception as exc:  # noqa: BLE001 - the one place errors become answers
            resp = error_response(exc, request)
        if observers:
            seconds = time.perf_counter() - t0
            for observe in observers:
                observe(request.path, resp.status, seconds)  # a fast route is a route
        return resp

    async def _respond(self, request: Request) -> StreamResponse:
        """Run the checks and the handler: the answer, or the error it became."""
        try:
            for check in self._router.checks:
                resp = check(request)
                if resp is not None:
                    return resp
            handler = self._router.routes.get(request.path) or self._router.fallback
            if handler is None:
                return Response(status=404, text="not found\n")
            return await handler(request)
        except asyncio.CancelledError:
            self.abort()
            raise
        except Exception as exc:  # noqa: BLE001 - the one place errors become answers
            if self._closed:  # the client left; nobody to answer
                logger.debug("%s %s: the client left: %r", request.method, request.path, exc)
                return Response(status=500)
            return error_response(exc, request)

    async def _answer_one(self, request: Request) -> bool:
        """Answer one request. True: close the connection."""
        if self._unreleased:
            self._release_sent()
        fast = self._router.fast_routes.get(request.path)
        if fast is not None:
            now = self._answer_now(request, fast)
            if now is not None:
                return self._finish(request, now)
        observers = self._router.observers
        if observers:
            t0 = time.perf_counter()
            resp = await self._respond(request)
            seconds = time.perf_counter() - t0
            route = request.path if request.path in self._router.routes else "other"
            for observe in observers:
                observe(route, resp.status, seconds)
        else:
            resp = await self._respond(request)
        if self._closed:
            if isinstance(resp, FileResponse):
                os.close(resp.fd)
            return True  # the client left (perhaps while a stream was being written)
        if not isinstance(resp, Response):
            if self._streaming:
                sized_or_chunked = self._chunked_out or self._stream_sized
                self.end_stream()
                return not request.keep_alive or not sized_or_chunked
            resp = Response(status=resp.status, headers=resp.headers)
        if self._streaming:  # a stream started, then the handler failed: nothing sane to add
            return True
        if isinstance(resp, FileResponse):
            close = resp.close or not request.keep_alive or self._srv._closing  # noqa: SLF001
            await self._send_file(resp, request, close)
            return close
        return self._finish(request, resp)

    def _finish(self, request: Request, resp: StreamResponse) -> bool:
        """Send a complete answer (a :class:`Response`; anything else is sent as its status
        and headers). True: close the connection."""
        if not isinstance(resp, Response):
            resp = Response(status=resp.status, headers=resp.headers)
        close = resp.close or not request.keep_alive or self._srv._closing  # noqa: SLF001
        self._write_response(resp, request, close)
        return close

    async def _send_file(self, resp: FileResponse, request: Request, close: bool) -> None:
        """Send a file range piece by piece, each read once the client took the last one."""
        try:
            head = self._head(resp.status, b"application/octet-stream", resp.length, close=close,
                              version=request.version, keep_alive=request.keep_alive)
            pos, end = resp.offset, resp.offset + resp.length
            while pos < end and not self._closed and self._transport is not None:
                want = min(_FILE_PIECE, end - pos)
                piece = await asyncio.to_thread(os.pread, resp.fd, want, pos)
                if len(piece) < want:  # acked (truncated) meanwhile: never send wrong bytes
                    logger.info("%s: chunk shrank while being sent; closing", self.peer)
                    self.abort()
                    return
                if head:
                    self._transport.writelines((head, piece))
                    head = b""
                else:
                    self._transport.write(piece)
                pos += want
                if resp.on_sent is not None:
                    resp.on_sent(piece)
                del piece
                if self._write_paused and pos < end:
                    await self._wait_drained()
        except ConnectionError:
            pass
        finally:
            os.close(resp.fd)

    def _write_response(self, resp: Response, request: Request, close: bool) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        body = resp.body
        content_type = resp.content_type
        if (not body and not content_type and resp.status == 200 and not resp.headers
                and not close and request.version == "1.1"):
            transport.write(_empty_ok())  # a write's answer: built once a second
            return
        if resp.headers and any(k.lower() == "content-type" for k in resp.headers):
            content_type = ""  # set in the headers (aiohttp style): that one wins
        head = self._head(resp.status, content_type.encode() if content_type else b"",
                          len(body), close=close, version=request.version,
                          headers=resp.headers, keep_alive=request.keep_alive)
        if len(body) <= 16384:
            transport.write(head + body if body else head)
        else:
            transport.writelines((head, body))
        if resp.release is not None:
            self._unreleased.append(resp.release)
            self._release_sent()

    def _release_sent(self) -> None:
        """Give back the buffers of answers sent (the transport holds no byte of them)."""
        if self._transport is not None and not self._closed \
                and self._transport.get_write_buffer_size() == 0:
            unreleased, self._unreleased = self._unreleased, []
            for release in unreleased:
                release()

    @staticmethod
    def _head(
        status: int, content_type: bytes, length: int | None, *, close: bool,
        version: str = "1.1", headers: Mapping[str, str] | None = None, keep_alive: bool = True,
    ) -> bytes:
        # HTTP/1.1 answers everything but 1.0 (a 0.9 request line gets a 1.1 answer too).
        proto = b"HTTP/1.0" if version == "1.0" else b"HTTP/1.1"
        parts = [b"%b %d %b\r\n" % (proto, status, _REASONS.get(status, b"")),
                 b"Date: %b\r\n" % _date()]
        if length is not None:
            parts.append(b"Content-Length: %d\r\n" % length)
        if content_type:
            parts.append(b"Content-Type: %b\r\n" % content_type)
        for name, value in (headers or {}).items():
            parts.append(b"%b: %b\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        if close:
            parts.append(b"Connection: close\r\n")
        elif version == "1.0" and keep_alive:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _send_continue(self) -> None:
        self._expect_continue = False
        if self._transport is not None and not self._closed:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def _wait_drained(self) -> None:
        loop = asyncio.get_running_loop()
        self._drained = loop.create_future()
        try:
            await self._drained
        finally:
            self._drained = None

    # --- streams (StreamSink) ----------------------------------------------------------

    def start_stream(self, status: int, headers: Mapping[str, str]) -> None:
        if self._closed or self._transport is None:
            raise ConnectionResetError("the client closed the connection")
        self._streaming = True
        content_type = headers.get("Content-Type", "").encode("latin-1")
        length = next((v for k, v in headers.items() if k.lower() == "content-length"), None)
        extra = {k: v for k, v in headers.items()
                 if k.lower() not in ("content-type", "content-length")}
        self._stream_sized = length is not None  # the handler writes exactly that many bytes
        self._chunked_out = not self._stream_sized and self._parser.get_http_version() == "1.1"
        if self._chunked_out:
            extra["Transfer-Encoding"] = "chunked"
        self._transport.write(self._head(
            status, content_type, int(length) if length is not None else None,
            close=not (self._chunked_out or self._stream_sized), headers=extra,
            version=self._parser.get_http_version(),
        ))

    async def write_stream(self, data: bytes) -> None:
        if self._closed or self._transport is None:
            raise ConnectionResetError("the client closed the connection")
        if data:
            if self._chunked_out:
                self._transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
            else:
                self._transport.write(data)
        if self._write_paused:
            await self._wait_drained()

    def end_stream(self) -> None:
        if self._streaming and self._chunked_out and self._transport is not None \
                and not self._closed:
            self._transport.write(b"0\r\n\r\n")
        self._streaming = False

    async def hold_memory(self, n: int) -> None:
        """Count ``n`` bytes of an answer being built against the memory budget."""
        if n > _SMALL_BODY:
            await self._srv.budget.take(self, n)

    # --- limits and closing ------------------------------------------------------------

    def _check_timeouts(self) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        limits = self._limits
        if self._unreleased:
            self._release_sent()
        age = now - self._since
        reason = ""
        if self._write_paused and self.stalled_since and \
                now - self.stalled_since > limits.send_timeout:
            reason = f"took no answer bytes for {limits.send_timeout:g} s"
        elif self.state is _State.IDLE and not self._busy and age > limits.keepalive_timeout:
            self.close()  # an idle keep-alive connection: nothing to say
            return
        elif self.state is _State.HEADERS and age > limits.header_timeout:
            reason = f"sent no complete request headers within {limits.header_timeout:g} s"
        elif self.state is _State.BODY and age > limits.body_timeout:
            reason = f"paused for over {limits.body_timeout:g} s inside a request body"
        if reason:
            logger.info("closing %s: it %s", self.peer, reason)
            if self.state in (_State.HEADERS, _State.BODY) and not self._busy:
                self._fail(408, f"request timeout: the client {reason}")
            else:
                self.abort()
            return
        self._timer = loop.call_later(limits.tick, self._check_timeouts)

    def _fail(self, status: int, reason: str) -> None:
        """Answer a request that cannot be parsed or accepted, and close the connection."""
        if self._closed:
            return
        logger.debug("%s: %d %s", self.peer, status, reason)
        transport = self._transport
        self._closed = True
        self._direct = None
        if transport is not None:
            if not self._busy and not self._streaming:
                body = f"{reason}\n".encode()
                transport.write(self._head(status, b"text/plain; charset=utf-8", len(body),
                                           close=True) + body)
            transport.close()
        self._srv.connections.pop(self, None)
        self._srv.budget.give_back(self)

    def close(self) -> None:
        self._closed = True
        self._direct = None
        if self._transport is not None:
            self._transport.close()
        self._srv.connections.pop(self, None)

    def abort(self) -> None:
        self._closed = True
        self._unreleased.clear()
        self._body = []
        self._direct = None
        self._pending.clear()
        if self._transport is not None:
            self._transport.abort()
        self._srv.connections.pop(self, None)
        self._srv.budget.give_back(self)


class _BodyReader(asyncio.BufferedProtocol):
    """Receives the rest of a big body (``Content-Length`` over 64 KiB) straight from the socket
    into the one buffer of its size, then hands the connection back to its :class:`_Connection`.

    The parser would hand the body over in pieces of the event loop's read size, each copied
    into a new ``bytes`` and then joined: three copies of every byte before the chunk file's
    ``write``. Here the kernel copies it once into place. Asked for exactly what is left of the
    body, it never reads past it, so pipelined requests behind it stay for the parser.
    """

    __slots__ = ("_buf", "_conn", "_filled", "_view")

    def __init__(self, conn: _Connection, buf: bytearray, filled: int) -> None:
        self._conn = conn
        self._buf = buf
        self._view = memoryview(buf)
        self._filled = filled

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view[self._filled:]

    def buffer_updated(self, nbytes: int) -> None:
        conn = self._conn
        if conn._closed:  # noqa: SLF001 - the connection's own helper
            return
        self._filled += nbytes
        conn._direct_len = self._filled  # noqa: SLF001
        conn._since = conn.stalled_since = asyncio.get_running_loop().time()  # noqa: SLF001
        if self._filled >= len(self._buf):
            self._view.release()
            conn.body_received()

    def eof_received(self) -> bool:
        return self._conn.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._view.release()
        self._conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self._conn.pause_writing()

    def resume_writing(self) -> None:
        self._conn.resume_writing()
