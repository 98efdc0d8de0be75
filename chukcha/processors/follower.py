"""Following one partition's changelog into a local store: standbys, and a new owner's catch-up.

A :class:`Follower` keeps a partition's local store equal to the bus's changelog
(:mod:`chukcha.processors.changelog`) without owning the partition: it reads the changelog
category from **every** node the app knows (a record that has not replicated everywhere yet is
still found; chunk bytes are the same on every node, so one offset per chunk serves them all),
assembles the records and applies those that continue what the store holds. It never acks the
changelog (its owner's snapshots do) and never writes to the bus.

The store's last record is its head (``(epoch, seq)`` and that epoch's link, kept with every
write: :func:`~chukcha.processors.changelog.read_head`). What is applied:

- the records on the chain of epoch links after the head (:func:`continuation`, which is the
  changelog's reader filter :func:`~chukcha.state.changelog.plan_replay`: a fenced-off former
  owner's late records are left out);
- when the chain does not go through the head (a newer epoch built on an earlier record: the
  store applied a zombie's record), or a record of a newer epoch sits at or before the head's
  ``seq``, or the store holds commits never confirmed on the bus, the store has **diverged** and
  is rebuilt (emptied, then the latest snapshot and the records after it);
- a snapshot newer than the store's ``seq`` that the records cannot reach (the owner's snapshot
  deleted the changelog chunks before it while this follower was behind) replaces the store.

A **standby** (``standbys=N`` with instances through etcd, :mod:`chukcha.processors.group`) runs
:meth:`Follower.follow` for as long as it is one: it polls every node, and when nothing is new it
waits on a long-poll read of the open changelog chunk, so a commit reaches the standby within a
read. When the standby becomes the owner, :meth:`Follower.catch_up` reads what is left (the
tail) from every node and applies it: the partition starts without a restore. A new owner whose
local copy comes from an earlier ownership does the same catch-up: a current copy is used as it
is, one that is behind only replays the records after it, a diverged one is rebuilt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

import orjson

from chukcha.errors import ClientError, RemoteNotFoundError
from chukcha.processors.changelog import (
    PENDING_PREFIX,
    NotEnoughNodes,
    QuorumRetry,
    head_entries,
    nodes_needed,
    read_head,
)
from chukcha.processors.engine import Engine
from chukcha.protocol import ChunkInfo
from chukcha.state.base import StateStore
from chukcha.state.changelog import Assembler, Head, Record, Replay, plan_replay

__all__ = ["FollowBus", "Follower", "LocalCopy", "continuation", "local_copy", "wipe_store"]

logger = logging.getLogger(__name__)

_READ_BYTES: Final = 4 << 20
_WRITE_KEYS: Final = 200_000  # keys per write batch when many records are applied at once
_T = TypeVar("_T")


class FollowBus(Protocol):
    """How a follower reads the bus (the runner's :class:`~chukcha.processors.busio.BusIO`)."""

    @property
    def nodes(self) -> list[str]:
        """Every node the app knows."""
        ...

    async def chunks_on(self, url: str, category: str) -> list[ChunkInfo]:
        """``/listChunks`` of ``category`` on node ``url``."""
        ...

    async def read_on(self, url: str, category: str, chunk: str, offset: int, max_size: int,
                      *, wait: float = 0.0) -> bytes:
        """``/read`` on node ``url`` (``wait``: long poll of an open chunk)."""
        ...


@dataclass(frozen=True, slots=True)
class LocalCopy:
    """What a partition's local store holds: ``head`` the last record applied (``None``: not
    known, a store of an older release), ``pending`` the ``seq`` of the records it keeps until
    they are confirmed on the bus (some may be confirmed already: their keys go with the next
    commit), ``empty`` nothing at all."""

    head: Head | None
    pending: frozenset[int]
    empty: bool


def local_copy(store: StateStore) -> LocalCopy:
    """The store's :class:`LocalCopy` (blocking)."""
    pending = frozenset(int(k[len(PENDING_PREFIX):], 16) for k, _ in store.scan(PENDING_PREFIX))
    empty = next(iter(store.scan(b"")), None) is None
    return LocalCopy(read_head(store), pending, empty)


def continuation(records: Iterable[Record], head: Head | None) -> Replay:
    """The records that extend a store standing at ``head`` (``None``: an empty store), in
    order, or ``diverged``: the one filter of what a follower applies, the changelog's reader
    filter (:func:`~chukcha.state.changelog.plan_replay`: only records on the chain of epoch
    links; a fenced-off former owner's late records are left out)."""
    return plan_replay(records, head)


def wipe_store(store: StateStore) -> None:
    """Delete every key of ``store`` (blocking; in batches)."""
    while True:
        keys: list[bytes] = []
        for key, _ in store.scan(b""):
            keys.append(key)
            if len(keys) >= 50_000:
                break
        if not keys:
            return
        store.write({}, keys, sync=False)


class Follower:
    """Keeps ``store`` (partition ``partition``'s local store) equal to the changelog in
    ``category`` (see the module docstring). Not safe to use from two tasks at once."""

    def __init__(self, category: str, partition: int, store: StateStore, bus: FollowBus, *,
                 engine: Callable[[], Engine] | None = None,
                 min_sync_replicas: int = 0) -> None:
        self.category = category
        self._min_sync_replicas = min_sync_replicas
        self._new_engine = engine
        self._engine: Engine | None = None  # loaded, and kept as the store changes (warm)
        self.partition = partition
        self._store = store
        self._bus = bus
        self._read: dict[str, int] = {}  # chunk name -> bytes read (the same on every node)
        self._assembler = Assembler()
        self.head = Head(0, 0)
        """The last record the store holds."""
        self._loaded = False
        self._diverged = False
        # The store's pending records not seen on the bus yet: seq -> the record's epoch.
        self._unconfirmed: dict[int, int] = {}
        self.applied = 0
        """Records applied (a snapshot counts as one)."""
        self.rebuilds = 0
        """Times the store was emptied and rebuilt (diverged, or behind a snapshot)."""
        self.missing: dict[str, str] = {}
        """The nodes that did not answer the last read (url -> why)."""

    # --- reading --------------------------------------------------------------------------

    async def _load(self) -> None:
        if self._loaded:
            return
        copy = await asyncio.to_thread(local_copy, self._store)
        if copy.head is None or (copy.head.seq == 0 and not copy.empty):
            logger.info("category=%s partition %d: the local store says no changelog position "
                        "(written by an older release, or before the changelog); rebuilding "
                        "it from the bus", self.category, self.partition)
            await self._reset()
        else:
            self.head = copy.head
            self._unconfirmed = await asyncio.to_thread(_pending_epochs, self._store)
        self._loaded = True

    async def _check_unconfirmed(self) -> None:
        """After the first read of every node: a record the store kept as pending that the bus
        does not hold was never published (its owner was killed first; nothing past it was
        acked or emitted). Publishing it now, under an epoch that no longer owns the
        partition, could cross another owner's history: rebuild the store instead."""
        if self._unconfirmed:
            logger.info("category=%s partition %d: the local store holds %d commit(s) never "
                        "confirmed on the bus; rebuilding it from the bus", self.category,
                        self.partition, len(self._unconfirmed))
            await self._reset()

    async def poll(self, *, wait: float = 0.0, quorum: bool = False) -> int:
        """Read everything new on every node and apply it; when nothing was new and ``wait``
        > 0, first wait up to ``wait`` s on a long-poll read of an open chunk. Returns the
        number of records applied. ``quorum``: apply nothing unless enough nodes answered to
        see every confirmed record (:func:`~chukcha.processors.changelog.nodes_needed`).

        Raises:
            NotEnoughNodes: ``quorum`` and too few nodes answered (nothing applied).
            ClientError: no node answered.
        """
        await self._load()
        got, enough = await self._read_every_node(quorum=quorum)
        if self._unconfirmed and enough:
            # Only once enough nodes answered: a pending record may be on a missing one.
            await self._check_unconfirmed()
            got, enough = await self._read_every_node(quorum=quorum)
        if not got and wait > 0:
            got = await self._long_poll(wait)
        if not got and not self._diverged:
            return 0
        return await self._apply()

    async def catch_up(self) -> int:
        """Apply everything the bus holds now (a new owner: the old one is gone); returns the
        number of records applied. Every read needs answers from enough of the app's nodes
        that every confirmed record is seen (``min_sync_replicas=0``: all of them); until then
        it waits, retrying with a backoff and logging which nodes are missing: catching up
        from fewer could miss the last owner's last records, and this owner would link its
        epoch to an older head (those records, their input acked already, lost)."""
        applied = 0
        retry = QuorumRetry(f"category={self.category} partition {self.partition}: taking "
                            f"over")
        while True:
            rebuilds = self.rebuilds
            try:
                applied += await self.poll(quorum=True)
            except NotEnoughNodes as exc:
                await retry.wait(exc)
                continue
            if self.rebuilds == rebuilds:
                retry.done()
                return applied
            # Rebuilt (emptied): read everything again, until a read changes nothing.

    async def follow(self, *, wait: float = 1.0,
                     on_error: Callable[[Exception], None] | None = None,
                     on_ready: Callable[[], None] | None = None) -> None:
        """Follow until cancelled (a standby); read errors are retried after ``wait``. With an
        ``engine`` factory, once caught up the follower loads an engine over the store and
        keeps its state (dedup IDs, positions, outbox) as the store changes, so that taking
        the partition over needs no load (:meth:`take_engine`). ``on_ready`` is called once,
        after the first read of every node was applied (and the engine loaded)."""
        while True:
            try:
                await self.poll(wait=wait)
                if self._engine is None and self._new_engine is not None:
                    engine = self._new_engine()
                    await _shielded(asyncio.to_thread(engine.load))
                    self._engine = engine
                if on_ready is not None:
                    on_ready()
                    on_ready = None
            except ClientError as exc:
                if on_error is not None:
                    on_error(exc)
                await asyncio.sleep(wait)  # backoff before retrying the nodes

    async def _read_every_node(self, *, quorum: bool = False) -> tuple[int, bool]:
        """Read each chunk's new bytes from every node that answers; returns the lines read
        and whether enough nodes answered (``quorum``: raise when not)."""
        got = 0
        nodes = self._bus.nodes
        missing: dict[str, str] = {}
        listed: set[str] = set()
        for url in nodes:
            try:
                chunks = await self._bus.chunks_on(url, self.category)
                for info in chunks:
                    listed.add(info.name)
                    got += await self._read_chunk(url, info.name, info.size)
            except ClientError as exc:
                missing[url] = str(exc) or type(exc).__name__
        self.missing = missing
        if len(missing) == len(nodes):
            raise ClientError(f"no node answered reading {self.category!r}: "
                              + "; ".join(f"{u}: {why}" for u, why in missing.items()))
        if not missing:
            for name in [n for n in self._read if n not in listed]:
                del self._read[name]  # acked (deleted) everywhere: forget it
        needed = nodes_needed(len(nodes), self._min_sync_replicas)
        enough = len(nodes) - len(missing) >= needed
        if quorum and not enough:
            raise NotEnoughNodes(self.category, needed, len(nodes), missing)
        return got, enough

    async def _read_chunk(self, url: str, chunk: str, size: int) -> int:
        off = self._read.get(chunk, 0)
        got = 0
        while off < size:
            try:
                data = await self._bus.read_on(url, self.category, chunk, off, _READ_BYTES)
            except RemoteNotFoundError:
                break  # acked (deleted) since it was listed: it held only older records
            if not data:
                break
            off += len(data)
            got += self._add(data)
        self._read[chunk] = off
        return got

    async def _long_poll(self, wait: float) -> int:
        """Wait for the next data of the first node's last open chunk (or ``wait`` s)."""
        for url in self._bus.nodes:
            try:
                chunks = await self._bus.chunks_on(url, self.category)
            except ClientError:
                continue
            open_ = [c for c in chunks if not c.complete]
            if not open_:
                break
            name = open_[-1].name
            off = self._read.get(name, 0)
            try:
                data = await self._bus.read_on(url, self.category, name, off, _READ_BYTES,
                                               wait=wait)
            except ClientError:
                continue
            self._read[name] = off + len(data)
            return self._add(data)
        await asyncio.sleep(wait)  # no open chunk to wait on (an idle changelog): poll again
        return 0

    def _add(self, data: bytes) -> int:
        lines = data[:-1].split(b"\n") if data.endswith(b"\n") else data.split(b"\n")
        for line in lines:
            try:
                head = orjson.loads(line)
                seq, epoch, base = int(head["s"]), int(head["e"]), head.get("k") == 1
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # not a record: the assembler would skip it too
            if seq <= self.head.seq:
                if not base and self._unconfirmed.get(seq) == epoch:
                    del self._unconfirmed[seq]  # on the bus: the store's record is confirmed
                if not base and epoch > self.head.epoch:
                    # The bus's history went another way at or before what the store holds.
                    self._diverged = True
                continue  # applied already (or a snapshot the store is past)
            self._assembler.add(line)
        return len(lines)

    # --- applying -------------------------------------------------------------------------

    async def _apply(self) -> int:
        records = self._assembler.records()
        replay = Replay([], diverged=True)
        if not self._diverged:
            replay = continuation(records, self.head if self.head.seq else None)
            self._diverged = replay.diverged
        if self._diverged:
            logger.warning("category=%s partition %d: the bus's changelog diverged from the "
                           "local copy at (epoch %d, seq %d); rebuilding it from the bus",
                           self.category, self.partition, self.head.epoch, self.head.seq)
            await self._reset()
            return 0
        todo = replay.records
        last = todo[-1].seq if todo else self.head.seq
        if self.head.seq and any(r.base and r.seq > last for r in records):
            fresh = continuation(records, None).records
            if fresh and fresh[0].base and fresh[0].seq > last:
                # A newer snapshot the records cannot reach (the chunks between were deleted
                # while this follower was behind): it is the whole store as of its seq.
                logger.info("category=%s partition %d: behind a snapshot (at seq %d, snapshot "
                            "at %d); replacing the local copy with it", self.category,
                            self.partition, self.head.seq, fresh[0].seq)
                self.rebuilds += 1
                await _shielded(asyncio.to_thread(self._wipe))
                todo = fresh
        if not todo:
            return 0
        await _shielded(asyncio.to_thread(self._write, todo))
        self._assembler.forget(self.head.seq)
        return len(todo)

    def take_engine(self) -> Engine | None:
        """The warm engine (loaded and kept current with the store), if there is one; the
        follower lets go of it."""
        engine, self._engine = self._engine, None
        return engine

    def _write(self, records: list[Record]) -> None:
        """Apply ``records`` (consecutive) in as few write batches as their size allows; each
        batch carries the ``(epoch, seq)`` of its last record, so the store never says it holds
        more than it does."""
        merged: dict[bytes, bytes | None] = {}
        # The store's pending records are all confirmed on the bus by now (an unconfirmed one
        # made the store be rebuilt before anything is applied): their keys go with the first
        # batch; kept, a later reader could not tell them from unpublished commits once the
        # store follows a newer epoch, and a new owner here would publish them again.
        for key, _ in self._store.scan(PENDING_PREFIX):
            if int(key[len(PENDING_PREFIX):], 16) not in self._unconfirmed:
                merged[key] = None
        for i, record in enumerate(records):
            for key in record.deletes:
                merged[key] = None
            for key, value in record.puts.items():
                if not key.startswith(PENDING_PREFIX):
                    merged[key] = value
            if len(merged) >= _WRITE_KEYS or i == len(records) - 1:
                puts = {k: v for k, v in merged.items() if v is not None}
                puts.update(head_entries(record.head))
                deletes = [k for k, v in merged.items() if v is None]
                self._store.write(puts, deletes, sync=False)
                if self._engine is not None and (record.base or not self._engine.mirror(
                        puts, deletes)):
                    self._engine = None  # a snapshot replaced the store, or timers: load again
                # Here, not after the await: a cancelled caller still sees what was written.
                self.head = record.head
                merged = {}
        self.applied += len(records)

    def _wipe(self) -> None:
        self._engine = None
        wipe_store(self._store)
        self.head = Head(0, 0)

    async def _reset(self) -> None:
        """Empty the store and read the changelog again from its start."""
        self.rebuilds += 1
        await _shielded(asyncio.to_thread(self._wipe))
        self._read.clear()
        self._assembler = Assembler()
        self._diverged = False
        self._unconfirmed.clear()

    async def sync(self) -> None:
        """fsync the store (before it is used as an owner's)."""
        await asyncio.to_thread(self._store.write, {}, (), sync=True)


def _pending_epochs(store: StateStore) -> dict[int, int]:
    """The store's pending records (blocking): ``seq`` -> the epoch written in the record
    (``-1`` when it cannot be read: such a record is never taken as confirmed)."""
    pending: dict[int, int] = {}
    for key, value in store.scan(PENDING_PREFIX):
        try:
            epoch = int(orjson.loads(value.split(b"\n", 1)[0])["e"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            epoch = -1
        pending[int(key[len(PENDING_PREFIX):], 16)] = epoch
    return pending


async def _shielded(work: Awaitable[_T]) -> _T:
    """Await ``work`` (a store write in a thread); a cancel waits for it to end first, so
    that the store and the follower's idea of it agree."""
    future = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise

