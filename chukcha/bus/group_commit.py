"""Group commit: durable writes (``sync=1``, ``--sync-each-write``) share fsyncs (a layer of
:class:`~chukcha.bus.chunks.ChunkStore`, which appends the writes and then hands each one here
with :meth:`GroupCommit._after_fsync`).

A durable write is appended like any other (readers may see it at once, as with the Go
server), then waits in its category's queue for an fsync that begins after it. An fsync takes
every write queued when it begins and runs in a worker thread while the loop goes on appending;
up to :data:`CONCURRENT_FSYNCS` run at once per category, and they are answered in the order
they began. So a write is answered 200 only after an fsync that began once its bytes were in
the file, and after every fsync that began before that one succeeded (the first time a chunk
is written durably, one of them syncs the directory that holds its entry).

A failed fsync answers its writes with the error, and so every write whose fsync had begun, or
that was queued, when the failure became known: the kernel may have lost their pages in the
same failed writeback and reports that once per open file, so a later fsync could succeed
without them. Each fsync opens the chunk anew for that reason (an error is reported to every
file opened before it happened), not a duplicate of the writing descriptor, which shares one
report with all its duplicates.

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
from pathlib import Path
from typing import Final

from chukcha.bus.chunk_index import Category, SyncRound, fsync_dir
from chukcha.bus.chunk_queue import QueuedWriter
from chukcha.errors import DiskWriteError

__all__ = ["GroupCommit", "call_each"]

logger = logging.getLogger(__name__)

Done = Callable[[BaseException | None], None]


CONCURRENT_FSYNCS: Final = 2
"""Group fsyncs of one category that may run at once. Why two: with one, the writes answered
by an fsync came back while the next one ran (it took the writes queued meanwhile) and waited
for all of it, so each write waited for about two fsyncs; with a second one beginning as soon
as writes are queued, a write waits for about one. 64 connections writing with ``sync=1``
(2 cores, load 5-7, 6 alternating runs each, docs/PERFORMANCE.md): median 9,300/s against
6,300/s, at the same node CPU per write (44 against 47 us), 17 writes per fsync against 24."""


class GroupCommit(QueuedWriter):
    """The group fsyncs of :class:`~chukcha.bus.chunks.ChunkStore` (see the module doc)."""

    def _after_fsync(self, cat: Category, done: Done) -> None:
        """Call ``done`` (with ``None``, or the error) once an fsync that begins now or later
        has put the category's current chunk on stable storage. Call it right after the
        write's bytes are appended, with no ``await`` in between."""
        cat.sync_queue.append(done)
        cat.sync_waiters += 1
        if len(cat.sync_rounds) + cat.sync_starting < CONCURRENT_FSYNCS:
            self._start_fsync(cat)

    def _after_fsync_each(self, cat: Category, dones: list[Done]) -> None:
        """:meth:`_after_fsync` for several writes appended together."""
        cat.sync_queue += dones
        cat.sync_waiters += len(dones)
        if len(cat.sync_rounds) + cat.sync_starting < CONCURRENT_FSYNCS:
            self._start_fsync(cat)

    async def _until_fsynced(self, cat: Category) -> None:
        """:meth:`_after_fsync` for a caller that awaits the answer (raises the error)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._after_fsync(cat, functools.partial(_settle, fut))
        # A client that leaves does not stop the fsync; the write stays counted as waiting.
        await asyncio.shield(fut)

    def _start_fsync(self, cat: Category) -> None:
        """Start a group fsync of the writes queued now. While something holds the category's
        lock (a rotation in a worker thread may be replacing the current chunk), it starts
        once the lock is let go, with the writes queued then."""
        if cat.lock.locked():
            cat.sync_starting += 1
            self._in_background(self._start_fsync_unlocked(cat))
            return
        self._fsync_now(cat)

    async def _start_fsync_unlocked(self, cat: Category) -> None:
        try:
            async with cat.lock:
                pass  # the holder is done with the chunk; nothing awaits below
        finally:
            cat.sync_starting -= 1
        self._fsync_now(cat)

    def _fsync_now(self, cat: Category) -> None:
        """Hand the fsync of the current chunk (and of the directory, if a chunk was created
        since the last one) to a worker thread; on the loop, with the category's lock free."""
        covered, cat.sync_queue = cat.sync_queue, []
        if not covered:
            return  # taken by an fsync that began meanwhile, or answered with an error
        failed, cat.sync_failed = cat.sync_failed, False
        chunk = cat.chunks.get(cat.current) if cat.current else None
        if failed or cat.write_fd < 0 or chunk is None:
            self._answer(cat, covered, DiskWriteError(
                errno.EIO, f"fsync of a chunk of {cat.name} failed" if failed
                else f"category {cat.name} is closed"))
            return
        try:
            # Its own open file: see the module doc.
            fd = os.open(cat.path / str(chunk.name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self._answer(cat, covered, DiskWriteError(
                exc.errno or errno.EIO, f"fsync of chunk {chunk.name} failed: {exc.strerror}"))
            return
        sync_dir = not cat.dir_synced
        cat.dir_synced = True  # a chunk created meanwhile makes it False again
        round_ = SyncRound(chunk, chunk.size, covered, sync_dir, time.perf_counter())
        cat.sync_rounds.append(round_)
        fut = asyncio.get_running_loop().run_in_executor(
            None, _fsync_close, fd, cat.path if sync_dir else None)
        fut.add_done_callback(functools.partial(self._fsynced, cat, round_))

    def _fsynced(self, cat: Category, round_: SyncRound, fut: asyncio.Future[None]) -> None:
        """A group fsync ended: answer it, and those that began after it and ended before it,
        in order; start the next one if writes wait."""
        round_.ended = True
        exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        if exc is not None and round_.outcome is None:
            strerror = exc.strerror if isinstance(exc, OSError) else repr(exc)
            code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
            round_.outcome = DiskWriteError(
                code, f"fsync of chunk {round_.chunk.name} failed: {strerror}")
        rounds = cat.sync_rounds
        while rounds and rounds[0].ended:
            done = rounds.popleft()
            error = done.outcome
            if error is None:
                done.chunk.synced = max(done.chunk.synced, done.target)
                traffic = cat.traffic
                traffic.fsyncs += 1
                traffic.fsynced_writes += len(done.covered)
                traffic.fsync_seconds += time.perf_counter() - done.started
                self._answer(cat, done.covered, None)
                continue
            if done.sync_dir:
                cat.dir_synced = False
            doomed, cat.sync_queue = cat.sync_queue, []
            for later in rounds:
                later.outcome = later.outcome or error
            logger.error("category=%s %s; %d durable writes are answered with the error",
                         cat.name, error, len(done.covered) + len(doomed)
                         + sum(len(r.covered) for r in rounds))
            self._answer(cat, done.covered + doomed, error)
        if cat.sync_queue and len(rounds) + cat.sync_starting < CONCURRENT_FSYNCS:
            self._start_fsync(cat)

    def _answer(self, cat: Category, covered: list[Done], error: BaseException | None) -> None:
        cat.sync_waiters -= len(covered)
        call_each(covered, error)


def call_each(dones: list[Done], error: BaseException | None) -> None:
    """Answer each write (``done(error)``); one whose answer fails does not keep the others
    from theirs (also the gathered writes' of :class:`~chukcha.bus.chunks.ChunkStore`)."""
    for done in dones:
        try:
            done(error)
        except Exception:
            logger.exception("answering a write failed")


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
