"""State on the bus: one partition's commits published to its changelog category, and the
restore of a lost store from it (``ProcessorConfig(changelog=True)``).

Each commit's write batch (state, dedup IDs, positions, outbox, timers: the store's own keys)
becomes a changelog record (:mod:`chukcha.state.changelog`) with the partition's next ``seq``.
The record is kept in the same write batch under ``c/<seq>`` (so a crash between the commit and
its publication loses nothing: the next start publishes it), and published to the category
``<app>.changelog.p<NNNN>`` (``min_sync_replicas`` configurable) before the checkpoint acks any
input past that commit; once confirmed, its ``c/`` key is deleted with the next commit. Only
fsync'ed commits are published, so the bus never holds a commit that the local store could
lose and then redo differently.

A partition whose local store is empty at start (a new machine, a deleted state directory) is
restored first: every record on the bus (read from every node the app knows, so that a record
not yet replicated somewhere is still found) is replayed in ``seq`` order into the store, which
then resumes at the positions recorded there: nothing acknowledged is lost with the disk.

Every ``snapshot_every`` commits (``ProcessorConfig.snapshot_every``) the partition also
publishes a **snapshot**: every key of its store right after the last published commit (taken
while nothing else writes to that store: the checkpoint is its only writer and waits), as one
record marked ``base``. Once the snapshot is confirmed, the changelog chunks that were complete
before it was written hold only older records: they are acked (deleted on every node), so the
changelog and a restore's replay stay bounded by one snapshot plus ``snapshot_every`` records.
An owner through etcd (``fenced``) acks them with its claim's ``(partition, epoch)``: a former
owner's snapshot (a paused owner's resumed batch) is ignored by readers, and the node refuses
its acks, which would delete the new owner's records (:attr:`Changelog.acks_refused`).

**Epochs.** Records carry the epoch of the writer's ownership: the etcd revision of its claim
for instances through etcd (:mod:`chukcha.processors.group`), else the epoch of the last record
the store holds (``0`` for a new one: one instance, or a static split, never changes it). A
writer whose epoch is newer than the store's last record links its records to that record
(:attr:`~chukcha.state.changelog.Record.link`): the store's position is kept under
:data:`HEAD_KEY` with every commit and restore, so a new owner's records say which records it
built on, and a reader (:func:`~chukcha.state.changelog.plan_replay`) ignores a former owner's
records that came later, however late they reach the bus.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final, Protocol, runtime_checkable

from chukcha.bus.tasks import run_to_end
from chukcha.errors import ClientError, RemoteNotFoundError, RequestRejectedError
from chukcha.partitioning import partition_category
from chukcha.processors.engine import CommitPlan
from chukcha.protocol import ChunkInfo
from chukcha.state.base import StateStore
from chukcha.state.changelog import Assembler, Head, Record, encode_record, plan_replay

__all__ = ["HEAD_KEY", "PENDING_PREFIX", "SEQ_KEY", "Changelog", "ChangelogBus",
           "NodeReader", "NotEnoughNodes", "QuorumRetry", "changelog_category", "head_entries",
           "nodes_needed", "read_head"]

logger = logging.getLogger(__name__)

PENDING_PREFIX: Final = b"c/"
"""Records committed but not yet confirmed on the bus: ``c/<seq:016x>`` -> lines."""
SEQ_KEY: Final = b"cseq"
"""The partition's last committed changelog ``seq`` (decimal)."""
HEAD_KEY: Final = b"chead"
"""The epoch of the record at ``seq`` and that epoch's link: ``b"<epoch>"`` or
``b"<epoch> <link epoch> <link seq>"`` (absent in a store of the previous release)."""
_RESTORE_BATCH: Final = 200_000  # keys per write batch of a restore
_READ_BYTES: Final = 4 << 20


def nodes_needed(nodes: int, min_sync_replicas: int) -> int:
    """How many of the app's ``nodes`` must answer a read of a changelog so that every
    confirmed record is seen: a record confirmed with ``min_sync_replicas`` is on at least
    ``min_sync_replicas + 1`` nodes, so any ``nodes - min_sync_replicas`` of them hold it
    (``min_sync_replicas=0``: every node; the last records may be on one node only)."""
    return max(1, nodes - min_sync_replicas)


class NotEnoughNodes(ClientError):
    """Fewer nodes answered a read of a changelog than a takeover or a restore needs
    (:func:`nodes_needed`): the missing ones may hold its last confirmed records."""

    def __init__(self, category: str, needed: int, nodes: int,
                 missing: dict[str, str]) -> None:
        super().__init__(
            f"reading {category!r} needs answers from {needed} of the app's {nodes} node(s) "
            f"(changelog_min_sync_replicas={nodes - needed}) so that no confirmed record is "
            f"missed; {nodes - len(missing)} answered; missing: "
            + "; ".join(f"{url} ({why})" for url, why in missing.items()))
        self.missing = missing


class QuorumRetry:
    """The backoff (``first`` s, doubling up to ``most`` s) and the log lines of a takeover or
    a restore waiting for enough nodes: a warning when the missing nodes change, and at least
    every ``every`` s while they stay missing."""

    def __init__(self, what: str, *, first: float = 0.2, most: float = 5.0,
                 every: float = 30.0) -> None:
        self._what = what
        self._delay = first
        self._most = most
        self._every = every
        self._started = time.monotonic()
        self._logged: tuple[float, frozenset[str]] | None = None

    async def wait(self, exc: NotEnoughNodes) -> None:
        now = time.monotonic()
        missing = frozenset(exc.missing)
        if self._logged is None or self._logged[1] != missing or \
                now - self._logged[0] >= self._every:
            logger.warning("%s waits for nodes (%.1f s so far, retrying): %s", self._what,
                           now - self._started, exc)
            self._logged = (now, missing)
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * 2, self._most)

    def done(self) -> None:
        """Log that the nodes answered, if waiting was logged."""
        if self._logged is not None:
            logger.info("%s: enough nodes answered after %.1f s", self._what,
                           time.monotonic() - self._started)


def read_head(store: StateStore) -> Head | None:
    """Where ``store`` stands in its changelog (blocking): ``None`` for a store whose last
    record's epoch is not known (written by the previous release); ``Head(0, 0)`` for a new
    one."""
    raw = store.get(SEQ_KEY)
    seq = int(raw) if raw else 0
    head = store.get(HEAD_KEY)
    if head is None:
        return Head(0, 0) if seq == 0 else None
    parts = [int(x) for x in head.split()]
    return Head(parts[0], seq, (parts[1], parts[2]) if len(parts) == 3 else None)


def _head_value(epoch: int, link: tuple[int, int] | None) -> bytes:
    return b"%d" % epoch if link is None else b"%d %d %d" % (epoch, *link)


def head_entries(head: Head) -> dict[bytes, bytes]:
    """The store keys that say it stands at ``head`` (written with the records applied)."""
    return {SEQ_KEY: str(head.seq).encode(), HEAD_KEY: _head_value(head.epoch, head.link)}


def changelog_category(app: str, partition: int) -> str:
    """The category of partition ``partition``'s changelog: ``<app>.changelog.p<NNNN>``."""
    return partition_category(f"{app}.changelog", partition)


class ChangelogBus(Protocol):
    """Where changelog records go and come from (the runner's client)."""

    async def publish(self, category: str, lines: list[bytes]) -> None:
        """Write ``lines`` to ``category``; return once confirmed (raise to be retried)."""
        ...

    async def read_all(self, category: str) -> list[bytes]:
        """Every message of ``category`` now on the bus (from every node that answers; a
        bus that is also a :class:`NodeReader` is read node by node instead)."""
        ...

    async def complete_chunks(self, category: str) -> list[tuple[str, int]]:
        """The complete chunks of ``category`` (name, size) on a node that answers."""
        ...

    async def ack_chunk(self, category: str, chunk: str, size: int, *,
                        fence: tuple[int, int] | None = None) -> None:
        """Ack (delete) one chunk of ``category`` on the cluster; with ``fence`` =
        ``(partition, epoch)`` only while the app's claim of that partition has that epoch
        (raise when refused)."""
        ...


@runtime_checkable
class NodeReader(Protocol):
    """A :class:`ChangelogBus` that reads each node on its own (the runner's): a restore
    through it checks that enough nodes answered (:func:`nodes_needed`)."""

    @property
    def nodes(self) -> list[str]:
        """Every node the app knows."""
        ...

    async def chunks_on(self, url: str, category: str) -> list[ChunkInfo]:
        """``/listChunks`` of ``category`` on node ``url``."""
        ...

    async def read_on(self, url: str, category: str, chunk: str, offset: int,
                      max_size: int) -> bytes:
        """``/read`` on node ``url``."""
        ...


class Changelog:
    """The changelog of one partition (see the module docstring)."""

    def __init__(self, app: str, partition: int, bus: ChangelogBus, *, epoch: int = 0,
                 snapshot_every: int = 0, fenced: bool = False,
                 min_sync_replicas: int = 0) -> None:
        self.category = changelog_category(app, partition)
        self.partition = partition
        self.epoch = epoch
        """The epoch of this writer's records (``0``: the epoch of the store's last record)."""
        self.fenced = fenced
        """``epoch`` is an etcd claim's: the snapshot's acks carry ``(partition, epoch)``."""
        self.link: tuple[int, int] | None = None
        """The link of this writer's records (set by :meth:`load`)."""
        self._bus = bus
        self._min_sync_replicas = min_sync_replicas
        self._snapshot_every = snapshot_every
        self._snapshot_seq = 0
        self._store: StateStore | None = None
        self.snapshots = 0
        self.acks_refused = 0
        """Snapshots whose changelog acks the node refused (fenced: the claim moved)."""
        self.seq = 0
        self._pending: list[tuple[bytes, list[bytes]]] = []  # committed, not confirmed
        self._confirmed: list[bytes] = []  # c/ keys to delete with the next commit
        self._staged: tuple[bytes, list[bytes]] | None = None
        self.published = 0
        self.restored_records = 0

    @property
    def unpublished(self) -> bool:
        return bool(self._pending)

    @property
    def pending_records(self) -> int:
        """Committed records not confirmed on the bus yet (the app's metrics show it)."""
        return len(self._pending)

    # --- start ---------------------------------------------------------------------------

    async def restore_if_empty(self, store: StateStore) -> None:
        """Rebuild an empty store from the bus (a store with anything in it is left alone).
        The changelog is read from every node the app knows; until enough of them answer
        (:func:`nodes_needed`) it waits and retries, logging which nodes are missing: a
        restore from fewer nodes could miss the last confirmed records, and the next
        ownership would link its records to an older head (those records lost)."""
        if await asyncio.to_thread(_has_any_key, store):
            return
        started = time.monotonic()
        assembler = await self._read_for_restore()
        keys = 0
        merged: dict[bytes, bytes | None] = {}  # None: deleted (later records win)
        head = Head(0, 0)
        for record in plan_replay(assembler.records()).records:
            for key in record.deletes:
                merged[key] = None
            for key, value in record.puts.items():
                if not key.startswith(PENDING_PREFIX):
                    merged[key] = value
            head = record.head
            self.restored_records += 1
            if len(merged) >= _RESTORE_BATCH:
                keys += await _write_merged(store, merged, head)
                merged = {}
        if merged:
            keys += await _write_merged(store, merged, head)
        if self.restored_records:
            await asyncio.to_thread(store.write, {}, (), sync=True)
            took = time.monotonic() - started
            logger.info("category=%s restored partition %d from the bus: %d records, %d keys "
                        "in %.2f s (%.0f keys/s)%s", self.category, self.partition,
                        self.restored_records, keys, took, keys / max(took, 1e-9),
                        f"; {assembler.incomplete} incomplete record(s) left out"
                        if assembler.incomplete else "")

    async def _read_for_restore(self) -> Assembler:
        bus = self._bus
        if not isinstance(bus, NodeReader):  # a stand-in of the tests or benchmarks
            assembler = Assembler()
            for line in await bus.read_all(self.category):
                assembler.add(line)
            return assembler
        retry = QuorumRetry(f"category={self.category} restore of partition {self.partition}")
        while True:
            try:
                assembler = await self._read_every_node(bus)
            except NotEnoughNodes as exc:
                await retry.wait(exc)
            else:
                retry.done()
                return assembler

    async def _read_every_node(self, bus: NodeReader) -> Assembler:
        """Every record line of the changelog on every node that answers (a record that has
        not replicated everywhere yet is still found).

        Raises:
            NotEnoughNodes: fewer nodes answered than :func:`nodes_needed`.
        """
        assembler = Assembler()
        nodes = bus.nodes
        missing: dict[str, str] = {}
        for url in nodes:
            try:
                for info in await bus.chunks_on(url, self.category):
                    off = 0
                    while True:
                        try:
                            data = await bus.read_on(url, self.category, info.name, off,
                                                           _READ_BYTES)
                        except RemoteNotFoundError:
                            break  # acked (deleted) since it was listed: older records only
                        if not data:
                            break
                        off += len(data)
                        for line in data[:-1].split(b"\n") if data.endswith(b"\n") \
                                else data.split(b"\n"):
                            assembler.add(line)
            except ClientError as exc:
                missing[url] = str(exc) or type(exc).__name__
        needed = nodes_needed(len(nodes), self._min_sync_replicas)
        if len(nodes) - len(missing) < needed:
            raise NotEnoughNodes(self.category, needed, len(nodes), missing)
        return assembler

    def load(self, store: StateStore) -> None:
        """Read the last ``seq``, the epoch link and the unpublished records (blocking)."""
        raw = store.get(SEQ_KEY)
        self.seq = int(raw) if raw else 0
        head = read_head(store)
        if head is None:  # a store of the previous release: no link can be named
            self.link = None
        else:
            if self.epoch == 0:
                self.epoch = head.epoch  # no etcd: the store's epoch goes on
            if self.epoch == head.epoch:
                self.link = head.link  # the same ownership goes on (its link, if any)
            elif self.epoch > head.epoch:
                self.link = (head.epoch, head.seq)  # a new epoch builds on the store's head
            else:
                self.link = None
                logger.warning(
                    "category=%s partition %d: the claim's epoch %d is older than the epoch %d "
                    "of the store's last record (was etcd reset?): readers of the changelog "
                    "will not replay this partition's new records", self.category,
                    self.partition, self.epoch, head.epoch)
        self._store = store
        self._snapshot_seq = self.seq
        self._pending = [(key, value.split(b"\n"))
                         for key, value in store.scan(PENDING_PREFIX)]

    # --- a commit ------------------------------------------------------------------------

    def stage(self, plan: CommitPlan) -> tuple[dict[bytes, bytes], list[bytes]]:
        """The extra puts and deletes that make ``plan``'s record part of its write batch."""
        seq = self.seq + 1
        lines = encode_record(Record(self.partition, self.epoch, seq, plan.puts,
                                     list(plan.deletes), link=self.link))
        key = PENDING_PREFIX + b"%016x" % seq
        self._staged = (key, lines)
        puts = {key: b"\n".join(lines), SEQ_KEY: str(seq).encode(),
                HEAD_KEY: _head_value(self.epoch, self.link)}
        deletes, self._confirmed = self._confirmed, []
        return puts, deletes

    def committed(self) -> None:
        if self._staged is not None:
            self._pending.append(self._staged)
            self._staged = None
            self.seq += 1

    def discard(self, deletes: list[bytes]) -> None:
        """The write failed: nothing of ``stage`` happened (``deletes`` are due again)."""
        self._staged = None
        self._confirmed = deletes + self._confirmed

    async def publish(self) -> None:
        """Publish every committed record not confirmed yet, oldest first (raises to be
        retried; what was confirmed stays confirmed)."""
        while self._pending:
            key, lines = self._pending[0]
            await self._bus.publish(self.category, lines)
            self._pending.pop(0)
            self._confirmed.append(key)
            self.published += 1
        every = self._snapshot_every
        if every and self.seq - self._snapshot_seq >= every:
            await self._snapshot()

    async def _snapshot(self) -> None:
        """Publish the whole store as of ``self.seq`` (every record is published), then ack the
        changelog chunks that were complete before (they hold only older records)."""
        store = self._store
        if store is None:
            return
        seq = self.seq
        before = await self._bus.complete_chunks(self.category)
        items = await asyncio.to_thread(_store_items, store)
        lines = encode_record(Record(self.partition, self.epoch, seq, items, base=True,
                                     link=self.link))
        await self._bus.publish(self.category, lines)
        self._snapshot_seq = seq
        self.snapshots += 1
        acked = 0
        for chunk, size in before:
            try:
                await self._bus.ack_chunk(
                    self.category, chunk, size,
                    fence=(self.partition, self.epoch) if self.fenced else None)
            except RequestRejectedError as exc:
                if self.fenced:  # the claim moved on: this writer owns nothing any more
                    self.acks_refused += 1
                    logger.warning("category=%s changelog ack refused, partition %d moved "
                                   "(epoch %d): %s", self.category, self.partition,
                                   self.epoch, exc)
                    break
                logger.info("category=%s changelog chunk %s not acked: %s", self.category,
                            chunk, exc)
            except Exception as exc:  # noqa: BLE001 - not fatal: the next snapshot acks it
                logger.info("category=%s changelog chunk %s not acked yet: %s", self.category,
                            chunk, exc)
            else:
                acked += 1
        logger.info("category=%s snapshot of partition %d at seq %d: %d keys in %d lines; "
                    "acked %d older changelog chunk(s)", self.category, self.partition, seq,
                    len(items), len(lines), acked)


async def _write_merged(store: StateStore, merged: dict[bytes, bytes | None], head: Head) -> int:
    """Write the net effect of consecutive records (one write batch, not fsync'ed yet)."""
    puts = {k: v for k, v in merged.items() if v is not None}
    deletes = [k for k, v in merged.items() if v is None]
    puts.update(head_entries(head))
    # A cancelled restore (its take-over abandoned) waits for the write: the store then ends
    # on a record's head, a consistent copy the next take-over brings current.
    await run_to_end(asyncio.to_thread(store.write, puts, deletes, sync=False))
    return len(puts) + len(deletes)


def _store_items(store: StateStore) -> dict[bytes, bytes]:
    """Every key of ``store`` but the changelog's own bookkeeping."""
    return {k: v for k, v in store.scan(b"")
            if not k.startswith(PENDING_PREFIX) and k not in (SEQ_KEY, HEAD_KEY)}


def _has_any_key(store: StateStore) -> bool:
    return next(iter(store.scan(b"")), None) is not None
