"""Chunk storage: per-category append-only chunk files, own and replicated.

Layout (``PROTOCOL.md``): ``<data_dir>/<category>/<instance>-chunk<9-digit index>``; an
acknowledged chunk is truncated and renamed ``<chunk>.acknowledged`` so it is never downloaded
again. The store keeps an in-memory index of every live chunk and its *committed* size: readers
never see bytes past it, so a write that fails half-way (ENOSPC) and is rolled back was never
visible to anyone.

All file I/O runs in worker threads (``asyncio.to_thread``), but small page-cache writes and
reads; per-category locks keep the writes of one category in order.

:class:`ChunkStore` is built in layers: the index, lifecycle, listeners and queries
(:mod:`chukcha.bus.chunk_index`), the reads (:mod:`chukcha.bus.chunk_reads`), the queued big
writes (:mod:`chukcha.bus.chunk_queue`), the group fsyncs of durable writes
(:mod:`chukcha.bus.group_commit`), and here the writes, rotation, replicated chunks and
acks.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from chukcha.bus.chunk_index import (
    Category,
    Chunk,
    StoreEvent,
    StoreEventKind,
    Traffic,
    WriteResult,
    fsync_dir,
    reserve_space,
)
from chukcha.bus.chunk_reads import INLINE_READ_LIMIT, STREAM_READ_OVER, FileSlice
from chukcha.bus.group_commit import GroupCommit, call_each
from chukcha.bus.tasks import run_to_end as _finish
from chukcha.errors import BadRequestError, DiskWriteError, InvalidAckError, ReplicationError
from chukcha.protocol import (
    ACK_SUFFIX,
    ChunkName,
    count_newlines,
    parse_chunk_name,
    validate_category,
)

# The event and result types, the read limits and FileSlice are defined beside the layers that
# make them; callers import them from here, with the store.
__all__ = [
    "INLINE_READ_LIMIT",
    "INLINE_WRITE_LIMIT",
    "STREAM_READ_OVER",
    "ChunkStore",
    "FileSlice",
    "StoreEvent",
    "StoreEventKind",
    "Traffic",
    "WriteResult",
]

logger = logging.getLogger(__name__)

INLINE_WRITE_LIMIT: Final = 64 << 10
"""Writes up to this size (without fsync) are done on the event loop, see ``_append_small``;
bigger ones too where :meth:`ChunkStore.write_now` can, else by a worker thread
(:meth:`ChunkStore._write_big`)."""
SLOW_INLINE_WRITE: Final = 0.05
"""A big append on the event loop that takes longer (seconds) sends the next big writes to the
worker thread for :data:`SLOW_INLINE_BACKOFF` seconds (see :meth:`ChunkStore.write_now`)."""
SLOW_INLINE_BACKOFF: Final = 1.0
BIG_IN_THREAD_AFTER_SMALL: Final = 8
"""After a small request (a write or a read of up to 64 KiB), this many big writes go to the
worker thread instead of the event loop (see :meth:`ChunkStore.write_now`)."""


class ChunkStore(GroupCommit):
    """The chunk files of one node.

    Call :meth:`open` (blocking: takes the lock, scans the directory) before use and
    :meth:`close` after.
    """

    _inline_big_until = 0.0
    """Until when (``time.monotonic``) big writes skip the loop after a slow one (write_now)."""
    _small_seen = 0
    """``small_requests`` when a big write last looked (write_now)."""
    _big_in_thread = 0
    """How many more big writes go to the worker thread after small requests (write_now)."""

    # --- writes -------------------------------------------------------------------------

    async def _category(self, category: str) -> Category:
        """The category, created (directory and index) when it is new."""
        cat = self._categories.get(category)
        if cat is not None:
            return cat
        validate_category(category)
        async with self._create_lock:  # two first writes must not load it twice
            cat = self._categories.get(category)
            if cat is None:
                cat = await _finish(asyncio.to_thread(self._new_category, category))
        return cat

    def _new_category(self, category: str) -> Category:
        try:
            (self._dir / category).mkdir(exist_ok=True)
            # Its entry in the data directory on stable storage before any write into it is
            # answered: else a power loss may take the whole category (a durable write's
            # chunk and directory fsyncs would not bring it back). Once per category.
            fsync_dir(self._dir)
        except OSError as exc:
            raise DiskWriteError(
                exc.errno or errno.EIO, f"creating category {category} failed: {exc.strerror}"
            ) from exc
        return self._load_category(category)

    def _create_chunk_checked(self, cat: Category) -> str:
        try:
            return self._create_chunk(cat)
        except OSError as exc:
            raise DiskWriteError(
                exc.errno or errno.EIO, f"creating a chunk in {cat.name} failed: {exc.strerror}"
            ) from exc
    async def write(
        self, category: str, body: bytes | bytearray, *, sync: bool = False
    ) -> WriteResult:
        """Append a validated body (whole messages) to this node's current chunk.

        Raises:
            DiskWriteError: the file could not be written; the chunk is back at its last good
                size and nothing of the body is visible.
        """
        cat = self._categories.get(category) or await self._category(category)
        if len(body) > INLINE_WRITE_LIMIT:
            if not (sync or self._sync_each_write):
                return await self._write_big(cat, body)
        else:
            self.small_requests += 1
        async with cat.lock:
            if cat.current is None:
                await _finish(self._start_chunk(cat))
            cur = cat.chunks[cat.current or ""]
            if cur.size > 0 and cur.size + len(body) > self._max_chunk_size:
                prev = cat.current
                cur = cat.chunks[await _finish(self._start_chunk(cat))]
                # The previous chunk just became complete; replicas and readers learn it from
                # the creation event of the new one.
                logger.debug("rotated %s/%s by size", category, prev)
            name = cat.current or str(cur.name)
            durable = sync or self._sync_each_write
            grouped = durable and self._group_commit
            if durable and not grouped and not cat.dir_synced:
                # A synced write must survive a power loss, and so must its file's entry.
                await _finish(asyncio.to_thread(fsync_dir, cat.path))
                cat.dir_synced = True
            if (durable and not grouped) or len(body) > INLINE_WRITE_LIMIT:
                await _finish(self._append_in_thread(cat, cur, body, durable and not grouped))
            else:
                _append_small(cat.write_fd, cur, body)
                self._emit(StoreEventKind.WRITTEN, category, name, cur.size)
            end = cur.size  # this write's end, not a later one's
            traffic = cat.traffic
            traffic.writes += 1
            traffic.bytes_written += len(body)
            traffic.messages_written += _count_written(body)
            if durable and not grouped:
                traffic.fsyncs += 1
                traffic.fsynced_writes += 1
        if grouped:
            # Group commit: the answer waits for an fsync that begins after the append (no
            # await since: a rotation in between would have synced the chunk for it).
            await self._until_fsynced(cat)
        return WriteResult(name, end)

    async def _chunk_for(self, cat: Category, size: int) -> Chunk:
        """The chunk a write of ``size`` goes to (under ``cat.lock``): the current one, or a
        new one when there is none or the write would take it past its size limit."""
        if cat.current is None:
            await self._start_chunk(cat)
        cur = cat.chunks[cat.current or ""]
        if cur.size > 0 and cur.size + size > self._max_chunk_size:
            prev = cat.current
            cur = cat.chunks[await self._start_chunk(cat)]
            logger.debug("rotated %s/%s by size", cat.name, prev)
        return cur

    def write_now(self, category: str, body: bytes | bytearray) -> WriteResult | None:
        """:meth:`write` without waiting, where it needs none: a not durable write into the
        current chunk of a known category while nothing holds the category's lock (no await
        between the check and the append, so it is as if the write held it). A rotation it
        needs is done here too, unless a durable write waits for the chunk's fsync. ``None``:
        nothing was done; call :meth:`write`.

        Big bodies too, on the event loop, while only big writes come: unless big writes are
        queued (:meth:`_write_big`), small requests came a moment ago, or a big append was
        slow a moment ago. Why: handing a 1 MiB write to a worker thread and its answer back
        (GIL switches, futex and eventfd wake-ups, the tasks and futures around them) cost
        more CPU than the append itself; in a profile of bulk writes (1 MiB bodies, 4
        connections) the node used ~1.0-1.2 ms of CPU per MB that way and ~0.8 ms here. But
        while the loop appends (and counts the messages) it serves no one else, and on a busy
        machine an append is preempted or throttled for milliseconds: with small writes on
        other connections during bulk writes, their p99 was several times the one with the
        appends in the thread (``bench_vs_go.py --only mixed``, ``docs/PERFORMANCE.md``). So
        after a small request (a write, or a read of up to 64 KiB: :attr:`small_requests`),
        the next :data:`BIG_IN_THREAD_AFTER_SMALL` big writes go to the worker thread; with
        small requests coming all the time, all of them do. A big append that takes over
        :data:`SLOW_INLINE_WRITE` (the kernel throttling dirty pages, a slow disk) sends the
        next big writes to the worker thread for :data:`SLOW_INLINE_BACKOFF`, so that a
        stalling disk does not stall the loop."""
        big = len(body) > INLINE_WRITE_LIMIT
        # Counted down first: a big write that goes to the thread anyway (the category's lock
        # or queue is taken) counts as one of the next BIG_IN_THREAD_AFTER_SMALL.
        if big and self._big_to_thread():
            return None
        cat = self._categories.get(category)
        if (cat is None or cat.current is None or cat.lock.locked() or self._sync_each_write):
            return None
        if big:
            if cat.queued:
                return None  # after the queued ones, in the worker thread
        else:
            self.small_requests += 1
        cur = cat.chunks[cat.current]
        size = cur.size + cat.later_size  # with the writes gathered for this iteration's end
        if size > 0 and size + len(body) > self._max_chunk_size:
            if cat.later or cat.sync_waiters:
                return None  # a rotation first, after them: the slow path
            rotated = self._rotate_now(cat)
            if rotated is None:
                return None  # the slow path tries again and reports the error
            cur = rotated
        name = str(cat.current)
        if big:
            started = time.monotonic()
            _append_small(cat.write_fd, cur, body)
            took = time.monotonic() - started
            if took > SLOW_INLINE_WRITE:
                self._inline_big_until = time.monotonic() + SLOW_INLINE_BACKOFF
                logger.info("category=%s a %d-byte append took %.3f s: big writes go to a "
                            "worker thread for %g s", category, len(body), took,
                            SLOW_INLINE_BACKOFF)
        else:
            _append_small(cat.write_fd, cur, body)
        end = cur.size
        self._emit(StoreEventKind.WRITTEN, category, name, end)
        traffic = cat.traffic
        traffic.writes += 1
        traffic.bytes_written += len(body)
        traffic.messages_written += _count_written(body)
        return WriteResult(name, end)

    def _big_to_thread(self) -> bool:
        """This big write goes to the worker thread: small requests came a moment ago, or a
        big append on the loop was slow a moment ago (see :meth:`write_now`)."""
        if self.small_requests != self._small_seen:
            self._small_seen = self.small_requests
            self._big_in_thread = BIG_IN_THREAD_AFTER_SMALL
        if self._big_in_thread > 0:
            self._big_in_thread -= 1
            return True
        return self._inline_big_until > 0.0 and time.monotonic() < self._inline_big_until

    def _rotate_now(self, cat: Category) -> Chunk | None:
        """Start a new chunk on the loop, for :meth:`write_now` (the caller checked that no
        durable write waits for the current one's fsync, so creating it does not block on
        one); ``None`` if it could not be created."""
        prev = cat.current
        try:
            name = self._create_chunk(cat)
        except OSError as exc:
            logger.debug("category=%s rotating on the loop failed: %s", cat.name, exc)
            return None
        self._emit(StoreEventKind.CREATED, cat.name, name, 0)
        logger.debug("rotated %s/%s by size", cat.name, prev)
        return cat.chunks[name]

    def write_later(
        self, category: str, body: bytes | bytearray,
        done: Callable[[BaseException | None], None], *, sync: bool = False,
    ) -> bool:
        """:meth:`write_now`, gathered: the small writes of one event-loop iteration are
        appended at its end with one ``write`` (in the order they came), then each ``done`` is
        called: with ``None`` once its bytes are in the chunk (a durable one, ``sync`` or
        ``--sync-each-write``: once a group fsync covers them too, see
        :mod:`~chukcha.bus.group_commit`), or with the error that the write became (each of
        them, the same). The gathered writes land in one chunk, and the chunk's size limit
        counts them as it counts separate writes. ``False``: nothing was done (``done`` is
        never called); call :meth:`write`."""
        cat = self._categories.get(category)
        n = len(body)
        if cat is None or cat.current is None or cat.lock.locked() or n > INLINE_WRITE_LIMIT:
            return False
        durable = sync or self._sync_each_write
        if durable and not self._group_commit:
            return False  # each pays its own fsync under the lock: write
        size = cat.later_size
        later_size = size + n
        size += cat.chunks[cat.current].size
        if size > 0 and size + n > self._max_chunk_size:
            return False  # a rotation first: the slow path
        later = cat.later
        if not later:
            if not self._gathered:
                asyncio.get_running_loop().call_soon(self._write_gathered)
            self._gathered.append(cat)
        later.append(body)
        if durable:
            cat.later_durable.append(done)
        else:
            cat.later_done.append(done)
        cat.later_size = later_size
        return True

    def _write_gathered(self) -> None:
        """Append the writes :meth:`write_later` gathered, one ``write`` per category, and
        answer them."""
        gathered, self._gathered = self._gathered, []
        self.small_requests += 1  # one or more (see write_now)
        for cat in gathered:
            bodies, dones, durable, size = cat.later, cat.later_done, cat.later_durable, \
                cat.later_size
            cat.later, cat.later_done, cat.later_size = [], [], 0
            if durable:
                cat.later_durable = []
            data = bodies[0] if len(bodies) == 1 else b"".join(bodies)
            cur = cat.chunks.get(cat.current) if cat.current else None
            if (cur is None or cat.lock.locked() or cat.write_fd < 0
                    or (cur.size > 0 and cur.size + size > self._max_chunk_size)):
                # The category was taken meanwhile (a rotation, a big write): wait for it.
                self._in_background(self._write_gathered_later(
                    cat, data, len(bodies), dones + durable, sync=bool(durable)))
                continue
            error: BaseException | None = None
            try:
                _append_small(cat.write_fd, cur, data)
            except Exception as exc:  # noqa: BLE001 - each write gets it as its answer
                error = exc
            else:
                if durable:
                    # Answered once an fsync covers them; queued before anything else runs
                    # (the listeners below), so that a rotation syncs this chunk for them.
                    self._after_fsync_each(cat, durable)
                    durable = []
                self._emit(StoreEventKind.WRITTEN, cat.name, str(cat.current), cur.size)
                traffic = cat.traffic
                traffic.writes += len(bodies)
                traffic.bytes_written += size
                traffic.messages_written += _count_written(data)
            call_each(dones, error)
            if durable:  # the append failed
                call_each(durable, error)

    async def _write_gathered_later(
        self, cat: Category, data: bytes | bytearray, count: int,
        dones: list[Callable[[BaseException | None], None]], *, sync: bool = False,
    ) -> None:
        error: BaseException | None = None
        try:
            await self.write(cat.name, data, sync=sync)
            cat.traffic.writes += count - 1  # counted as one write there
        except BaseException as exc:
            error = exc
            if not isinstance(exc, Exception):
                call_each(dones, error)
                raise
        call_each(dones, error)

    async def _start_chunk(self, cat: Category) -> str:
        """A new own chunk, announced (run under ``cat.lock`` through :func:`_finish`)."""
        name = await asyncio.to_thread(self._create_chunk_checked, cat)
        self._emit(StoreEventKind.CREATED, cat.name, name, 0)
        return name

    async def _append_in_thread(
        self, cat: Category, cur: Chunk, body: bytes | bytearray, sync: bool
    ) -> None:
        """A large or synced append in a worker thread (under ``cat.lock``, via :func:`_finish`)."""
        await asyncio.to_thread(self._append, cat.write_fd, cur, body, sync)
        self._emit(StoreEventKind.WRITTEN, cat.name, str(cur.name), cur.size)

    @staticmethod
    def _append(fd: int, chunk: Chunk, body: bytes | bytearray | memoryview, sync: bool) -> None:
        if chunk.dirty_tail:
            _remove_dirty_tail(fd, chunk)
        view = memoryview(body)
        done = 0
        try:
            while done < len(view):
                done += os.write(fd, view[done:])
            if sync:
                os.fsync(fd)
        except OSError as exc:
            # Roll back to the last good size so no partial body stays in the chunk; if that
            # fails too, no append goes after those bytes until they are gone.
            try:
                os.ftruncate(fd, chunk.size)
            except OSError:
                chunk.dirty_tail = True
            raise DiskWriteError(
                exc.errno or errno.EIO, f"writing chunk {chunk.name} failed: {exc.strerror}"
            ) from exc
        chunk.size += done

    async def rotate(self) -> list[str]:
        """Start a new chunk in every category whose current chunk holds data (time rotation)."""
        rotated: list[str] = []
        for cat in list(self._categories.values()):
            async with cat.lock:
                cur = cat.chunks.get(cat.current) if cat.current else None
                if cur is None or cur.size == 0:
                    continue
                try:
                    name = await _finish(asyncio.to_thread(self._create_chunk, cat))
                except OSError as exc:
                    # Keep the timer alive: the next write or tick tries again.
                    logger.warning("instance=%s category=%s cannot rotate: %s",
                                   self._instance, cat.name, exc)
                    continue
            rotated.append(f"{cat.name}/{name}")
            self._emit(StoreEventKind.CREATED, cat.name, name, 0)
        return rotated

    async def sync(self) -> None:
        """fsync every open write chunk (used by a graceful stop)."""
        for cat in list(self._categories.values()):
            async with cat.lock:
                if cat.write_fd >= 0:
                    await asyncio.to_thread(os.fsync, cat.write_fd)

    # --- replicated chunks --------------------------------------------------------------

    async def append_replica(
        self,
        category: str,
        chunk: str,
        offset: int,
        data: bytes | memoryview,
        *,
        sync: bool = False,
    ) -> int | None:
        """Append downloaded bytes (whole messages) of a peer's chunk at ``offset``.

        Creates the chunk when ``offset`` is 0 and it is not here yet. Returns the new size, or
        ``None`` when the chunk was acknowledged meanwhile (the data is dropped: an acked chunk
        is never resurrected).

        Raises:
            ReplicationError: ``offset`` is not the local size (another download raced us), or
                ``data`` does not end in ``\n`` (a peer must send whole messages only: a
                partial one stored here would be served to readers).
        """
        cname = parse_chunk_name(chunk)
        if cname.instance == self._instance:
            raise ReplicationError(f"refusing to replicate own chunk {chunk}")
        if data and data[-1] != 0x0A:
            raise ReplicationError(
                f"refusing {len(data)} bytes of {category}/{chunk} at {offset}: they do not end "
                "in a newline (a partial message)"
            )
        cat = await self._category(category)
        async with cat.lock:
            if chunk in cat.tombstones:
                return None
            c = cat.chunks.get(chunk)
            if c is None and offset != 0:
                raise ReplicationError(f"{category}/{chunk} is not here; cannot resume at "
                                       f"{offset}")
            if c is not None and offset != c.size:
                raise ReplicationError(
                    f"{category}/{chunk}: download at {offset} but local size is {c.size}"
                )
            if c is None or data:
                c = await _finish(self._store_replica(cat, cname, c, data, sync))
                cat.traffic.bytes_replicated += len(data)
            return c.size

    async def _store_replica(
        self, cat: Category, cname: ChunkName, c: Chunk | None, data: bytes | memoryview,
        sync: bool,
    ) -> Chunk:
        """Create and/or append to a replicated chunk: the file, the index and the events
        change together (run under ``cat.lock`` through :func:`_finish`)."""
        chunk = str(cname)
        if c is None:
            # Created and filled at once: on the loop when small (like _append_small: a
            # worker-thread hop costs more than creating a file and copying 64 KiB into the
            # page cache, and a catch-up of thousands of small chunks pays it per chunk),
            # else in one worker-thread hop.
            c = Chunk(cname, 0)
            try:
                if not sync and len(data) <= INLINE_WRITE_LIMIT:
                    self._create_file(cat.path / chunk, c, data, False)
                else:
                    await asyncio.to_thread(self._create_file, cat.path / chunk, c, data, sync)
            except DiskWriteError:
                c.size = 0  # the file exists, empty: index it like one created empty
                raise
            finally:
                if c.size or await asyncio.to_thread((cat.path / chunk).exists):
                    cat.chunks[chunk] = c
                    prev = cat.last_index.get(cname.instance, -1)
                    cat.last_index[cname.instance] = max(prev, cname.index)
                    self._emit(StoreEventKind.CREATED, cat.name, chunk, 0)
                    if c.size:
                        self._emit(StoreEventKind.WRITTEN, cat.name, chunk, c.size)
            return c
        if data:
            await asyncio.to_thread(self._append_file, cat.path / chunk, c, data, sync)
            self._emit(StoreEventKind.WRITTEN, cat.name, chunk, c.size)
        return c

    def _create_file(self, path: Path, chunk: Chunk, data: bytes | memoryview, sync: bool) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if data:
                self._append(fd, chunk, data, sync)
        finally:
            os.close(fd)

    def _append_file(self, path: Path, chunk: Chunk, data: bytes | memoryview, sync: bool) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            self._append(fd, chunk, data, sync)
        finally:
            os.close(fd)
    # --- acks ---------------------------------------------------------------------------

    async def ack(self, category: str, chunk: str, size: int | None) -> bool:
        """Tombstone a complete chunk. Returns ``False`` if it was a tombstone already.

        ``size`` is the number of bytes the consumer read (``None`` for a replicated ack, whose
        sender checked it).

        Raises:
            InvalidAckError: the chunk is missing, being written, incomplete, or ``size`` is
                smaller than the chunk.
        """
        validate_category(category)
        cname = parse_chunk_name(chunk)
        if size is not None and size < 0:
            raise BadRequestError("size must not be negative")
        cat = self._categories.get(category)
        if cat is not None and chunk in cat.tombstones:
            return False
        if cat is None or chunk not in cat.chunks:
            raise InvalidAckError(f"chunk {category}/{chunk} not found")
        async with cat.lock:
            if chunk in cat.tombstones:
                return False
            c = cat.chunks.get(chunk)
            if c is None:
                raise InvalidAckError(f"chunk {category}/{chunk} not found")
            if chunk == cat.current:
                raise InvalidAckError(f"chunk {chunk} is the current write chunk; cannot ack it")
            if size is not None and not self._is_complete(cat, cname):
                raise InvalidAckError(f"chunk {chunk} is not complete yet; cannot ack it")
            if size is not None and size < c.size:
                raise InvalidAckError(
                    f"size {size} is smaller than chunk {chunk} ({c.size} bytes): "
                    "it has not been read to the end"
                )
            await _finish(self._apply_tombstone(cat, cname, c.size, missing_ok=False))
        logger.debug("instance=%s category=%s acked %s", self._instance, category, chunk)
        return True

    async def tombstone_replica(self, category: str, chunk: str) -> bool:
        """Apply an ack replicated from a peer: tombstone ``chunk`` whether it is here, not
        here yet, or being created or appended by a download right now (the decision is taken
        under the category lock, so the ack wins: the download then finds the tombstone and
        drops its data). Returns ``False`` if it was a tombstone already.

        Raises:
            InvalidAckError: the chunk is this node's current write chunk.
        """
        validate_category(category)
        cname = parse_chunk_name(chunk)
        cat = await self._category(category)
        async with cat.lock:
            if chunk in cat.tombstones:
                return False
            if chunk == cat.current:
                raise InvalidAckError(f"chunk {chunk} is the current write chunk; cannot ack it")
            c = cat.chunks.get(chunk)
            await _finish(self._apply_tombstone(cat, cname, c.size if c else 0,
                                                missing_ok=c is None))
        logger.debug("instance=%s category=%s replicated ack of %s", self._instance, category,
                     chunk)
        return True

    async def _apply_tombstone(
        self, cat: Category, cname: ChunkName, size: int, *, missing_ok: bool
    ) -> None:
        """Tombstone the file, then the index, then tell the listeners (under ``cat.lock``,
        through :func:`_finish`)."""
        chunk = str(cname)
        await asyncio.to_thread(_tombstone, cat.path, chunk, missing_ok=missing_ok)
        cat.chunks.pop(chunk, None)
        cat.tombstones.add(chunk)
        cat.traffic.chunks_acked += 1
        cat.last_index[cname.instance] = max(cat.last_index.get(cname.instance, -1), cname.index)
        self._emit(StoreEventKind.ACKED, cat.name, chunk, size)



def _append_small(fd: int, chunk: Chunk, body: bytes | bytearray) -> None:
    # Small writes run on the event loop. Handing a 100-byte write to a worker thread costs a
    # queue hand-off and two GIL switches (~50 us, the largest cost of a single-message write in
    # a profile), while the write itself only copies into the page cache (a few us). Without
    # fsync it blocks only when the kernel throttles dirty pages, which stalls the worker thread
    # just the same. The test suite's blockbuster fixture allows os.write here by name.
    if chunk.dirty_tail:  # a failed write's bytes are past the end: _append removes them
        ChunkStore._append(fd, chunk, body, False)  # noqa: SLF001 - same module
        return
    if chunk.size + len(body) > chunk.reserved:
        reserve_space(fd, chunk, len(body))
    try:
        done = os.write(fd, body)  # one call: a short write to a file means trouble
    except OSError:
        done = -1
    if done == len(body):
        chunk.size += done
        return
    if done > 0:  # undone (by _append if not here), then retried once by _append
        chunk.dirty_tail = True
    ChunkStore._append(fd, chunk, body, False)  # noqa: SLF001 - same module


def _remove_dirty_tail(fd: int, chunk: Chunk) -> None:
    """Cut the bytes a failed write left past ``chunk.size`` (its rollback failed), or fail."""
    try:
        os.ftruncate(fd, chunk.size)
    except OSError as exc:
        raise DiskWriteError(
            exc.errno or errno.EIO, f"chunk {chunk.name} holds bytes of a failed write that "
            f"could not be removed: {exc.strerror}") from exc
    chunk.dirty_tail = False


def _count_written(data: bytes | bytearray) -> int:
    """The messages of a write just appended, for the metrics: :func:`count_newlines`, or the
    plain count where it failed (numpy out of memory...). Its bytes are in the chunk by now, so
    its answer must not become that error: a 500 has the client send it again (stored twice),
    and on the gathered path the writes were never answered at all."""
    try:
        return count_newlines(data)
    except Exception as exc:  # noqa: BLE001 - only the metric's count is at stake
        logger.warning("counting the messages of a write failed (%r): counted plainly", exc)
        return data.count(b"\n")


def _create_empty(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def _tombstone(dir_path: Path, chunk: str, *, missing_ok: bool = False) -> None:
    # Rename first, truncate second: a crash in between leaves a tombstone with data (truncated
    # at the next start), never a live-looking empty chunk.
    src, dst = dir_path / chunk, dir_path / (chunk + ACK_SUFFIX)
    try:
        src.rename(dst)
    except FileNotFoundError:
        if not missing_ok:
            raise
        _create_empty(dst)
        return
    os.truncate(dst, 0)

