"""Chunk storage: per-category append-only chunk files, own and replicated.

Layout (``PROTOCOL.md``): ``<data_dir>/<category>/<instance>-chunk<9-digit index>``; an
acknowledged chunk is truncated and renamed ``<chunk>.acknowledged`` so it is never downloaded
again. The store keeps an in-memory index of every live chunk and its *committed* size: readers
never see bytes past it, so a write that fails half-way (ENOSPC) and is rolled back was never
visible to anyone.

All file I/O runs in worker threads (``asyncio.to_thread``); per-category locks keep the writes
of one category in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Final, NamedTuple, TypeVar

from chukcha.bus.tasks import run_to_end as _finish
from chukcha.errors import (
    AlreadyRunningError,
    BadRequestError,
    ChunkNotFoundError,
    DiskWriteError,
    InvalidAckError,
    ReadBufferTooSmallError,
    ReplicationError,
)
from chukcha.protocol import (
    ACK_SUFFIX,
    MAX_READ_SIZE,
    ChunkInfo,
    ChunkName,
    chunk_file_name,
    count_newlines,
    parse_chunk_name,
    validate_category,
)

__all__ = [
    "INLINE_READ_LIMIT",
    "INLINE_WRITE_LIMIT",
    "ChunkStore",
    "StoreEvent",
    "StoreEventKind",
    "Traffic",
    "WriteResult",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_Bytes = TypeVar("_Bytes", bytes, bytearray)

LOCK_FILE: Final = "running.lock"
INLINE_WRITE_LIMIT: Final = 64 << 10
INLINE_READ_LIMIT: Final = 64 << 10
"""Reads up to this size whose bytes are all in the page cache are done on the event loop
(:meth:`ChunkStore.read_now`); a worker thread's hand-off costs more than such a read."""
_NOWAIT: Final = getattr(os, "RWF_NOWAIT", 0)
"""Writes up to this size (without fsync) are done on the event loop, see ``_append_small``."""


class StoreEventKind(Enum):
    CREATED = "chunk_created"
    WRITTEN = "chunk_written"
    ACKED = "chunk_ack"


class StoreEvent(NamedTuple):
    """Something changed in the store; listeners (replication, long polls) are told at once.
    (A named tuple: one is made per write, and a frozen dataclass costs 4x more to make.)"""

    kind: StoreEventKind
    category: str
    chunk: str
    size: int


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Where a write landed: the chunk and the chunk's size after it."""

    chunk: str
    end: int


@dataclass(slots=True)
class Traffic:
    """What one category saw on this node since it started (read by :mod:`chukcha.bus.metrics`).

    Plain integers bumped on the hot path (a few attribute increments per request); nothing
    else reads them, so no lock is needed on the event loop.
    """

    writes: int = 0
    bytes_written: int = 0
    messages_written: int = 0
    reads: int = 0
    bytes_read: int = 0
    messages_read: int = 0
    bytes_replicated: int = 0
    chunks_acked: int = 0


@dataclass(slots=True)
class _Chunk:
    name: ChunkName
    size: int
    synced: int = 0  # bytes known to be on stable storage (group commit)


@dataclass(slots=True)
class _Category:
    name: str
    path: Path
    chunks: dict[str, _Chunk] = field(default_factory=dict)
    tombstones: set[str] = field(default_factory=set)
    last_index: dict[str, int] = field(default_factory=dict)  # owner -> highest index ever seen
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    current: str | None = None  # own chunk being written
    write_fd: int = -1
    traffic: Traffic = field(default_factory=Traffic)
    sync_waiters: int = 0  # durable writes waiting for a group fsync of the current chunk
    sync_round: asyncio.Future[None] | None = None  # the group fsync in progress
    fsyncs: int = 0  # group fsyncs done (tests and benchmarks read it)


class ChunkStore:
    """The chunk files of one node.

    Call :meth:`open` (blocking: takes the lock, scans the directory) before use and
    :meth:`close` after.
    """

    def __init__(
        self,
        data_dir: Path,
        instance: str,
        *,
        max_chunk_size: int,
        sync_each_write: bool = False,
        group_commit: bool = True,
    ) -> None:
        self._dir = data_dir
        self._instance = instance
        self._max_chunk_size = max_chunk_size
        self._sync_each_write = sync_each_write
        self._group_commit = group_commit
        self._categories: dict[str, _Category] = {}
        self._lock_fd = -1
        self._dead_owners: set[str] = set()
        self._listeners: list[Callable[[StoreEvent], None]] = []
        self._create_lock = asyncio.Lock()
        self._changed: dict[str, asyncio.Future[None]] = {}
        self._closing = False

    @property
    def instance(self) -> str:
        return self._instance

    @property
    def data_dir(self) -> Path:
        return self._dir

    # --- lifecycle ----------------------------------------------------------------------

    def open(self) -> None:
        """Take ``running.lock`` and load the index (blocking; run it in a thread)."""
        self._dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunningError(
                f"data directory {self._dir} is in use by another chukcha node "
                f"({self._dir / LOCK_FILE} is locked); stop it or choose another --dirname"
            ) from None
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        for entry in sorted(self._dir.iterdir()):
            if entry.is_dir():
                try:
                    validate_category(entry.name)
                except BadRequestError:
                    logger.warning("ignoring directory %s: not a valid category", entry)
                    continue
                self._load_category(entry.name)

    def close(self) -> None:
        """Close every file and release the lock (blocking)."""
        for cat in self._categories.values():
            if cat.write_fd >= 0:
                os.close(cat.write_fd)
                cat.write_fd = -1
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _load_category(self, name: str) -> _Category:
        cat = _Category(name, self._dir / name)
        self._categories[name] = cat
        for entry in sorted(os.scandir(cat.path), key=lambda e: e.name):
            fname = entry.name
            tomb = fname.endswith(ACK_SUFFIX)
            base = fname.removesuffix(ACK_SUFFIX)
            try:
                cname = parse_chunk_name(base)
            except BadRequestError:
                if not fname.endswith(".tmp"):
                    logger.warning("ignoring %s: not a chunk file", entry.path)
                continue
            prev = cat.last_index.get(cname.instance, -1)
            cat.last_index[cname.instance] = max(prev, cname.index)
            if tomb:
                cat.tombstones.add(base)
                if entry.stat().st_size:
                    os.truncate(entry.path, 0)  # a crash between rename and truncate
                continue
            size = self._repair_tail(Path(entry.path), entry.stat().st_size)
            cat.chunks[base] = _Chunk(cname, size)
        # Never append to a chunk that existed before this start: it may end in a message that
        # a crash cut short (repaired above) and readers must be able to finish it. If our last
        # chunk holds data, start the next one now so the old one shows as complete.
        # An empty last chunk is not reused either: like the Go server, the next write starts
        # a new one, after which the empty one is complete and can be acked (a consumer that
        # read it to its end acks it).
        own = [c for c in cat.chunks.values() if c.name.instance == self._instance]
        if own:
            last = max(own, key=lambda c: c.name.index)
            if last.size > 0 or last.name.index < cat.last_index[self._instance]:
                self._create_chunk(cat)
        elif self._instance in cat.last_index:
            self._create_chunk(cat)
        return cat

    @staticmethod
    def _repair_tail(path: Path, size: int) -> int:
        """Cut a trailing partial message (a crash mid-write) so every chunk ends in ``\\n``."""
        if size == 0:
            return 0
        fd = os.open(path, os.O_RDWR)
        try:
            if os.pread(fd, 1, size - 1) == b"\n":
                return size
            pos = size
            good = 0
            while pos > 0:
                start = max(0, pos - (1 << 20))
                buf = os.pread(fd, pos - start, start)
                nl = buf.rfind(b"\n")
                if nl >= 0:
                    good = start + nl + 1
                    break
                pos = start
            logger.warning("truncating %s from %d to %d bytes: partial last message",
                           path, size, good)
            os.ftruncate(fd, good)
            return good
        finally:
            os.close(fd)

    # --- listeners ----------------------------------------------------------------------

    def add_listener(self, callback: Callable[[StoreEvent], None]) -> None:
        """Call ``callback`` (on the event loop, synchronously) after every change."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[StoreEvent], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def _emit(self, kind: StoreEventKind, category: str, chunk: str, size: int) -> None:
        event = StoreEvent(kind, category, chunk, size)
        if self._changed:  # long polls parked somewhere
            fut = self._changed.pop(category, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        for cb in tuple(self._listeners):
            try:
                cb(event)
            except Exception:
                logger.exception("store listener failed on %s", event)

    # --- queries ------------------------------------------------------------------------

    def has_category(self, category: str) -> bool:
        """Whether ``category`` exists here (its name was validated when it was created)."""
        return category in self._categories

    def categories(self) -> list[str]:
        return sorted(self._categories)

    def traffic(self) -> dict[str, Traffic]:
        """Per-category counters since this node started (live objects: read, never write)."""
        return {name: cat.traffic for name, cat in self._categories.items()}

    def mtime(self, category: str, chunk: str) -> float | None:
        """Last modification time of a live chunk's file (blocking: call it in a thread)."""
        try:
            return (self._dir / category / chunk).stat().st_mtime
        except FileNotFoundError:
            return None

    def list_chunks(self, category: str) -> list[ChunkInfo]:
        """Live chunks of ``category``, by name; only each owner's last one is incomplete."""
        validate_category(category)
        cat = self._categories.get(category)
        if cat is None:
            return []
        return [
            ChunkInfo(name, self._is_complete(cat, c.name), c.size)
            for name, c in sorted(cat.chunks.items())
        ]

    def chunk_size(self, category: str, chunk: str) -> int | None:
        """The committed size of a live chunk, ``None`` when it is not here."""
        cat = self._categories.get(category)
        c = cat.chunks.get(chunk) if cat else None
        return c.size if c else None

    def is_tombstoned(self, category: str, chunk: str) -> bool:
        cat = self._categories.get(category)
        return cat is not None and chunk in cat.tombstones

    def is_complete(self, category: str, chunk: str) -> bool:
        cat = self._categories.get(category)
        c = cat.chunks.get(chunk) if cat else None
        return cat is not None and c is not None and self._is_complete(cat, c.name)

    def last_index(self, category: str, owner: str) -> int:
        """Highest chunk index of ``owner`` ever seen here (live or tombstoned), -1 if none."""
        cat = self._categories.get(category)
        return cat.last_index.get(owner, -1) if cat else -1

    # (replication, issue 3) read-only views the replicator needs for its ack replay.
    def owners(self, category: str) -> list[str]:
        """Every owner with a live or tombstoned chunk of ``category`` here."""
        cat = self._categories.get(category)
        return sorted(cat.last_index) if cat else []

    def tombstones(self, category: str) -> list[str]:
        """Names of the acknowledged chunks of ``category`` here, sorted."""
        cat = self._categories.get(category)
        return sorted(cat.tombstones) if cat else []

    def set_owner_dead(self, owner: str, dead: bool = True) -> None:
        """Treat the last chunk of a long-gone ``owner`` as complete (or stop doing so)."""
        if owner == self._instance:
            return
        if dead:
            self._dead_owners.add(owner)
        else:
            self._dead_owners.discard(owner)

    def _is_complete(self, cat: _Category, name: ChunkName) -> bool:
        if name.index < cat.last_index.get(name.instance, -1):
            return True
        return name.instance in self._dead_owners

    # --- writes -------------------------------------------------------------------------

    async def _category(self, category: str) -> _Category:
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

    def _new_category(self, category: str) -> _Category:
        try:
            (self._dir / category).mkdir(exist_ok=True)
        except OSError as exc:
            raise DiskWriteError(
                exc.errno or errno.EIO, f"creating category {category} failed: {exc.strerror}"
            ) from exc
        return self._load_category(category)

    def _create_chunk_checked(self, cat: _Category) -> str:
        try:
            return self._create_chunk(cat)
        except OSError as exc:
            raise DiskWriteError(
                exc.errno or errno.EIO, f"creating a chunk in {cat.name} failed: {exc.strerror}"
            ) from exc

    def _create_chunk(self, cat: _Category) -> str:
        index = cat.last_index.get(self._instance, -1) + 1
        name = chunk_file_name(self._instance, index)
        # O_EXCL: never overwrite an existing chunk, whatever the index says.
        old = cat.chunks.get(cat.current) if cat.current else None
        if old is not None and cat.write_fd >= 0 and cat.sync_waiters and old.synced < old.size:
            # Durable writes wait for a group fsync of this chunk: do it before it is closed.
            os.fsync(cat.write_fd)
            old.synced = old.size
        fd = os.open(cat.path / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        if cat.write_fd >= 0:
            os.close(cat.write_fd)
        cat.write_fd = fd
        cat.current = name
        cat.last_index[self._instance] = index
        cat.chunks[name] = _Chunk(ChunkName(self._instance, index), 0)
        if self._sync_each_write:
            _fsync_dir(cat.path)
        logger.info("instance=%s category=%s new chunk %s", self._instance, cat.name, name)
        return name

    async def write(
        self, category: str, body: bytes | bytearray, *, sync: bool = False
    ) -> WriteResult:
        """Append a validated body (whole messages) to this node's current chunk.

        Raises:
            DiskWriteError: the file could not be written; the chunk is back at its last good
                size and nothing of the body is visible.
        """
        cat = self._categories.get(category) or await self._category(category)
        async with cat.lock:
            created: str | None = None
            if cat.current is None:
                created = await _finish(self._start_chunk(cat))
            cur = cat.chunks[cat.current or ""]
            if cur.size > 0 and cur.size + len(body) > self._max_chunk_size:
                prev = cat.current
                created = await _finish(self._start_chunk(cat))
                cur = cat.chunks[created]
                # The previous chunk just became complete; replicas and readers learn it from
                # the creation event of the new one.
                logger.debug("rotated %s/%s by size", category, prev)
            if created is not None and sync and not self._sync_each_write:
                # A synced write must survive a power loss, and so must the new file's entry.
                await asyncio.to_thread(_fsync_dir, cat.path)
            name = cat.current or str(cur.name)
            durable = sync or self._sync_each_write
            grouped = durable and self._group_commit
            if (durable and not grouped) or len(body) > INLINE_WRITE_LIMIT:
                await _finish(self._append_in_thread(cat, cur, body, durable and not grouped))
            else:
                _append_small(cat.write_fd, cur, body)
                self._emit(StoreEventKind.WRITTEN, category, name, cur.size)
            end = cur.size  # this write's end, not a later one's
            traffic = cat.traffic
            traffic.writes += 1
            traffic.bytes_written += len(body)
            traffic.messages_written += count_newlines(body)
            if grouped:
                cat.sync_waiters += 1  # before the lock is released: a rotation syncs for us
        if grouped:
            # Group commit: one fsync covers every write that landed before it began, so
            # concurrent durable writes share fsyncs instead of queueing one each under the
            # lock. The answer still waits until this write's bytes are on stable storage.
            try:
                await self._sync_through(cat, cur, end)
            finally:
                cat.sync_waiters -= 1
        return WriteResult(name, end)

    def write_now(self, category: str, body: bytes | bytearray) -> WriteResult | None:
        """:meth:`write` without waiting, where it needs none: a small, not durable write into
        the current chunk of a known category while nothing holds the category's lock (no
        await between the check and the append, so it is as if the write held it). ``None``:
        nothing was done; call :meth:`write`."""
        cat = self._categories.get(category)
        if (cat is None or cat.current is None or cat.lock.locked() or self._sync_each_write
                or len(body) > INLINE_WRITE_LIMIT):
            return None
        cur = cat.chunks[cat.current]
        if cur.size > 0 and cur.size + len(body) > self._max_chunk_size:
            return None  # a rotation first: the slow path
        name = cat.current
        _append_small(cat.write_fd, cur, body)
        end = cur.size
        self._emit(StoreEventKind.WRITTEN, category, name, end)
        traffic = cat.traffic
        traffic.writes += 1
        traffic.bytes_written += len(body)
        traffic.messages_written += count_newlines(body)
        return WriteResult(name, end)

    async def _sync_through(self, cat: _Category, chunk: _Chunk, end: int) -> None:
        """Return once ``chunk`` is on stable storage up to ``end`` (joins or starts a round)."""
        while chunk.synced < end:
            if cat.current is None or cat.chunks.get(cat.current) is not chunk:
                # Rotated away without the fsync the rotation owes us (it failed).
                raise DiskWriteError(errno.EIO, f"fsync of chunk {chunk.name} failed")
            round_ = cat.sync_round
            if round_ is None:
                round_ = cat.sync_round = asyncio.ensure_future(self._sync_round(cat))
            await asyncio.shield(round_)  # a client that leaves does not stop the round

    async def _sync_round(self, cat: _Category) -> None:
        """One group fsync of the current chunk: covers every byte written before it began."""
        try:
            async with cat.lock:
                chunk = cat.chunks.get(cat.current) if cat.current else None
                if cat.write_fd < 0 or chunk is None:
                    raise DiskWriteError(errno.EIO, f"category {cat.name} is closed")
                target = chunk.size
                # A duplicate: a rotation may close write_fd while the fsync runs.
                fd = os.dup(cat.write_fd)
            try:
                await asyncio.to_thread(_fsync_close, fd)
            except OSError as exc:
                raise DiskWriteError(
                    exc.errno or errno.EIO, f"fsync of chunk {chunk.name} failed: {exc.strerror}"
                ) from exc
            chunk.synced = max(chunk.synced, target)
            cat.fsyncs += 1
        finally:
            cat.sync_round = None

    async def _start_chunk(self, cat: _Category) -> str:
        """A new own chunk, announced (run under ``cat.lock`` through :func:`_finish`)."""
        name = await asyncio.to_thread(self._create_chunk_checked, cat)
        self._emit(StoreEventKind.CREATED, cat.name, name, 0)
        return name

    async def _append_in_thread(
        self, cat: _Category, cur: _Chunk, body: bytes | bytearray, sync: bool
    ) -> None:
        """A large or synced append in a worker thread (under ``cat.lock``, via :func:`_finish`)."""
        await asyncio.to_thread(self._append, cat.write_fd, cur, body, sync)
        self._emit(StoreEventKind.WRITTEN, cat.name, str(cur.name), cur.size)

    @staticmethod
    def _append(fd: int, chunk: _Chunk, body: bytes | bytearray | memoryview, sync: bool) -> None:
        view = memoryview(body)
        done = 0
        try:
            while done < len(view):
                done += os.write(fd, view[done:])
            if sync:
                os.fsync(fd)
        except OSError as exc:
            # Roll back to the last good size so no partial body stays in the chunk.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, chunk.size)
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
        self, cat: _Category, cname: ChunkName, c: _Chunk | None, data: bytes | memoryview,
        sync: bool,
    ) -> _Chunk:
        """Create and/or append to a replicated chunk: the file, the index and the events
        change together (run under ``cat.lock`` through :func:`_finish`)."""
        chunk = str(cname)
        if c is None:
            # Created and filled at once: on the loop when small (like _append_small: a
            # worker-thread hop costs more than creating a file and copying 64 KiB into the
            # page cache, and a catch-up of thousands of small chunks pays it per chunk),
            # else in one worker-thread hop.
            c = _Chunk(cname, 0)
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

    def _create_file(self, path: Path, chunk: _Chunk, data: bytes | memoryview, sync: bool) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if data:
                self._append(fd, chunk, data, sync)
        finally:
            os.close(fd)

    def _append_file(self, path: Path, chunk: _Chunk, data: bytes | memoryview, sync: bool) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            self._append(fd, chunk, data, sync)
        finally:
            os.close(fd)

    # --- reads --------------------------------------------------------------------------

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
            return b""
        want = min(max_size, limit - off)
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
            return b""
        want = min(max_size, limit - off)
        if want > INLINE_READ_LIMIT:
            return None
        data = _pread_cached(cat.path / chunk, want, off)
        if data is None:
            return None
        cat.traffic.reads += 1
        return self._whole_messages(cat, data, want, max_size, off)

    @staticmethod
    def _whole_messages(
        cat: _Category, data: _Bytes, want: int, max_size: int, off: int, *,
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
        self, cat: _Category, cname: ChunkName, size: int, *, missing_ok: bool
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


STREAM_READ_OVER: Final = 1 << 20
"""Reads answering more than this are sent from the file piece by piece (:class:`FileSlice`)."""


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


def _append_small(fd: int, chunk: _Chunk, body: bytes | bytearray) -> None:
    # Small writes run on the event loop. Handing a 100-byte write to a worker thread costs a
    # queue hand-off and two GIL switches (~50 us, the largest cost of a single-message write in
    # a profile), while the write itself only copies into the page cache (a few us). Without
    # fsync it blocks only when the kernel throttles dirty pages, which stalls the worker thread
    # just the same. The test suite's blockbuster fixture allows os.write here by name.
    try:
        done = os.write(fd, body)  # one call: a short write to a file means trouble
    except OSError:
        done = -1
    if done == len(body):
        chunk.size += done
        return
    if done > 0:  # undone, then retried once, with every error's handling, by _append
        os.ftruncate(fd, chunk.size)
    ChunkStore._append(fd, chunk, body, False)  # noqa: SLF001 - same module


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
