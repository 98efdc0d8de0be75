"""An app's partitions in one process: an engine and a checkpoint per partition, and the
routing of each event to the partition of its key.

Every partition keeps its own read position of every input stream it has seen, committed with
its state. A batch of a stream is decoded once, each event goes to the engine of
``partition_of(key)``, and every partition stages the stream's new position (also one that got
no event of the batch), so all of them move on together. Each partition then commits through
its own :class:`~chukcha.processors.checkpoint.Checkpoint` (concurrently; the commits of two
partitions are not atomic together, and need not be):

- a restart resumes each stream at the lowest position any partition committed
  (:meth:`PartitionSet.resume_positions`); a partition that committed further skips the events
  it applied by their IDs (its dedup index), so an event is applied exactly once in its
  partition wherever the crash fell;
- input is acked only before the lowest committed (and fsync'ed) position of all partitions
  (:meth:`PartitionSet.ack_positions`).

The runner and the tester both drive a :class:`PartitionSet`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from chukcha.partitioning import partition_dir_name
from chukcha.processors.changelog import Changelog, ChangelogBus
from chukcha.processors.checkpoint import Checkpoint, CheckpointIO, OwnershipUnproven
from chukcha.processors.decoding import Decoded, decode_batch
from chukcha.processors.engine import Engine

if TYPE_CHECKING:
    from chukcha.processors.base import App
    from chukcha.state.base import StateStore

__all__ = ["PartitionSet", "raise_single"]

logger = logging.getLogger(__name__)

_blake2b = hashlib.blake2b


def raise_single(group: BaseExceptionGroup[BaseException]) -> None:
    """Raise the one error of ``group`` as it is (what a caller wants to see), else the group."""
    errors = group.exceptions
    if len(errors) == 1 and isinstance(errors[0], Exception):
        raise errors[0] from None
    raise group


class PartitionSet:
    """The engines and checkpoints of ``app``'s partitions over ``stores`` (one per partition,
    in partition order). ``owned``: the partitions this process runs (default: all); the
    others are never touched (their events are skipped, their stores neither read nor
    written), so another instance can run them (:mod:`chukcha.processors.split`)."""

    def __init__(self, app: App, stores: Sequence[StateStore], io: CheckpointIO, *,
                 owned: Collection[int] | None = None,
                 changelog_bus: ChangelogBus | None = None) -> None:
        if len(stores) != app.partitions:
            raise ValueError(f"app {app.name!r} has {app.partitions} partitions, "
                             f"got {len(stores)} stores")
        self.app = app
        self._stores = list(stores)
        self._io = io
        self._changelog_bus = changelog_bus
        self.engines = [Engine(app, store, partition=i) for i, store in enumerate(stores)]
        self.checkpoints = [self._checkpoint(i, engine) for i, engine in enumerate(self.engines)]
        self.owned: list[int] = []
        self._mine: list[Checkpoint] = []
        self._all = False
        self.stream_partition: dict[str, int] = {}
        """Streams that hold one partition's events only (a partitioned input read by the
        instances of an app through etcd): their batches go to that partition alone."""
        self.set_owned(range(len(stores)) if owned is None else owned)

    def _checkpoint(self, i: int, engine: Engine, epoch: int = 0) -> Checkpoint:
        app, bus = self.app, self._changelog_bus
        return Checkpoint(
            engine, self._stores[i], self._io, app.config,
            name=app.name if len(self._stores) == 1 else f"{app.name}/{partition_dir_name(i)}",
            changelog=Changelog(app.name, i, bus, epoch=epoch,
                                snapshot_every=app.config.snapshot_every,
                                fenced=epoch != 0,
                                min_sync_replicas=app.config.changelog_min_sync_replicas)
            if bus is not None and app.config.changelog else None)

    def set_owned(self, owned: Collection[int]) -> None:
        """The partitions this process runs from now on (empty: none yet, see :meth:`take`)."""
        n = len(self._stores)
        self.owned = sorted(set(owned))
        if not set(self.owned) <= set(range(n)):
            raise ValueError(f"owned partitions {self.owned} are not a subset of 0..{n - 1}")
        self._mine = [self.checkpoints[i] for i in self.owned]
        self._all = len(self.owned) == n

    def owned_checkpoints(self) -> Mapping[int, Checkpoint]:
        """The checkpoints of the partitions run now, as a live view (through etcd they
        change as partitions move): what the app's ``/metrics`` and ``/ui`` read."""
        return _OwnedCheckpoints(self)

    def take(self, partition: int, epoch: int) -> Checkpoint:
        """Run ``partition`` from now on with a fresh engine and checkpoint (its changelog
        records carry ``epoch``); the caller loads it (:meth:`Checkpoint.load`)."""
        return self.install(self.prepare(partition, epoch))

    def prepare(self, partition: int, epoch: int, engine: Engine | None = None) -> Checkpoint:
        """A checkpoint for ``partition`` (records carrying ``epoch``) over ``engine`` (default:
        a fresh one), not run yet: the caller loads it (:meth:`Checkpoint.load`, which touches
        only that partition's store, so it needs no lock while the partition is not owned),
        then :meth:`install` s it."""
        if engine is None:
            engine = self.new_engine(partition)
        return self._checkpoint(partition, engine, epoch)

    def new_engine(self, partition: int) -> Engine:
        """A fresh (not loaded) engine over ``partition``'s store, with the app's views."""
        engine = Engine(self.app, self._stores[partition], partition=partition)
        engine.ctx.views = self.engines[partition].ctx.views  # the app's views (runner's)
        return engine

    def install(self, checkpoint: Checkpoint) -> Checkpoint:
        """Run the partition of ``checkpoint`` (from :meth:`prepare`) from now on."""
        partition = checkpoint.engine.partition
        self.engines[partition] = checkpoint.engine
        self.checkpoints[partition] = checkpoint
        self.set_owned({*self.owned, partition})
        return checkpoint

    def drop(self, partition: int) -> None:
        """Stop running ``partition`` (its staged changes are dropped)."""
        self.engines[partition].discard()
        self.set_owned(set(self.owned) - {partition})
        for stream in [s for s, p in self.stream_partition.items() if p == partition]:
            del self.stream_partition[stream]

    async def load(self) -> None:
        for checkpoint in self._mine:
            await checkpoint.load()

    async def process(self, category: str, owner: str, chunk: str, offset: int,
                      data: bytes, *, handler: str | None = None) -> None:
        """Apply one batch of one stream of ``category`` (read for the processor of
        ``handler``, by default ``category``), each event in its key's partition.

        Raises:
            ProcessorError: a callback raised under the ``stop`` policy (call :meth:`discard`).
        """
        engines = self.engines
        n = len(engines)
        if n == 1:
            await engines[0].process(category, owner, chunk, offset, data, handler=handler)
            return
        only = self.stream_partition.get(category)
        if only is not None:
            # One partition's stream: its events hash to it (the producer routed them).
            await engines[only].process(category, owner, chunk, offset, data, handler=handler)
            return
        items, end = decode_batch(self.app, category, chunk, offset, data, handler=handler)
        parts: list[list[Decoded]] = [[] for _ in range(n)]
        blake2b = _blake2b
        for item in items:
            digest = blake2b(item[4].encode(), digest_size=8).digest()  # = partition_of
            parts[int.from_bytes(digest, "big") % n].append(item)
        if self._all:
            for engine, part in zip(engines, parts, strict=True):
                await engine.apply(category, owner, chunk, part, end, handler=handler)
            return
        for i in self.owned:
            await engines[i].apply(category, owner, chunk, parts[i], end, handler=handler)

    def note_streams(self, category: str, owners: frozenset[str]) -> None:
        """The owner streams the consumer of ``category`` knows (listed), read or not yet."""
        for engine in self.engines:
            engine.listed_streams[category] = owners

    async def fire_timers(self, now: float) -> int:
        """Run every partition's timers due at ``now`` (staged; :meth:`commit` commits them).

        Raises:
            ProcessorError: a timer raised under the ``stop`` policy (call :meth:`discard`).
        """
        ran = 0
        for i in self.owned:  # another instance runs the others' (they move with them)
            ran += await self.engines[i].fire_timers(now)
        return ran

    def next_timer(self) -> float | None:
        """When the earliest committed timer of an owned partition is due (``None``: no
        timers)."""
        times = [t for i in self.owned if (t := self.engines[i].timers.next_due()) is not None]
        return min(times) if times else None

    async def commit(self) -> None:
        """Commit every partition that staged something (each through its checkpoint)."""
        due = [c for c in self._mine if c.engine.has_staged]
        if len(due) == 1:
            await due[0].commit()
            return
        try:
            async with asyncio.TaskGroup() as tg:
                for checkpoint in due:
                    tg.create_task(checkpoint.commit(), name=f"commit-{checkpoint.name}")
        except BaseExceptionGroup as group:
            # Partitions whose ownership cannot be proven are being stopped (their loops end
            # quietly on it); any other error is what the caller must see.
            unproven, rest = group.split(OwnershipUnproven)
            if rest is not None:
                raise_single(rest)
            if unproven is not None:
                raise unproven.exceptions[0] from None
            raise

    async def idle(self) -> None:
        """Nothing new: fsync what is pending, else ack what is due (once, for all)."""
        pending = [c for c in self._mine if c.unsynced]
        for checkpoint in pending:
            await checkpoint.sync()
        if not pending and self._mine:
            await self._mine[0].idle()

    async def send_outbox(self) -> None:
        for checkpoint in self._mine:
            await checkpoint.send_outbox()

    async def finish(self) -> None:
        for checkpoint in self._mine:
            await checkpoint.finish()

    def discard(self) -> None:
        """Drop what every partition staged since its last commit."""
        for i in self.owned:
            self.engines[i].discard()

    @property
    def synced(self) -> bool:
        """No partition has a commit waiting for its fsync, or for its changelog record to be
        confirmed on the bus: acks based on every partition's positions may go out."""
        return not any(c.unsynced or (c.changelog is not None and c.changelog.unpublished)
                       for c in self._mine)

    def resume_positions(self, category: str) -> dict[str, tuple[str, int]]:
        """Where to read ``category`` from: per owner stream, the lowest committed position of
        all partitions (an owner some partition has no position for is read from its start)."""
        return self._lowest(category)

    def ack_positions(self, category: str) -> dict[str, tuple[str, int]]:
        """What may be acked of ``category``: before the lowest committed position of all
        partitions, per owner stream."""
        return self._lowest(category)

    def _lowest(self, category: str) -> dict[str, tuple[str, int]]:
        only = self.stream_partition.get(category)
        engines = [self.engines[i] for i in ([only] if only is not None else self.owned)]
        if not engines:
            return {}
        first = engines[0].positions.get(category, {})
        if len(engines) == 1:
            return dict(first)
        lowest: dict[str, tuple[str, int]] = {}
        for owner, pos in first.items():
            low = pos
            for engine in engines[1:]:
                other = engine.positions.get(category, {}).get(owner)
                if other is None:
                    break
                low = min(low, other)
            else:
                lowest[owner] = low
        return lowest


class _OwnedCheckpoints(Mapping[int, Checkpoint]):
    """:meth:`PartitionSet.owned_checkpoints`."""

    def __init__(self, parts: PartitionSet) -> None:
        self._parts = parts

    def __getitem__(self, partition: int) -> Checkpoint:
        if partition not in self._parts.owned:
            raise KeyError(partition)
        return self._parts.checkpoints[partition]

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._parts.owned))

    def __len__(self) -> int:
        return len(self._parts.owned)
