"""Reads of the chunk store: long polls, reads into a buffer, reads on the event loop when the
bytes are in the page cache, and big answers as a :class:`FileSlice` sent piece by piece.

Every read stops at a chunk's committed size (:mod:`chukcha.bus.chunk_index`) and answers whole
messages only.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from chukcha.bus.chunk_index import Category, ChunkIndex, Traffic
from chukcha.errors import BadRequestError, ChunkNotFoundError, ReadBufferTooSmallError
from chukcha.protocol import MAX_READ_SIZE, count_newlines, parse_chunk_name, validate_category

__all__ = ["INLINE_READ_LIMIT", "STREAM_READ_OVER", "ChunkReader", "FileSlice"]

_Bytes = TypeVar("_Bytes", bytes, bytearray)

INLINE_READ_LIMIT: Final = 64 << 10
"""Reads up to this size whose bytes are all in the page cache are done on the event loop
(:meth:`ChunkReader.read_now`); a worker thread's hand-off costs more than such a read."""
_NOWAIT: Final = getattr(os, "RWF_NOWAIT", 0)
STREAM_READ_OVER: Final = 1 << 20
"""Reads answering more than this are sent from the file piece by piece (:class:`FileSlice`)."""

class ChunkReader(ChunkIndex):
    """The reads of a node's chunk store (the base of :class:`~chukcha.bus.chunks.ChunkStore`)."""

    small_requests = 0
    """Small reads (answers up to ``INLINE_READ_LIMIT``) and small writes served so far, for
    ``ChunkStore.write_now``: big writes leave the event loop to them for a while."""

    async def wait_changed(self, category: str, timeout: float) -> bool:
        """Wait until anything changes in ``category`` (a write, a new chunk, an ack).

        Returns ``False`` on timeout. Long polls use it instead of sleeping.
        """
        if self._closing:
            return False
        fut = self._changed.get(category)
        if fut is None or fut.done():
            fut = self._changed[category] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(fut)
        except TimeoutError:
            return False
        return True

    def wake_waiters(self) -> None:
        """Answer every parked long poll now, and new ones at once (the node is stopping, so a
        graceful stop does not wait out ``wait=`` seconds)."""
        self._closing = True
        for fut in self._changed.values():
            if not fut.done():
                fut.set_result(None)
        self._changed.clear()

    async def read_wait(
        self, category: str, chunk: str, off: int, max_size: int, wait: float
    ) -> bytes | memoryview:
        """:meth:`read_buffer`, but when there is nothing at ``off`` yet wait up to ``wait``
        seconds for data (or for the chunk to become complete or acked) before answering
        ``b""``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            data = await self.read_buffer(category, chunk, off, max_size)
            remaining = deadline - loop.time()
            if data or remaining <= 0 or self.is_complete(category, chunk):
                return data
            if not await self.wait_changed(category, remaining):
                return await self.read_buffer(category, chunk, off, max_size)

    async def read(self, category: str, chunk: str, off: int, max_size: int) -> bytes:
        """Whole messages of ``chunk`` from ``off``, at most ``max_size`` bytes.

        Returns ``b""`` at or past the end.

        Raises:
            ChunkNotFoundError: no such live chunk here.
            ReadBufferTooSmallError: the first message at ``off`` is longer than ``max_size``.
        """
        data = await self.read_buffer(category, chunk, off, max_size)
        return data if isinstance(data, bytes) else bytes(data)

    async def read_buffer(
        self, category: str, chunk: str, off: int, max_size: int,
        into: bytearray | None = None,
    ) -> bytes | memoryview:
        """:meth:`read` without the copy that cutting back to the last ``\\n`` costs (the
        HTTP handler sends the view as it is). With ``into`` (a buffer at least as big as the
        answer may be), the bytes are read into it and the answer is a view of it."""
        validate_category(category)
        parse_chunk_name(chunk)
        if off < 0:
            raise BadRequestError("off must not be negative")
        if not 0 < max_size <= MAX_READ_SIZE:
            raise BadRequestError(f"max_size must be between 1 and {MAX_READ_SIZE}")
        cat = self._categories.get(category)
        c = cat.chunks.get(chunk) if cat else None
        if cat is None or c is None:
            raise ChunkNotFoundError(f"chunk {category}/{chunk} not found")
        limit = c.size  # committed size: never past a write in progress
        cat.traffic.reads += 1
        if off >= limit:
            self.small_requests += 1
            return b""
        want = min(max_size, limit - off)
        if want <= INLINE_READ_LIMIT:
            self.small_requests += 1
        if into is not None and want <= len(into):
            view = memoryview(into)[:want]
            # All in the page cache (the usual case: just written, or read by a peer): read on
            # the loop, with no worker thread's hand-off; else in a thread, as any read that
            # may wait for the disk.
            n = _pread_into_cached(cat.path / chunk, view, off) if _NOWAIT else None
            if n is None:
                n = await asyncio.to_thread(_pread_into, cat.path / chunk, view, off)
            if not n:
                raise ChunkNotFoundError(f"chunk {category}/{chunk} not found")
            return memoryview(self._whole_messages(cat, into, want, max_size, off, n=n))
        data = await asyncio.to_thread(_pread, cat.path / chunk, want, off)
        if not data:
            # Acked (truncated) between the size check and the read.
            raise ChunkNotFoundError(f"chunk {category}/{chunk} not found")
        return self._whole_messages(cat, data, want, max_size, off)

    def read_now(
        self, category: str, chunk: str, off: int, max_size: int
    ) -> bytes | bytearray | memoryview | None:
        """:meth:`read_buffer` without waiting, where it needs none: a read of at most
        ``INLINE_READ_LIMIT`` bytes of a live chunk whose bytes are all in the page cache
        (``preadv`` with ``RWF_NOWAIT`` fails rather than wait for the disk). ``None``: nothing
        was read (not cached, bigger, unknown chunk, no ``RWF_NOWAIT``); call
        :meth:`read_slice`, which also gives every error."""
        cat = self._categories.get(category)
        c = cat.chunks.get(chunk) if cat else None
        if cat is None or c is None or not _NOWAIT or off < 0:
            return None
        if not 0 < max_size <= MAX_READ_SIZE:
            raise BadRequestError(f"max_size must be between 1 and {MAX_READ_SIZE}")
        limit = c.size  # committed size: never past a write in progress
        if off >= limit:
            cat.traffic.reads += 1
            self.small_requests += 1
            return b""
        want = min(max_size, limit - off)
        if want > INLINE_READ_LIMIT:
            return None
        self.small_requests += 1
        data = _pread_cached(cat.path / chunk, want, off)
        if data is None:
            return None
        cat.traffic.reads += 1
        return self._whole_messages(cat, data, want, max_size, off)

    @staticmethod
    def _whole_messages(
        cat: Category, data: _Bytes, want: int, max_size: int, off: int, *,
        n: int | None = None,
    ) -> _Bytes | memoryview:
        """What a read answers: ``data`` (its first ``n`` bytes: a reused buffer) cut after
        its last newline, counted."""
        cut = data.rfind(b"\n", 0, len(data) if n is None else n) + 1
        if cut == 0:
            if want == max_size:
                raise ReadBufferTooSmallError(
                    f"max_size {max_size} is smaller than the message at offset {off}"
                )
            return data[:0]
        cat.traffic.bytes_read += cut
        # The newlines of what is sent (chukcha_read_messages_total), counted in memory;
        # answers over STREAM_READ_OVER are counted piece by piece (FileSlice.sent).
        answer = data if cut == len(data) else memoryview(data)[:cut]
        cat.traffic.messages_read += count_newlines(answer)
        return answer

    async def read_slice(
        self, category: str, chunk: str, off: int, max_size: int,
        into: bytearray | None = None,
    ) -> bytes | memoryview | FileSlice:
        """:meth:`read_buffer`; but an answer over ``STREAM_READ_OVER`` bytes comes as a
        :class:`FileSlice` (an open file and the byte range of whole messages) that the server
        sends piece by piece, so a client slow to take 16 MiB makes the node hold one piece,
        not 16 MiB."""
        cat = self._categories.get(category)
        c = cat.chunks.get(chunk) if cat else None
        if cat is None or c is None or min(max_size, c.size - off) <= STREAM_READ_OVER:
            return await self.read_buffer(category, chunk, off, max_size, into)
        want = min(max_size, c.size - off)  # committed size: never past a write in progress
        found = await asyncio.to_thread(_open_slice, cat.path / chunk, off, want, cat.traffic)
        if found is None:  # no newline in the tail: the plain path decides (and errors)
            return await self.read_buffer(category, chunk, off, max_size)
        cat.traffic.reads += 1  # its bytes and messages are counted as the pieces are sent
        return found


@dataclass(frozen=True, slots=True)
class FileSlice:
    """Bytes ``[offset, offset + length)`` of an open chunk file: whole messages. The receiver
    closes ``fd`` and calls :meth:`sent` with each piece it sent (the category's read
    counters). A chunk acked (truncated) meanwhile reads short: the sender must abort."""

    fd: int
    offset: int
    length: int
    traffic: Traffic

    def sent(self, piece: bytes) -> None:
        """Count a piece sent: its bytes and its newlines (the pieces do not overlap, so the
        sum over a whole answer is exact; an aborted answer counts what was sent)."""
        self.traffic.bytes_read += len(piece)
        self.traffic.messages_read += count_newlines(piece)


def _open_slice(path: Path, off: int, want: int, traffic: Traffic) -> FileSlice | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ChunkNotFoundError(f"chunk {path.parent.name}/{path.name} not found") from None
    try:
        # Messages are at most 1 MiB: the last newline is in the last 1 MiB + 1 bytes.
        tail = min(want, STREAM_READ_OVER + 1)
        data = os.pread(fd, tail, off + want - tail)
        cut = data.rfind(b"\n") + 1
        if len(data) < tail or cut == 0:
            os.close(fd)
            return None
        return FileSlice(fd, off, want - tail + cut, traffic)
    except BaseException:
        os.close(fd)
        raise


def _pread_cached(path: Path, n: int, off: int) -> bytearray | None:
    """``n`` bytes at ``off`` if they are all in the page cache, else ``None`` (short: not
    cached, or truncated by an ack meanwhile; the caller's thread path decides). On the event
    loop: the open is a cached look-up of a chunk just listed or written, the read a copy."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None  # acked meanwhile: the thread path answers 404
    try:
        buf = bytearray(n)
        try:
            got = os.preadv(fd, [buf], off, _NOWAIT)
        except OSError:  # EAGAIN: not cached; EOPNOTSUPP: a file system without RWF_NOWAIT
            return None
        return buf if got == n else None
    finally:
        os.close(fd)


def _pread_into_cached(path: Path, view: memoryview, off: int) -> int | None:
    """:func:`_pread_cached` into ``view``: ``len(view)``, or ``None`` unless all of it was in
    the page cache."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None  # acked meanwhile: the thread path answers 404
    try:
        try:
            got = os.preadv(fd, [view], off, _NOWAIT)
        except OSError:  # EAGAIN: not cached; EOPNOTSUPP: a file system without RWF_NOWAIT
            return None
        return got if got == len(view) else None
    finally:
        os.close(fd)


def _pread(path: Path, n: int, off: int) -> bytes:
    # A file per read, not a cache of open descriptors: a cached descriptor closed by an ack or
    # an eviction while another thread is in pread() could be reused by a new open() meanwhile,
    # and that read would return another file's bytes. open+close costs ~10 us per read.
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ChunkNotFoundError(f"chunk {path.parent.name}/{path.name} not found") from None
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def _pread_into(path: Path, view: memoryview, off: int) -> int:
    """:func:`_pread` into ``view``: the number of bytes read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ChunkNotFoundError(f"chunk {path.parent.name}/{path.name} not found") from None
    try:
        return os.preadv(fd, [view], off)
    finally:
        os.close(fd)

