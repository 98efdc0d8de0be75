"""Handing a client's connection from a front worker to the writer (``--workers N``).

A front worker (:mod:`chukcha.bus.front`) is cheap for what it coalesces: small single-message
writes. Anything else relayed through it costs a second hop: a 1 MiB write or read crosses
the private socket once more (two more copies and the front's parsing), which measured 2.5-3x
the writer's own CPU per MB. So when a request that is not a small ``/write`` starts on a
connection with nothing in flight (no answer pending or unsent, not TLS), the front passes the
connection itself to the writer: its file descriptor (``SCM_RIGHTS``) with the bytes the front
had read of it, over a private ``SOCK_SEQPACKET`` socket. The writer serves it from then on as
if it had accepted it (:meth:`HttpServer.adopt`), parsing those bytes first; the client sees
nothing but its answers. A hand-over the writer cannot take (it is restarting) does not happen:
the front serves the request itself (relayed, so the client gets the writer's ``503``).

Messages: the first carries the descriptor, the total length of the bytes read (8 bytes, little
endian) and up to :data:`PIECE` of them; the rest follow in pieces of :data:`PIECE` (a
message must fit a unix socket's default send buffer). A front that fails between pieces
closes its channel, and the writer drops the half-received connection (the client sees it
close with no answer: nothing was acknowledged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from pathlib import Path
from typing import Final

from chukcha.bus.server import HttpServer

__all__ = ["PIECE", "HandoverReceiver", "HandoverSender", "front_keeps", "handover_path"]

logger = logging.getLogger(__name__)

PIECE: Final = 64 << 10
_SMALL_WRITE: Final = 64 << 10
"""A ``/write`` whose ``Content-Length`` is at most this stays with the front (coalesced)."""
_HEADER: Final = 8
_LF: Final = 10
_CR: Final = 13
_RETRY: Final = 0.5
"""After the writer's channel failed, hand-overs are not tried for this long."""


def handover_path(internal_socket: str) -> str:
    """The writer's hand-over socket, beside its private HTTP socket."""
    return internal_socket + ".fds"


def front_keeps(data: bytes) -> bool:
    """Whether the request that ``data`` starts is one the front serves itself: a ``/write``
    with a ``Content-Length`` of at most 64 KiB (or headers not all in ``data`` yet). Only a
    matter of speed: a front serves every request correctly."""
    if not data.startswith(b"POST /write"):
        return False
    if len(data) <= _SMALL_WRITE and data[-1] == _LF and data[-2] != _CR:
        return True  # most likely a whole small write (and a wrong guess is only relayed)
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return True  # the headers came in pieces: rare; serving it is always right
    head = data[:end].lower()
    at = head.find(b"\ncontent-length:")
    if at < 0:
        return False  # chunked: of any size
    line_end = head.find(b"\r", at)
    value = head[at + 16:line_end if line_end >= 0 else len(head)]
    try:
        return int(value) <= _SMALL_WRITE
    except ValueError:
        return True  # the parser answers it with its error


class HandoverSender:
    """A front worker's end: hands connections to the writer's :class:`HandoverReceiver`.

    Never blocks: the first message (with the descriptor) is sent at once or the front keeps
    the connection; the rest of its bytes are queued and sent as the writer takes them (while
    any are queued, the front keeps new connections: pieces of two hand-overs never mix)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._chan: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[memoryview] = deque()
        self._retry_at = 0.0
        self.handed = 0

    def _channel(self) -> socket.socket | None:
        if self._chan is not None:
            return self._chan
        now = time.monotonic()
        if now < self._retry_at:
            return None
        chan = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        chan.setblocking(False)
        try:
            chan.connect(self._path)  # a unix socket: at once, or refused (never in progress)
        except OSError as exc:
            logger.debug("hand-over channel: %r", exc)
            chan.close()
            self._retry_at = now + _RETRY
            return None
        self._chan = chan
        self._loop = asyncio.get_running_loop()
        return chan

    def _broken(self, exc: OSError) -> None:
        logger.info("hand-over channel to the writer failed: %r", exc)
        self.close()
        self._retry_at = time.monotonic() + _RETRY

    def offer(self, transport: asyncio.Transport, data: bytes) -> bool:
        """:attr:`Router.handover <chukcha.bus.server.Router.handover>`: hand the connection
        over unless the request ``data`` starts is the front's; True: it was handed over (the
        transport is closed here, which leaves the writer's copy open)."""
        if front_keeps(data) or self._queue or transport.get_write_buffer_size() \
                or transport.get_extra_info("sslcontext") is not None:
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        chan = self._channel()
        if chan is None:
            return False
        view = memoryview(data)
        try:
            socket.send_fds(chan, [len(data).to_bytes(_HEADER, "little"), view[:PIECE]],
                            [sock.fileno()])
        except (BlockingIOError, InterruptedError):
            return False  # the writer is behind: the front serves this one
        except OSError as exc:
            self._broken(exc)
            return False  # nothing was handed over: the front serves it
        self.handed += 1
        transport.pause_reading()
        transport.abort()  # closes our descriptor only: the writer holds the connection
        if len(data) > PIECE:
            self._queue.extend(view[at:at + PIECE] for at in range(PIECE, len(data), PIECE))
            self._flush()
        return True

    def _flush(self) -> None:
        chan = self._chan
        if chan is None:
            self._queue.clear()
            return
        try:
            while self._queue:
                chan.send(self._queue[0])
                self._queue.popleft()
        except (BlockingIOError, InterruptedError):
            if self._loop is not None:
                self._loop.add_writer(chan.fileno(), self._flush)
            return
        except OSError as exc:
            self._broken(exc)  # the writer drops the half-sent one: the client sees a close
            return
        if self._loop is not None:
            self._loop.remove_writer(chan.fileno())

    def close(self) -> None:
        self._queue.clear()
        if self._chan is not None:
            if self._loop is not None:
                self._loop.remove_writer(self._chan.fileno())
            self._chan.close()
            self._chan = None


class _Incoming:
    __slots__ = ("data", "fd", "total")

    def __init__(self, fd: int, total: int, data: bytes) -> None:
        self.fd = fd
        self.total = total
        self.data = bytearray(data)


class HandoverReceiver:
    """The writer's end: takes connections from the fronts and serves them with ``server``."""

    def __init__(self, server: HttpServer, path: str) -> None:
        self._server = server
        self._path = path
        self._sock: socket.socket | None = None
        self._chans: dict[socket.socket, _Incoming | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.adopted = 0

    async def start(self) -> None:
        self._sock = await asyncio.to_thread(_bind_seqpacket, self._path)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._sock is not None and self._loop is not None  # noqa: S101 - started
        try:
            chan, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            logger.warning("hand-over socket: %r", exc)
            return
        chan.setblocking(False)
        self._chans[chan] = None
        self._loop.add_reader(chan.fileno(), self._receive, chan)

    def _drop(self, chan: socket.socket) -> None:
        incoming = self._chans.pop(chan, None)
        if incoming is not None:
            socket.close(incoming.fd)  # half received: the client sees its connection close
        if self._loop is not None:
            self._loop.remove_reader(chan.fileno())
        chan.close()

    def _receive(self, chan: socket.socket) -> None:
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(chan, PIECE + _HEADER, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.info("hand-over channel: %r", exc)
                self._drop(chan)
                return
            if not data and not fds:  # the front closed it (stopped, died, or gave up)
                self._drop(chan)
                return
            incoming = self._chans.get(chan)
            if fds:
                if incoming is not None:  # cannot happen with a working front: drop both
                    socket.close(incoming.fd)
                for extra in fds[1:]:
                    socket.close(extra)
                if flags & socket.MSG_CTRUNC or len(data) < _HEADER:
                    socket.close(fds[0])
                    self._chans[chan] = None
                    continue
                incoming = _Incoming(fds[0], int.from_bytes(data[:_HEADER], "little"),
                                     data[_HEADER:])
            elif incoming is None:
                logger.warning("hand-over channel: a piece without a connection, ignored")
                continue
            else:
                incoming.data += data
            if len(incoming.data) >= incoming.total:
                self._chans[chan] = None
                self._adopt(incoming.fd, bytes(incoming.data))
            else:
                self._chans[chan] = incoming

    def _adopt(self, fd: int, data: bytes) -> None:
        assert self._loop is not None  # noqa: S101 - started
        try:
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
        except OSError as exc:
            logger.info("a handed-over connection: %r", exc)
            socket.close(fd)
            return
        self.adopted += 1
        task = self._loop.create_task(self._serve(sock, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket, data: bytes) -> None:
        try:
            await self._server.adopt(sock, data)
        except OSError as exc:
            logger.info("a handed-over connection: %r", exc)
            sock.close()

    def stop(self) -> None:
        """Take no more connections (those taken are the server's: its stop ends them)."""
        for chan in list(self._chans):
            self._drop(chan)
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()  # the path stays (the supervisor removes its directory)
            self._sock = None


def _bind_seqpacket(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        Path(path).unlink()  # left by a killed predecessor
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.bind(path)
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
