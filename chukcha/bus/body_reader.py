"""The receiving side of a big request body: straight from the socket into one buffer (see
:class:`BodyReader`), for a :class:`~chukcha.bus.connection.Connection`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # a connection hands itself over while a big body arrives, then takes back
    from chukcha.bus.connection import Connection

__all__ = ["BodyReader"]

_NO_BUFFER: Final = bytearray()


class BodyReader(asyncio.BufferedProtocol):
    """Receives the rest of a big body (``Content-Length`` over 64 KiB) straight from the socket
    into the one buffer of its size, then hands the connection back to its :class:`Connection`.

    The parser would hand the body over in pieces of the event loop's read size, each copied
    into a new ``bytes`` and then joined: three copies of every byte before the chunk file's
    ``write``. Here the kernel copies it once into place. Asked for exactly what is left of the
    body, it never reads past it, so pipelined requests behind it stay for the parser.
    """

    __slots__ = ("_buf", "_conn", "_filled", "_view")

    def __init__(self, conn: Connection, buf: bytearray, filled: int) -> None:
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
        conn._since = conn.stalled_since = conn._loop.time()  # noqa: SLF001
        if self._filled >= len(self._buf):
            self._view.release()
            # The transport may keep this protocol's methods until its next switch: let go of
            # the buffer now, so that it can be reused once the request is answered.
            self._buf = _NO_BUFFER
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
