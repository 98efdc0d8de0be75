"""One client connection of the node's HTTP server (:mod:`chukcha.bus.server`): the
``asyncio.Protocol`` that feeds llhttp (``httptools``), answers requests in order and enforces
the :class:`~chukcha.bus.routing.ServerLimits` (timeouts, header and body sizes, the memory
budget, pipelining depth).

The most common answers are made inside the parser's callback with no task (a route's fast
path, see :meth:`Router.add_fast_routes <chukcha.bus.routing.Router.add_fast_routes>`); the
rest run as a task per connection. A big body is received straight into one buffer by a
:class:`~chukcha.bus.body_reader.BodyReader`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import time
from typing import Final, cast
from urllib.parse import unquote

import httptools

from chukcha.bus.body_reader import BodyReader
from chukcha.bus.connection_base import SMALL_BODY as _SMALL_BODY
from chukcha.bus.connection_base import ConnectionBase, ConnectionState
from chukcha.bus.http_simple import HEADER_NAMES as _HEADER_NAMES
from chukcha.bus.http_simple import simple_request
from chukcha.bus.http_wire import empty_ok_head
from chukcha.bus.routing import error_response
from chukcha.bus.web import (
    LATER,
    Check,
    FastHandler,
    FileResponse,
    Headers,
    Later,
    Outcome,
    Request,
    Response,
    StreamResponse,
)
from chukcha.errors import BodyTooLargeError

# ConnectionState is defined with the connection's state (connection_base); callers import it
# from here, with the connection.
__all__ = ["Connection", "ConnectionState"]

logger = logging.getLogger(__name__)

_DIRECT_BODY: Final = _SMALL_BODY
"""A body with a ``Content-Length`` over this is received straight into one buffer of its
size (:class:`~chukcha.bus.body_reader.BodyReader`), not through the parser's pieces."""
_SIMPLE_MAX: Final = 16384
"""Requests up to this size (a single write's) are first offered to
:func:`~chukcha.bus.http_simple.simple_request`."""
_MAX_PIPELINED: Final = 64
"""Parsed requests queued on one connection before it stops reading."""
_METHODS: Final = {m.encode(): m for m in ("GET", "POST", "PUT", "HEAD", "DELETE")}
_NO_CHECKS: Final[list[Check]] = []
_IDLE: Final = ConnectionState.IDLE
_BUSY: Final = ConnectionState.BUSY
_BODY: Final = ConnectionState.BODY
_perf_counter: Final = time.perf_counter
_EMPTY_OK: Final = Response()
"""A deferred write's answer (never changed)."""


class Connection(ConnectionBase):
    """One client connection: parses requests, answers them in order, enforces the limits
    (the state, sending and closing: :class:`~chukcha.bus.connection_base.ConnectionBase`)."""

    _in_body_reader = 0
    """1 while :meth:`body_received` runs (the transport holds a view of the body's buffer)."""

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
        if self._initial:
            data, self._initial = self._initial, b""
            self.data_received(data)

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
        if self._closed or self._refusal is not None:
            return
        if self.state is _IDLE:
            handover = self._router.handover
            if handover is not None and self._transport is not None and not self._srv._closing \
                    and handover(self._transport, data):  # noqa: SLF001 - the server's own
                self._closed = True  # another process serves it now
                self._srv.connections.pop(self, None)
                return
            if len(data) <= _SIMPLE_MAX and not self._busy:
                simple = simple_request(data, self._max_header, self._max_body)
                if simple is not None and self._serve_simple(*simple):
                    return
            self.state = ConnectionState.HEADERS
            self._since = self._loop.time()
            if len(data) > _DIRECT_BODY:  # a request's start and much more: a big body's?
                end = data.find(b"\r\n\r\n", 0, self._limits.max_header_size + 4)
                if end >= 0:
                    self._head_first(data, end + 4)
                    return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            self._fail(400, f"bad request: {exc}")
            return
        if self._direct is not None and self.state is ConnectionState.BODY \
                and self._transport is not None:
            # The rest of a big body goes straight into its buffer (all of ``data`` was body).
            self._transport.set_protocol(BodyReader(self, self._direct, self._direct_len))

    def _serve_simple(self, method: str, path: str, query: str, headers: Headers,
                      body: bytes) -> bool:
        """Answer a whole simple request (:func:`~chukcha.bus.http_simple.simple_request`)
        as :meth:`on_message_complete` answers it, without the parser; ``False``: its route
        is neither a fast nor a later one (the parser takes the bytes, as before: a handler
        may stream, which asks the parser for the HTTP version)."""
        router = self._router
        fast = router.fast_routes.get(path)
        if fast is None and path not in router.later_routes:
            return False
        request = Request(method, path, query, Headers(headers), body, remote=self.peer,
                          conn=self)  # (headers: the dict kept for this head, copied)
        self._expect_continue = False
        self.stalled_since = 0.0
        self.state = _BUSY
        if fast is not None and not self._write_paused and self._answer_fast(request, fast):
            return True
        self._busy = True
        if router.later_routes and self._answer_later(request):
            return True
        self._srv._spawn(self._loop, self._answer(request))  # noqa: SLF001 - the server's own helper
        return True

    def _head_first(self, data: bytes, split: int) -> None:
        """``data`` begins with a request whose headers end at ``split``: the parser gets the
        headers alone; when they announce a big body that ``data`` holds only the start of
        (a bulk write's first read), that start is copied into the body's buffer once and the
        rest is received straight into it (:class:`BodyReader`).

        Why: fed whole, the parser handed the body's start (up to ~256 KB per 1 MiB body)
        over as a new ``bytes``, copied again into the buffer: two copies and a callback
        more, in a profile ~5 % of the node's CPU for bulk writes."""
        view = memoryview(data)
        if not self._feed(view[:split]) or self._closed or self._refusal is not None:
            return
        rest = view[split:]
        direct = self._direct
        if (direct is not None and self.state is ConnectionState.BODY
                and self._transport is not None and len(rest) < len(direct) - self._direct_len):
            start, self._direct_len = self._direct_len, self._direct_len + len(rest)
            with memoryview(direct) as into:
                into[start:self._direct_len] = rest
            self._since = self.stalled_since = self._loop.time()
            self._transport.set_protocol(BodyReader(self, direct, self._direct_len))
            return
        if rest and self._feed(rest) and self._direct is not None \
                and self.state is ConnectionState.BODY and self._transport is not None:
            self._transport.set_protocol(BodyReader(self, self._direct, self._direct_len))

    def _feed(self, data: bytes | memoryview) -> bool:
        """Parse ``data``; ``False``: it was refused (answered with a 400, closing)."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
            return False
        except httptools.HttpParserError as exc:
            self._fail(400, f"bad request: {exc}")
            return False
        return True

    def eof_received(self) -> bool:
        return False  # close our side too (answers in progress are dropped)

    # --- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._refusal is not None:
            return
        self._url = b""
        self._headers = Headers()
        self._header_bytes = 0
        self._body = []
        self._body_len = 0
        self._direct = None
        self._expect_continue = False
        if self.state is not ConnectionState.HEADERS:
            self.state = ConnectionState.HEADERS
            self._since = self._loop.time()

    def on_url(self, url: bytes) -> None:
        if not self._url:
            self._url = url
        elif isinstance(self._url, bytearray):
            self._url += url
        else:  # a second piece: gather in a bytearray (no quadratic copying)
            self._url = bytearray(self._url) + url
        self._header_bytes += len(url)
        if self._header_bytes > self._max_header:
            self._fail(431, "request line and headers are over the limit of "
                            f"{self._max_header} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self._header_bytes + len(name) + len(value) + 4
        self._header_bytes = size
        if size > self._max_header:
            self._fail(431, "request line and headers are over the limit of "
                            f"{self._max_header} bytes")
            return
        key = _HEADER_NAMES.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
        self._headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._closed or self._refusal is not None:
            return
        headers = self._headers
        length_text = dict.get(headers, "content-length")
        if length_text is not None and length_text.isdigit():
            length = int(length_text)
            if length > self._max_body:
                # Answered now, before reading (or asking for, with 100-continue) the body.
                self._fail(400, str(BodyTooLargeError(self._max_body)))
                return
            if length > _SMALL_BODY:
                if not self._srv.budget.try_take(self, length):
                    self._fail(503, "server busy: too much memory is held by slow clients, "
                                    "retry later")
                    return
                if length > _DIRECT_BODY and dict.get(headers, "transfer-encoding") is None:
                    self._direct = self._srv.budget.body_buffer(length)
                    self._direct_len = 0
        self.state = ConnectionState.BODY
        self._since = self._loop.time()
        expect = dict.get(headers, "expect")
        if expect is not None:  # else _expect_continue stays False (on_message_begin)
            self._expect_continue = (
                expect.lower() == "100-continue" and self._parser.get_http_version() == "1.1"
            )
            if self._expect_continue and not self._busy and not self._pending:
                self._send_continue()

    def on_body(self, body: bytes) -> None:
        if self._closed or self._refusal is not None:
            return
        if self._direct is not None:  # the body's first bytes came with its headers
            end = self._direct_len + len(body)
            # Through a memoryview: a bytearray's slice assignment from bytes copies them first.
            with memoryview(self._direct) as view:
                view[self._direct_len:end] = body
            self._direct_len = end
            self._since = self.stalled_since = self._loop.time()
            return
        size = self._body_len + len(body)
        self._body_len = size
        if size > _SMALL_BODY:
            if size > self._max_body:
                self._fail(400, str(BodyTooLargeError(self._max_body)))
                return
            if "content-length" not in self._headers:
                taken = self._srv.budget.held_by(self)
                if size > taken and not self._srv.budget.try_take(
                    self, max(_SMALL_BODY, size - taken)
                ):
                    self._fail(503, "server busy: too much memory is held by slow clients, "
                                    "retry later")
                    return
            self.stalled_since = self._since = self._loop.time()
        elif size > self._max_body:
            self._fail(400, str(BodyTooLargeError(self._max_body)))
            return
        else:
            self._since = self._loop.time()
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._closed or self._refusal is not None:
            return
        parser = self._parser
        url = self._url
        if type(url) is not bytes:
            url = bytes(url)
        path_b, _, query_b = url.partition(b"?")
        if not path_b.startswith(b"/") or b"#" in url:  # absolute form; a fragment (no query)
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
        headers = self._headers
        keep_alive = parser.should_keep_alive()
        # llhttp keeps a connection alive by default only for HTTP/1.1, and by a Connection
        # header otherwise: without one, a kept-alive request is 1.1 (get_http_version formats
        # a string, ~0.3 us: a tenth of a small write's Python time).
        version = "1.1" if keep_alive and dict.get(headers, "connection") is None \
            else parser.get_http_version()
        method = parser.get_method()
        request = Request(
            _METHODS.get(method) or method.decode("latin-1"), path, query_b.decode("latin-1"),
            headers, body, version=version, keep_alive=keep_alive, remote=self.peer, conn=self,
        )
        del body  # the request's only (a big one's buffer is reused once it is answered)
        self._body = []
        self.stalled_since = 0.0
        self.state = ConnectionState.BUSY
        if self._busy:
            self._pending.append(request)
            if len(self._pending) >= _MAX_PIPELINED and self._transport is not None:
                self._transport.pause_reading()
                self._reading_paused = True
            return
        fast = self._router.fast_routes.get(path)
        if fast is not None and not self._write_paused and self._answer_fast(request, fast):
            return
        self._busy = True
        if self._router.later_routes and self._answer_later(request):
            return
        self._srv._spawn(self._loop, self._answer(request))  # noqa: SLF001 - the server's own helper

    def _answer_fast(  # noqa: PLR0912 - every small write runs it: one frame
        self, request: Request, fast: FastHandler,
    ) -> bool:
        """The fast path: the answer made here, inside the parser's callback, with no task, or
        (a small write) at the end of this loop iteration by :meth:`deliver`. ``False``: the
        request needs its handler.

        What :meth:`_answer_now` does, written out: this runs for every small write."""
        srv = self._srv
        # Small writes are gathered per loop iteration (ChunkStore.write_later): one chunk
        # write, and the answers sent in one burst at the iteration's end. Measured on 2 cores
        # at load 3 (bench/bench_vs_go.py, docs/PERFORMANCE.md), 8 connections: 31 us of node
        # CPU per write against 44 us for answering each at once, and 1.7x the rate; one
        # request per iteration costs about the same either way. Answering the first write of
        # each iteration at once and gathering the rest cost 45 against 39 us at load 13-16.
        # Only while serving: a stopping server answers at once.
        request.deferrable = not srv._closing  # noqa: SLF001 - the server's own flag
        router = self._router
        observers = router.observers
        t0 = _perf_counter() if observers else 0.0
        resp: StreamResponse
        checks = router.checks
        if checks:
            only_with = router.checks_only_with
            if only_with is not None and only_with.isdisjoint(request.headers):
                checks = _NO_CHECKS  # every check lets it through (Router.add_check)
        try:
            for check in checks:
                refused = check(request)
                if refused is not None:
                    resp = refused
                    break
            else:
                answer = fast(request)
                if answer is None:
                    return False
                if answer is LATER:  # deliver observes it
                    self._later_since = t0
                    self._busy = True  # requests behind it wait (pipelining keeps its order)
                    srv.deferred += 1
                    return True
                resp = cast(StreamResponse, answer)
        except Exception as exc:  # noqa: BLE001 - the one place errors become answers
            resp = error_response(exc, request)
        if observers:
            seconds = _perf_counter() - t0
            for observe in observers:
                observe(request.path, resp.status, seconds)  # a fast route is a route
        if srv.budget.used:
            srv.budget.give_back(self)  # a big body's share, if it had one
        if type(request.body) is bytearray:  # a big write's buffer, reused at once
            # Besides this frame's ``request``, the caller's; inside BodyReader's callback,
            # the transport's view of the buffer (it read into) refers to the body too.
            self._recycle_body(request, held=1, viewed=self._in_body_reader)
        if self._finish(request, resp):
            self.close()
        else:
            self.state = _IDLE
            self._since = self._loop.time()
        return True

    def deliver(self, request: Request, outcome: Outcome) -> None:
        """Answer the request the fast path deferred (:meth:`Request.done`): an empty 200, the
        answer an exception becomes, or the answer given; then go on with the requests that
        waited behind it."""
        srv = self._srv
        srv.deferred -= 1  # HttpServer.answered_later, written out
        if not srv.deferred and srv._deferred_answered is not None:  # noqa: SLF001
            srv._deferred_answered.set()  # noqa: SLF001 - stop() waits for it
        resp: StreamResponse
        if outcome is None:
            resp = _EMPTY_OK
            status = 200
        else:
            resp = _answer_of(outcome, request)
            status = resp.status
        observers = self._router.observers
        if observers:
            seconds = _perf_counter() - self._later_since
            for observe in observers:
                observe(request.path, status, seconds)
        transport = self._transport
        if self._closed or transport is None:
            return  # the client left; the write was done all the same
        if resp is _EMPTY_OK and request.keep_alive and request.version == "1.1" \
                and not srv._closing:  # noqa: SLF001 - what _finish would send
            if srv.budget.used:
                srv.budget.give_back(self)
            transport.write(empty_ok_head())
            # _go_on, written out for the common case: nothing queued behind it.
            if self._pending or self._refusal is not None:
                self._go_on()
                return
            self._busy = False
            state = self.state
            if state is _BUSY:
                self.state = _IDLE
                self._since = self._loop.time()
            elif state is _BODY and self._expect_continue:
                self._send_continue()  # the next request waited for its turn to be asked for
        else:
            self._answered_out_of_turn(request, resp)

    def body_received(self) -> None:
        """A big body is all in its buffer (:class:`BodyReader`): the request is complete.

        The parser still waits for the body it never saw; a new one takes over at the next
        request (the old one still answers for this request's method, version and keep-alive)."""
        self._in_body_reader = 1
        try:
            self.on_message_complete()
        finally:
            self._in_body_reader = 0
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
            if type(request.body) is bytearray:
                self._recycle_body(request)
            if close or self._closed:
                self.close()
                return
            request = self._pending.popleft() if self._pending else None
            if self._reading_paused and len(self._pending) < _MAX_PIPELINED // 2:
                self._reading_paused = False
                if self._transport is not None and self._refusal is None:
                    self._transport.resume_reading()
        if self._refusal is not None:
            self._send_refusal()
        else:
            self._all_answered()

    def _recycle_body(self, request: Request, held: int = 0, viewed: int = 0) -> None:
        """Give an answered request's big-body buffer back for reuse, unless anything else still
        refers to the request or to its body (a handler that kept either keeps the buffer).
        ``held``: more references to ``request`` that the caller knows of; ``viewed``: to the
        body."""
        body = request.body
        # The references when nothing else holds them: the caller's ``request`` and this
        # parameter (3 with getrefcount's argument); ``request.body`` and ``body`` (3 too).
        if (len(body) > _DIRECT_BODY and sys.getrefcount(request) <= 3 + held
                and sys.getrefcount(body) <= 3 + viewed and isinstance(body, bytearray)):
            request.body = b""
            self._srv.budget.recycle(body)

    def _answer_later(self, request: Request) -> bool:
        """Try the request's later route (:meth:`Router.add_later_routes`); True: taken."""
        later = self._router.later_routes.get(request.path)
        if later is None or self._write_paused or self._router.checks:
            return False
        if self._router.observers:
            self._later_since = time.perf_counter()
        answer = later(request)
        if answer is None:
            return False
        self._srv._later.add(answer)  # noqa: SLF001 - stop() waits for it
        answer.add_done_callback(functools.partial(self._later_answer, request))
        return True

    def _later_answer(self, request: Request, answer: asyncio.Future[StreamResponse]) -> None:
        """A later route's answer came (:meth:`Router.add_later_routes`): send it, then answer
        the requests that queued behind it."""
        self._srv._later.discard(answer)  # noqa: SLF001 - the server's own set
        if answer.cancelled():
            if self._closed:
                self._busy = False
            else:
                self.abort()  # stopping: past the grace period
            return
        exc = answer.exception()
        resp = error_response(exc, request) if exc is not None else answer.result()
        observers = self._router.observers
        if observers:  # as the handler's and the fast path's answers are
            seconds = time.perf_counter() - self._later_since
            for observe in observers:
                observe(request.path, resp.status, seconds)
        if self._closed:  # the client left
            self._busy = False
            return
        self._answered_out_of_turn(request, resp)

    def _answered_out_of_turn(self, request: Request, resp: StreamResponse) -> None:
        """Send the answer of a request answered without a task (a later route, a deferred fast
        path), then go on with the requests that queued behind it."""
        close = self._finish(request, resp)
        if self._srv.budget.used:
            self._srv.budget.give_back(self)  # a big body's share, if it had one
        if close:
            self._busy = False
            self.close()
        else:
            self._go_on()

    def _go_on(self) -> None:
        """After an answer sent without a task: answer the requests queued behind it, or wait
        for the next one."""
        if self._pending:
            self._srv._spawn(self._loop, self._answer(  # noqa: SLF001 - the server's own helper
                self._pending.popleft()))
        elif self._refusal is not None:
            self._send_refusal()
        else:
            self._all_answered()

    def _all_answered(self) -> None:
        """No request is left to answer: idle, or ask for the body of the one being read."""
        self._busy = False
        if self.state is ConnectionState.BUSY:
            self.state = ConnectionState.IDLE
            self._since = self._loop.time()
        elif self.state is ConnectionState.BODY and self._expect_continue:
            self._send_continue()  # the next request waited for its turn to be asked for

    def _answer_now(self, request: Request, fast: FastHandler) -> StreamResponse | Later | None:
        """Run the checks and a route's fast path: the answer (observed), :data:`LATER`
        (``deliver`` observes it), or ``None`` when the request needs the route's handler."""
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
                if isinstance(answer, Later):
                    self._later_since = t0
                    return answer
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
            request.deferrable = False  # answered here, in order
            now = self._answer_now(request, fast)
            if isinstance(now, StreamResponse):
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


def _answer_of(outcome: BaseException | StreamResponse, request: Request) -> StreamResponse:
    """The answer a deferred request's outcome (:meth:`Request.done`) becomes."""
    return error_response(outcome, request) if isinstance(outcome, BaseException) else outcome
