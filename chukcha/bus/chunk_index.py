"""The in-memory index of a node's chunk files and what every part of the store shares.

Layout (``PROTOCOL.md``): ``<data_dir>/<category>/<instance>-chunk<9-digit index>``; an
acknowledged chunk is truncated and renamed ``<chunk>.acknowledged`` so it is never downloaded
again. The index keeps every live chunk and its *committed* size: readers never see bytes past
it, so a write that fails half-way (ENOSPC) and is rolled back was never visible to anyone.

:class:`ChunkIndex` owns the state, the lifecycle (``running.lock``, the directory scan and the
repair of a torn tail), the listeners and the queries; reads are added by
:class:`~chukcha.bus.chunk_reads.ChunkReader`, writes, replicated chunks and acks by
:class:`~chukcha.bus.chunks.ChunkStore`, the class the node uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Final, NamedTuple, cast

from chukcha.errors import AlreadyRunningError, BadRequestError
from chukcha.protocol import (
    ACK_SUFFIX,
    ChunkInfo,
    ChunkName,
    chunk_file_name,
    parse_chunk_name,
    validate_category,
)

__all__ = [
    "LOCK_FILE",
    "RESERVE_STEP",
    "Category",
    "Chunk",
    "ChunkIndex",
    "QueuedWrite",
    "StoreEvent",
    "StoreEventKind",
    "SyncRound",
    "Traffic",
    "WriteResult",
    "fsync_dir",
    "release_space",
    "reserve_space",
]

logger = logging.getLogger(__name__)

LOCK_FILE: Final = "running.lock"


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
    # Durable writes (sync=1, --sync-each-write): the fsyncs that answered them, how many
    # writes they answered (their ratio: writes per fsync) and the seconds they took.
    fsyncs: int = 0
    fsynced_writes: int = 0
    fsync_seconds: float = 0.0


@dataclass(slots=True)
class Chunk:
    name: ChunkName
    size: int
    synced: int = 0  # bytes known to be on stable storage (group commit)
    # Bytes past ``size`` that a failed write left and its rollback could not remove: no
    # append until they are gone (ChunkStore._append removes them first, or fails).
    dirty_tail: bool = False
    # Disk space allocated past ``size`` for the next appends (reserve_space), up to here.
    reserved: int = 0


@dataclass(slots=True)
class Category:
    name: str
    path: Path
    chunks: dict[str, Chunk] = field(default_factory=dict)
    tombstones: set[str] = field(default_factory=set)
    last_index: dict[str, int] = field(default_factory=dict)  # owner -> highest index ever seen
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    current: str | None = None  # own chunk being written
    write_fd: int = -1
    traffic: Traffic = field(default_factory=Traffic)
    # Group commit (chukcha.bus.group_commit): durable writes appended and waiting for an fsync
    # that begins after them (how each is answered), the fsyncs running (in the order they
    # began) and those waiting for the lock to begin, and how many durable writes wait
    # (queued or covered by a running fsync).
    sync_queue: list[Callable[[BaseException | None], None]] = field(default_factory=list)
    sync_rounds: deque[SyncRound] = field(default_factory=deque)
    sync_starting: int = 0
    sync_waiters: int = 0
    # Whether the directory entries of the chunks are on stable storage (fsync of the
    # directory), and whether an fsync that durable writes rely on failed outside a group
    # fsync (a rotation's): the next group fsync then answers every write it covers with it.
    dir_synced: bool = False
    sync_failed: bool = False
    # Small writes gathered in this event-loop iteration (ChunkStore.write_later): bodies, the
    # callbacks that answer them (the durable ones' apart) and their total size.
    later: list[bytes | bytearray] = field(default_factory=list)
    later_done: list[Callable[[BaseException | None], None]] = field(default_factory=list)
    later_durable: list[Callable[[BaseException | None], None]] = field(default_factory=list)
    later_size: int = 0
    # Big writes waiting for the worker thread that appends them, and the task that runs it
    # (ChunkStore._write_big); the worker thread takes them under ``queue_lock``.
    queued: deque[QueuedWrite] = field(default_factory=deque)
    queue_lock: threading.Lock = field(default_factory=threading.Lock)
    queue_round: asyncio.Future[None] | None = None


@dataclass(slots=True, eq=False)
class SyncRound:
    """A group fsync of ``chunk`` up to ``target`` bytes that answers the durable writes it
    ``covered`` (see :mod:`chukcha.bus.group_commit`)."""

    chunk: Chunk
    target: int
    covered: list[Callable[[BaseException | None], None]]
    sync_dir: bool  # the directory too (a chunk's entry is new)
    started: float  # time.perf_counter()
    ended: bool = False
    outcome: BaseException | None = None  # its error, or that of an earlier one


@dataclass(slots=True, eq=False)
class QueuedWrite:
    """A big write waiting in :attr:`Category.queued` (see ``ChunkStore._write_big``)."""

    body: bytes | bytearray
    messages: int  # counted by the worker thread once written
    done: asyncio.Future[WriteResult]
    taken: bool = False  # out of the queue: being appended, or answered (under ``queue_lock``)


class ChunkIndex:
    """The index, lifecycle, listeners and queries of a node's chunk store (the base of
    :class:`~chukcha.bus.chunks.ChunkStore`, which the node uses).

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
        self._categories: dict[str, Category] = {}
        self._lock_fd = -1
        self._dead_owners: set[str] = set()
        self._listeners: list[Callable[[StoreEvent], None]] = []
        self._create_lock = asyncio.Lock()
        self._changed: dict[str, asyncio.Future[None]] = {}
        self._closing = False
        # Categories with small writes gathered for the end of this loop iteration
        # (ChunkStore.write_later); the tasks that wait for a category's lock on the loop's
        # behalf (gathered writes and group fsyncs, see _in_background).
        self._gathered: list[Category] = []
        self._background: set[asyncio.Task[None]] = set()

    def _in_background(self, step: Coroutine[Any, Any, None]) -> None:
        """Run ``step`` as a task, kept referenced until it ends (what a callback on the loop
        cannot await: wait for a category's lock)."""
        task = asyncio.ensure_future(step)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
                current = cat.chunks.get(cat.current) if cat.current else None
                if current is not None:
                    release_space(cat.write_fd, current)
                os.close(cat.write_fd)
                cat.write_fd = -1
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _load_category(self, name: str) -> Category:
        cat = Category(name, self._dir / name)
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
            st = entry.stat()
            size = self._repair_tail(Path(entry.path), st.st_size)
            if size == st.st_size and st.st_blocks * 512 > size + _ALLOCATED_SLACK:
                _give_back_space(Path(entry.path), st)  # a crash kept what was allocated ahead
            cat.chunks[base] = Chunk(cname, size)
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

    def _is_complete(self, cat: Category, name: ChunkName) -> bool:
        if name.index < cat.last_index.get(name.instance, -1):
            return True
        return name.instance in self._dead_owners


    def _create_chunk(self, cat: Category) -> str:
        index = cat.last_index.get(self._instance, -1) + 1
        name = chunk_file_name(self._instance, index)
        # O_EXCL: never overwrite an existing chunk, whatever the index says.
        old = cat.chunks.get(cat.current) if cat.current else None
        if old is not None and cat.write_fd >= 0 and cat.sync_waiters and old.synced < old.size:
            # Durable writes wait for a group fsync of this chunk: do it before it is closed
            # (the next group fsync answers them; it syncs the directory with the new entry).
            try:
                os.fsync(cat.write_fd)
            except OSError:
                cat.sync_failed = True  # they must not be answered 200 by a later fsync
                raise
            old.synced = old.size
        fd = os.open(cat.path / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        if cat.write_fd >= 0:
            if old is not None:
                release_space(cat.write_fd, old)  # complete: nothing more is appended to it
            os.close(cat.write_fd)
        cat.write_fd = fd
        cat.current = name
        cat.last_index[self._instance] = index
        cat.chunks[name] = Chunk(ChunkName(self._instance, index), 0)
        if self._sync_each_write:
            fsync_dir(cat.path)  # every entry in the directory, the new one last
        # Else the first group fsync that a durable write into it waits for syncs the directory.
        cat.dir_synced = self._sync_each_write
        logger.info("instance=%s category=%s new chunk %s", self._instance, cat.name, name)
        return name


RESERVE_STEP: Final = 4 << 20
"""An own chunk's disk space is allocated this much ahead of its appends (see
:func:`reserve_space`)."""
_FALLOC_FL_KEEP_SIZE: Final = 1


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """Linux's ``fallocate(2)`` (``os.posix_fallocate`` cannot keep the file's size), or
    ``None`` where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], func)


def reserve_space(fd: int, chunk: Chunk, n: int) -> None:
    """Allocate the disk space of an own chunk's next appends (at least ``n`` bytes, usually
    :data:`RESERVE_STEP`) past its end, keeping the file's size: readers, peers and the Go
    server see only the bytes written. Best effort: where the file system cannot, nothing.

    Why: appending into allocated space skips ext4's delayed-allocation bookkeeping per page
    (space reservation, the extent status tree). A 1 MiB append cost 0.20-0.21 ms of CPU against
    0.28, and in the node's bulk writes (1 MiB bodies) 244-280 us against 331-387 us per
    append. RocksDB allocates its files ahead the same way. The space past the end is given
    back when the chunk is complete (:func:`release_space`); after a crash the last chunk
    keeps up to this much until it is deleted."""
    fallocate = _fallocate()
    if fallocate is None or chunk.reserved < 0:
        return
    want = max(n, RESERVE_STEP)
    if fallocate(fd, _FALLOC_FL_KEEP_SIZE, chunk.size, want) == 0:
        chunk.reserved = chunk.size + want
    else:  # not supported here, or no room: the write itself will tell
        err = ctypes.get_errno()
        chunk.reserved = -1 if err in (errno.EOPNOTSUPP, errno.ENOSYS) else chunk.size + n


def release_space(fd: int, chunk: Chunk) -> None:
    """Give back the space :func:`reserve_space` allocated past the chunk's end, and cut the
    bytes a failed write left there (``Chunk.dirty_tail``): called before the chunk's file is
    closed for writes (complete, or the node stops), after which no append would cut them
    and the node, reopened, would read them as messages of a write that was answered 500."""
    if chunk.dirty_tail:
        try:
            os.ftruncate(fd, chunk.size)
        except OSError as exc:
            logger.error(  # noqa: TRY400 - one clear line
                "chunk %s keeps the bytes of a failed write past its %d bytes (they could "
                "not be removed: %s)", chunk.name, chunk.size, exc.strerror)
        else:
            chunk.dirty_tail = False
            chunk.reserved = chunk.size
    elif chunk.reserved > chunk.size:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, chunk.size)  # the same size: frees only what is past it
        chunk.reserved = chunk.size


_ALLOCATED_SLACK: Final = 64 << 10
"""A chunk file holding more disk space than this past its end on start was allocated ahead
(:func:`reserve_space`) by a node that did not stop gracefully."""


def _give_back_space(path: Path, st: os.stat_result) -> None:
    """Give back the space a killed node had allocated past the end of a chunk (its size and
    bytes stay; so does its mtime, which retention reads), so that a crash does not keep up to
    :data:`RESERVE_STEP` per category until the chunk is deleted. Best effort."""
    try:
        os.truncate(path, st.st_size)  # the same size: frees only what is past it
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    except OSError as exc:
        logger.warning("cannot give back the space allocated past the end of %s: %s", path,
                       exc.strerror)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
