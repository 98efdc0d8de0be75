"""Group commit: durable writes (``sync=1``, ``--sync-each-write``) share fsyncs (a layer of
:class:`~chukcha.bus.chunks.ChunkStore`, which appends the writes and then hands each one here
with :meth:`GroupCommit._after_fsync`).

A durable write is appended like any other (readers may see it at once, as with the Go
server), then waits in its category's queue for an fsync that begins after it. One fsync runs
at a time per category, in a worker thread, while the loop goes on appending: when it ends it
answers every write it covered, and the writes that queued meanwhile start the next one. So a
write is answered 200 only after an fsync that began once its bytes were in the file (and, the
first time a chunk is written durably, an fsync of the directory that holds its entry); a
failed fsync answers each write it covered with the error.

Each waiting write is one callback in a list: no task, future or wake-up of its own (a
``sync=1`` write on the fast path costs the node about what a plain one does, plus its share of
the fsync). Why not a future per write, awaited by the request's task: in a profile of 64
connections writing with ``sync=1`` (``bench/bench_vs_go.py --only sync``) that path cost
~90 us of node CPU per write against ~26 us for a plain write on the fast path.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chukcha.bus.chunk_index import Category, Chunk, fsync_dir
from chukcha.bus.chunk_queue import QueuedWriter
from chukcha.errors import DiskWriteError

__all__ = ["GroupCommit"]

logger = logging.getLogger(__name__)

Done = Callable[[BaseException | None], None]


@dataclass(slots=True)
class _Round:
    """One group fsync: of ``chunk`` up to ``target`` bytes, answering ``covered``."""

    cat: Category
    chunk: Chunk
    target: int
    covered: list[Done]
    sync_dir: bool  # the directory too
    started: float  # time.perf_counter()


class GroupCommit(QueuedWriter):
    """The group fsyncs of :class:`~chukcha.bus.chunks.ChunkStore` (see the module doc)."""

    def _after_fsync(self, cat: Category, done: Done) -> None:
        """Call ``done`` (with ``None``, or the error) once an fsync that begins now or later
        has put the category's current chunk on stable storage. Call it right after the
        write's bytes are appended, with no ``await`` in between."""
        cat.sync_queue.append(done)
        cat.sync_waiters += 1
        if not cat.syncing:
            self._start_fsync(cat)

    def _after_fsync_each(self, cat: Category, dones: list[Done]) -> None:
        """:meth:`_after_fsync` for several writes appended together."""
        cat.sync_queue += dones
        cat.sync_waiters += len(dones)
        if not cat.syncing:
            self._start_fsync(cat)

    async def _until_fsynced(self, cat: Category) -> None:
        """:meth:`_after_fsync` for a caller that awaits the answer (raises the error)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._after_fsync(cat, functools.partial(_settle, fut))
        # A client that leaves does not stop the fsync; the write stays counted as waiting.
        await asyncio.shield(fut)

    def _start_fsync(self, cat: Category) -> None:
        """Start the group fsync of the writes queued now (none runs). While something holds
        the category's lock (a rotation in a worker thread may be replacing the chunk's file
        descriptor), the fsync starts once it is let go."""
        cat.syncing = True
        if cat.lock.locked():
            task = asyncio.ensure_future(self._start_fsync_unlocked(cat))
            self._gathered_tasks.add(task)
            task.add_done_callback(self._gathered_tasks.discard)
            return
        self._fsync_now(cat)

    async def _start_fsync_unlocked(self, cat: Category) -> None:
        async with cat.lock:
            pass  # the holder is done with the file descriptor; nothing awaits below
        self._fsync_now(cat)

    def _fsync_now(self, cat: Category) -> None:
        """Hand the fsync of the current chunk (and of the directory, if a chunk was created
        since the last one) to a worker thread; on the loop, with the category's lock free."""
        covered, cat.sync_queue = cat.sync_queue, []
        failed, cat.sync_failed = cat.sync_failed, False
        chunk = cat.chunks.get(cat.current) if cat.current else None
        error: BaseException | None = None
        if failed:
            error = DiskWriteError(errno.EIO, f"fsync of a chunk of {cat.name} failed")
        elif cat.write_fd < 0 or chunk is None:
            error = DiskWriteError(errno.EIO, f"category {cat.name} is closed")
        if error is not None or chunk is None:
            self._answer(cat, covered, error)
            return
        sync_dir = not cat.dir_synced
        cat.dir_synced = True  # a chunk created while this runs makes it False again
        try:
            fd = os.dup(cat.write_fd)  # the fsync's own: a rotation may close write_fd
        except OSError as exc:
            if sync_dir:
                cat.dir_synced = False
            self._answer(cat, covered, DiskWriteError(
                exc.errno or errno.EIO, f"fsync of chunk {chunk.name} failed: {exc.strerror}"))
            return
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, _fsync_close, fd, cat.path if sync_dir else None)
        fut.add_done_callback(functools.partial(self._fsynced, _Round(
            cat, chunk, chunk.size, covered, sync_dir, time.perf_counter())))

    def _fsynced(self, round_: _Round, fut: asyncio.Future[None]) -> None:
        """A group fsync ended: answer the writes it covered, start the next one if any wait."""
        cat, chunk, target, covered = round_.cat, round_.chunk, round_.target, round_.covered
        error: BaseException | None = None
        exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
        if exc is None:
            chunk.synced = max(chunk.synced, target)
            traffic = cat.traffic
            traffic.fsyncs += 1
            traffic.fsynced_writes += len(covered)
            traffic.fsync_seconds += time.perf_counter() - round_.started
        else:
            if round_.sync_dir:
                cat.dir_synced = False
            strerror = exc.strerror if isinstance(exc, OSError) else repr(exc)
            code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
            logger.error("category=%s fsync of chunk %s failed: %s; %d durable writes are "
                         "answered with the error", cat.name, chunk.name, strerror, len(covered))
            error = DiskWriteError(code, f"fsync of chunk {chunk.name} failed: {strerror}")
        self._answer(cat, covered, error)

    def _answer(self, cat: Category, covered: list[Done], error: BaseException | None) -> None:
        cat.sync_waiters -= len(covered)
        cat.syncing = False
        for done in covered:
            try:
                done(error)
            except Exception:
                logger.exception("answering a durable write failed")
        if cat.sync_queue and not cat.syncing:
            self._start_fsync(cat)


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def _fsync_close(fd: int, directory: Path | None) -> None:
    """fsync a chunk (through its own file descriptor, closed here) and, where its directory
    entry is new, the directory."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if directory is not None:
        fsync_dir(directory)
