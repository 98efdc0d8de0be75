"""The state of one client connection (:class:`~chukcha.bus.connection.Connection`) and its
sending side: complete answers, files sent piece by piece, streams (``StreamSink``), the
timeouts of :class:`~chukcha.bus.routing.ServerLimits`, refusals and closing.

:class:`ConnectionBase` is the base of :class:`~chukcha.bus.connection.Connection`, which adds
the ``asyncio.Protocol`` callbacks, the parser's callbacks and the order of answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable, Mapping
from enum import Enum
from typing import TYPE_CHECKING, Final

import httptools

from chukcha.bus.http_wire import empty_ok_head, response_head
from chukcha.bus.web import FileResponse, Headers, Request, Response, StreamResponse

if TYPE_CHECKING:  # the server makes its connections; a connection reports back to it
    from chukcha.bus.server import HttpServer

__all__ = ["SMALL_BODY", "ConnectionBase", "ConnectionState"]

logger = logging.getLogger("chukcha.bus.connection")  # one logger for a connection's records

SMALL_BODY: Final = 64 << 10
"""Bodies and answers up to this size do not count against the memory budget (the connection
cap bounds them)."""
_SMALL_BODY: Final = SMALL_BODY

_FILE_PIECE: Final = 128 << 10
"""A big answer from a file is read and sent this much at a time."""


class ConnectionState(Enum):
    IDLE = "idle"  # keep-alive, between requests
    HEADERS = "headers"  # a request's first byte arrived, its headers did not end yet
    BODY = "body"  # reading a request body
    BUSY = "busy"  # the parsed request(s) are being answered


class ConnectionBase(asyncio.Protocol):
    """A connection's state and how it sends answers, enforces the timeouts and closes (the
    base of :class:`~chukcha.bus.connection.Connection`)."""

    def __init__(self, server: HttpServer, initial: bytes = b"") -> None:
        self._srv = server
        self._initial = initial  # read by another process (HttpServer.adopt)
        self._limits = server.limits
        # Read for every request: kept here, one attribute away.
        self._max_header = server.limits.max_header_size
        self._max_body = server.limits.max_body_size
        self._router = server.router
        # The protocol is made inside the loop. Kept: asyncio.get_running_loop() makes a
        # getpid() system call each time (one per request was a quarter of them).
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self.peer = "?"
        self.state = ConnectionState.IDLE
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
        self._direct: bytearray | None = None  # a big body's buffer (see BodyReader)
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
        self._later_since = 0.0  # when the answer in progress was deferred (fast or later route)
        # A request refused (_fail) while the ones before it were still being answered: its
        # answer, sent after theirs, then the connection closes. Nothing more is parsed.
        self._refusal: bytes | None = None

    @property
    def busy(self) -> bool:
        """A request of this connection is being answered (perhaps with more read behind it)."""
        return self._busy

    # --- sending answers ------------------------------------------------------------------

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
            if request.method == "HEAD":  # the head alone (see _write_response)
                if self._transport is not None and not self._closed:
                    self._transport.write(head)
                return
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
            transport.write(empty_ok_head())  # a write's answer: built once a second
            return
        if resp.headers and any(k.lower() == "content-type" for k in resp.headers):
            content_type = ""  # set in the headers (aiohttp style): that one wins
        length = len(body)
        headers = resp.headers
        if request.method == "HEAD":
            # The head a GET would get, and no body (a client reads what follows a HEAD
            # answer as the next answer). A relayed one says its length (chukcha.bus.front).
            if headers and "Content-Length" in headers:
                headers = dict(headers)
                length = int(headers.pop("Content-Length"))
            body = b""
        head = self._head(resp.status, content_type.encode() if content_type else b"",
                          length, close=close, version=request.version,
                          headers=headers, keep_alive=request.keep_alive)
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

    _head = staticmethod(response_head)

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
        elif self.state is ConnectionState.IDLE and not self._busy \
                and age > limits.keepalive_timeout:
            self.close()  # an idle keep-alive connection: nothing to say
            return
        elif self.state is ConnectionState.HEADERS and age > limits.header_timeout:
            reason = f"sent no complete request headers within {limits.header_timeout:g} s"
        elif self.state is ConnectionState.BODY and age > limits.body_timeout:
            reason = f"paused for over {limits.body_timeout:g} s inside a request body"
        if reason:
            logger.info("closing %s: it %s", self.peer, reason)
            if self.state in (ConnectionState.HEADERS, ConnectionState.BODY) and not self._busy:
                self._fail(408, f"request timeout: the client {reason}")
            else:
                self.abort()
            return
        self._timer = loop.call_later(limits.tick, self._check_timeouts)

    def _fail(self, status: int, reason: str) -> None:
        """Answer a request that cannot be parsed or accepted, and close the connection; while
        the requests before it are being answered, once their answers are sent."""
        if self._closed or self._refusal is not None:
            return
        logger.debug("%s: %d %s", self.peer, status, reason)
        body = f"{reason}\n".encode()
        answer = self._head(status, b"text/plain; charset=utf-8", len(body), close=True) + body
        self._direct = None
        if self._busy:
            # Stop reading and parsing; _answer or _go_on sends it when its turn comes.
            self._refusal = answer
            self._body = []
            self.state = ConnectionState.BUSY
            if self._transport is not None:
                self._transport.pause_reading()
            return
        transport = self._transport
        self._closed = True
        if transport is not None:
            transport.write(answer)
            transport.close()
        self._srv.connections.pop(self, None)
        self._srv.budget.give_back(self)

    def _send_refusal(self) -> None:
        """The requests before a refused one are answered: send its refusal and close."""
        answer, self._refusal = self._refusal, None
        self._busy = False
        if self._transport is not None and not self._closed and answer is not None:
            self._transport.write(answer)
        self.close()
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
