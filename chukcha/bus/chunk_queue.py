"""Big writes without fsync, queued per category for one worker thread that appends them one
after the other (a layer of :class:`~chukcha.bus.chunks.ChunkStore`, which starts the chunks
and does the appends: :meth:`QueuedWriter._chunk_for`, :meth:`QueuedWriter._append`)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections import deque

from chukcha.bus.chunk_index import (
    Category,
    Chunk,
    QueuedWrite,
    StoreEventKind,
    WriteResult,
    reserve_space,
)
from chukcha.bus.chunk_reads import ChunkReader
from chukcha.bus.tasks import run_to_end as _finish
from chukcha.errors import DiskWriteError
from chukcha.protocol import count_newlines, prepare_count_newlines

__all__ = ["QueuedWriter"]

logger = logging.getLogger(__name__)


class QueuedWriter(ChunkReader):
    """The queued big writes of :class:`~chukcha.bus.chunks.ChunkStore` (its
    ``write`` sends big writes without fsync here)."""

    queued_run_bytes = 8 << 20
    """A worker-thread run takes queued writes until it took this many bytes, then lets the
    category's lock go (what waits for it goes first): a steady stream of big writes never
    keeps small and durable writes, rotation or acks out."""

    async def _write_big(self, cat: Category, body: bytes | bytearray) -> WriteResult:
        """A big write without fsync: queued for the worker thread that appends the queued big
        writes of the category one after the other, answering each once its bytes are in.

        Why: concurrent big writes to one category took turns on its lock, and a turn was
        mostly the hand-off to a worker thread and back to the loop, not the write: in a trace
        of bulk writes (1 MiB bodies, 4 connections) the thread wrote 16 % of the time, a 1 MiB
        ``write`` took 0.33 ms and the next one began 0.83 ms later, while writes waited 1.9 ms
        for the lock. Now the thread goes on to the next queued body at once. (Appending the
        queued bodies together with one ``writev`` and answering them together was slower:
        the 4 clients fell into step, so receiving and writing no longer overlapped.) The
        thread also counts the messages (for the metrics), off the loop."""
        prepare_count_newlines()  # the thread counts it: numpy imported here, not there
        entry = QueuedWrite(body, 0, asyncio.get_running_loop().create_future())
        with cat.queue_lock:
            cat.queued.append(entry)
        if cat.queue_round is None:
            cat.queue_round = asyncio.ensure_future(self._write_queued(cat))
        try:
            return await asyncio.shield(entry.done)
        except asyncio.CancelledError:
            with cat.queue_lock:
                if not entry.taken:  # never written
                    cat.queued.remove(entry)
                    raise
            # Taken (being written, or answered): wait until it is in the chunk or undone (as
            # run_to_end does), never remove it twice.
            while not entry.done.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([entry.done])
            if not entry.done.cancelled():
                entry.done.exception()  # retrieved: the caller is gone
            raise

    async def _write_queued(self, cat: Category) -> None:
        """Append the queued big writes, a run of them per chunk, until none is left."""
        try:
            while cat.queued:
                async with cat.lock:
                    await _finish(self._write_run(cat))
        finally:
            cat.queue_round = None
            with cat.queue_lock:  # left only when the round was stopped (the loop is closing)
                left, cat.queued = list(cat.queued), deque()
                for entry in left:
                    entry.taken = True  # out of the queue: a caller leaving now waits for it
            for entry in left:
                _settle(entry.done, DiskWriteError(
                    errno.ECANCELED, f"the store stopped before a write to {cat.name}"))

    async def _write_run(self, cat: Category) -> None:
        """Under ``cat.lock`` (through :func:`_finish`): the queued writes, in one worker thread,
        while they come and fit in the current chunk (the first one in a new chunk if it does
        not fit in the current one)."""
        if not cat.queued:  # the callers left while the round waited for the lock
            return
        try:
            cur = await self._chunk_for(cat, len(cat.queued[0].body))
        except Exception as exc:  # noqa: BLE001 - the first write's answer
            with cat.queue_lock:
                first = cat.queued.popleft() if cat.queued else None
                if first is not None:
                    first.taken = True  # out of the queue: a caller leaving now waits for it
            if first is not None:
                _settle(first.done, exc)
            return
        name = cat.current or str(cur.name)
        hand: list[tuple[QueuedWrite, int]] = []
        try:
            await asyncio.to_thread(self._append_queued, asyncio.get_running_loop(), cat, cur,
                                    name, hand)
        except Exception as exc:  # noqa: BLE001 - unexpected (MemoryError...): answer, go on
            self._answer_in_hand(cat, name, hand, exc)

    def _answer_in_hand(self, cat: Category, name: str, hand: list[tuple[QueuedWrite, int]],
                        exc: Exception) -> None:
        """The worker thread failed unexpectedly (not in an append: that failure is the write's
        answer) with a write in hand that the loop was not yet asked to answer: answer it, as
        written when its bytes are in the chunk (its end known), else 500; the round goes on
        with the next queued writes."""
        logger.error("category=%s: the queued-write thread failed: %r", cat.name, exc,
                     exc_info=exc)
        if not hand:
            with cat.queue_lock:  # none in hand: the first queued one fails, so the round ends
                entry = cat.queued.popleft() if cat.queued else None
                if entry is not None:
                    entry.taken = True
            if entry is None:
                return
            hand.append((entry, -1))
        for entry, end in hand:
            if end < 0:
                _settle(entry.done, DiskWriteError(
                    errno.EIO, f"the write to {cat.name} failed unexpectedly: {exc!r}"))
                continue
            if entry.messages < 0:  # counting failed in the thread: the plain count, no copy
                entry.messages = entry.body.count(b"\n")
            self._big_written(cat, entry, name, end)

    def _append_queued(self, loop: asyncio.AbstractEventLoop, cat: Category, cur: Chunk,
                       name: str, hand: list[tuple[QueuedWrite, int]]) -> None:
        """The worker thread of :meth:`_write_run`: appends queued writes one after the other
        and has the loop answer each as soon as its bytes are in (or rolled back). ``hand``:
        the write taken and not yet handed to the loop to answer, with its end once its bytes
        are in (``-1`` before), for :meth:`_answer_in_hand`."""
        taken = 0  # bytes this run took
        while True:
            with cat.queue_lock:
                if not cat.queued:
                    return
                entry = cat.queued[0]
                # The first one too (the rule of _chunk_for): the chunk was chosen for the
                # write then first in the queue, whose caller may have left since.
                if cur.size > 0 and cur.size + len(entry.body) > self._max_chunk_size:
                    return  # a new chunk first, on the loop
                if taken >= self.queued_run_bytes:
                    return  # the lock's turn for others (small and durable writes, rotation)
                cat.queued.popleft()
                entry.taken = True
                hand.append((entry, -1))
            taken += len(entry.body)
            try:
                if not cur.dirty_tail and cur.size + len(entry.body) > cur.reserved:
                    reserve_space(cat.write_fd, cur, len(entry.body))  # as on the loop
                self._append(cat.write_fd, cur, entry.body, False)
            except BaseException as exc:  # noqa: BLE001 - the write's answer
                loop.call_soon_threadsafe(_settle, entry.done, exc)
            else:
                end = cur.size
                hand[0] = (entry, end)  # in the chunk: whatever fails now, it was written
                entry.messages = -1
                # Counted here, not on the loop: numpy lets go of the GIL while it counts.
                entry.messages = count_newlines(entry.body)
                loop.call_soon_threadsafe(self._big_written, cat, entry, name, end)
            hand.clear()  # the loop answers it
            # Not kept while waiting for the next one: once answered, the body's buffer may be
            # reused (the HTTP server reuses it when nothing else refers to it).
            del entry

    def _big_written(self, cat: Category, entry: QueuedWrite, name: str, end: int) -> None:
        self._emit(StoreEventKind.WRITTEN, cat.name, name, end)
        traffic = cat.traffic
        traffic.writes += 1
        traffic.bytes_written += len(entry.body)
        traffic.messages_written += entry.messages
        if not entry.done.done():
            entry.done.set_result(WriteResult(name, end))

    async def _chunk_for(self, cat: Category, size: int) -> Chunk:
        """The chunk a write of ``size`` goes to (under ``cat.lock``; the store's)."""
        raise NotImplementedError

    @staticmethod
    def _append(fd: int, chunk: Chunk, body: bytes | bytearray | memoryview, sync: bool) -> None:
        """Append ``body`` whole or not at all (blocking; the store's)."""
        raise NotImplementedError


def _settle(done: asyncio.Future[WriteResult], exc: BaseException) -> None:
    if not done.done():
        done.set_exception(exc)
