"""Instances of an app through etcd: ``chukcha run module:app --etcd URL --cluster NAME``.

Every instance registers in etcd and claims its share of the app's partitions
(:class:`~chukcha.bus.app_coordination.AppInstances`); this module runs what it owns:

- **Assigned** partition ``p`` with ``epoch``: its local store is brought to the bus's latest
  state of ``p`` (:mod:`chukcha.processors.follower`): an empty one is restored (the latest
  snapshot + the records after it); a copy from an earlier ownership is used as it is when it
  holds the changelog's last record, replays only the records after it when they continue its
  history, and is rebuilt otherwise (another instance ran ``p`` meanwhile and the histories
  went apart, or it holds commits never confirmed on the bus); a copy last run here at the
  same epoch (the lease survived an etcd outage: nobody else ran it) is kept. Then the consumers of
  ``p``'s input partitions start at the positions restored there, as the app's group, with
  acks fenced by ``(p, epoch)``: a node refuses them once another instance holds ``p``.
- **Revoking** ``p`` (rebalancing, SIGTERM): its loops finish their batch, the partition
  commits, publishes its changelog and acks, then the claim is released; the new owner starts
  only after that.
- **Lost** ``p`` (the lease could not be renewed in time, or the claim changed): its loops
  stop once their batch is done; what they still commit is committed locally. Before each
  changelog publication and each emit the checkpoint proves the ownership (the lease renewed
  within its TTL), so a resumed former owner usually sends nothing of that batch; but a
  process paused between that proof and the send still publishes its records (and a
  snapshot, if the commit crosses ``snapshot_every``) at the old epoch, and its emits. What
  protects the new owner then: readers of the changelog follow the chain of epoch links, so
  those late records and snapshots are ignored; every ack the lost partition makes, of its
  input and of its changelog chunks after a snapshot, carries ``(p, epoch)`` and the node
  refuses it once the claim has another epoch (so nothing of the new owner's input or
  changelog is deleted; a node also refuses unfenced acks of an app that holds claims); its
  emits carry the IDs the new owner derives (the next hop keeps one per ID). The local copy
  is thrown away when the partition comes back at another epoch (kept, and published, when it
  comes back at the same one).

Requirements (checked at start, with a clear error): the changelog is on
(``ProcessorConfig(changelog=True)``: a partition's state must be on the bus to move).

An input partitioned on the bus with the app's partition count (``chukcha partitions C N``;
produced with ``Client.send(..., key=)``) is read partition by partition by each partition's
owner. Any other input goes through the repartition hop
(:mod:`chukcha.processors.repartition`) into the app's own partitioned category, which is
read the same way; the hop runs on the instance that owns partition 0, started and stopped
with that partition (one copy at a time; it moves with the claim). A paused former owner's hop
can still write copies (the keyed stage's dedup drops them) and ack input it has copied
(never more): nothing is lost or added.

Timers and views work as with one instance: a partition's timers are part of its state (its
store, its changelog), so they move with the partition and run where it is owned now (the
runner's timer loop fires the owned partitions' timers only); a view follows another app's
changelog and is owned by nobody, so every instance runs its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chukcha.bus.app_coordination import AppInstances
from chukcha.bus.coordination import DEFAULT_LEASE_TTL
from chukcha.client import Client
from chukcha.client.consumer import Consumer, Position
from chukcha.errors import AppConfigError
from chukcha.processors.changelog import changelog_category
from chukcha.processors.checkpoint import OwnershipUnproven
from chukcha.processors.follower import FollowBus, Follower, local_copy
from chukcha.processors.partitions import PartitionSet
from chukcha.state.base import StateStore

if TYPE_CHECKING:
    from chukcha.processors.base import App
    from chukcha.processors.engine import Engine

__all__ = ["GroupConfig", "GroupMode", "PartitionLoop", "check_group_app",
           "default_instance_name"]

logger = logging.getLogger(__name__)

ConsumeLoop = Callable[[str, Consumer, asyncio.Event], Coroutine[Any, Any, None]]
PartitionLoop = Callable[[asyncio.Event, int], Coroutine[Any, Any, None]]
"""A loop run while a partition is owned: ``loop(stop, epoch)`` (its acks fenced by it)."""


@dataclass(frozen=True, slots=True)
class GroupConfig:
    """How an instance joins its app's group through etcd.

    Attributes:
        etcd: etcd endpoints (``http://host:port``).
        cluster: the cluster name (etcd prefix ``chukcha/<cluster>/``; the nodes' too).
        instance: this instance's name, stable across restarts (default: host name and a hash
            of the state directory, :func:`default_instance_name`).
        lease_ttl: seconds after which a killed instance's partitions are taken over.
        standbys: standby instances per partition (``None``: the app's
            ``ProcessorConfig.standbys``); each follows the partition's changelog so that a
            failover applies only the tail.
    """

    etcd: tuple[str, ...]
    cluster: str = "default"
    instance: str | None = None
    lease_ttl: int = DEFAULT_LEASE_TTL
    standbys: int | None = None

    def __post_init__(self) -> None:
        if not self.etcd:
            raise ValueError("instances through etcd need at least one --etcd endpoint")
        if self.lease_ttl < 1:
            raise ValueError("lease_ttl must be at least 1 s")
        if self.standbys is not None and self.standbys < 0:
            raise ValueError("standbys must be >= 0")


def default_instance_name(state_dir: Path) -> str:
    """``<host>-<8 hex digits of the state directory's absolute path>``: the same on every
    restart on this machine with this state directory."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"
    digest = hashlib.blake2b(str(Path(state_dir).resolve()).encode(), digest_size=4).hexdigest()
    return f"{host}-{digest}"


def check_group_app(app: App) -> None:
    """Refuse what instances through etcd do not support (see the module docstring)."""
    if not app.config.changelog:
        raise AppConfigError(
            f"app {app.name!r}: instances through etcd need ProcessorConfig(changelog=True) "
            "(a partition's state must be on the bus to move between instances)")


class GroupMode:
    """Runs the partitions etcd gives this instance (a
    :class:`~chukcha.bus.app_coordination.PartitionListener`)."""

    def __init__(self, app: App, config: GroupConfig, *, parts: PartitionSet,
                 stores: list[StateStore], client: Client, lock: asyncio.Lock,
                 consumers: dict[str, Consumer], streams: Mapping[int, list[str]],
                 consume_loop: ConsumeLoop, bus: FollowBus,
                 with_partition: Mapping[int, list[PartitionLoop]] | None = None) -> None:
        self.app = app
        self.config = config
        self._parts = parts
        self._stores = stores
        self._client = client
        self._lock = lock
        self._consumers = consumers
        self._streams = streams
        self._consume_loop = consume_loop
        self._bus = bus
        self._with_partition = with_partition or {}
        """Loops that run while this instance owns a partition, started and stopped with its
        consumers (the repartition hop: with partition 0)."""
        self._stops: dict[int, asyncio.Event] = {}
        self._tasks: dict[int, list[asyncio.Task[None]]] = {}
        self._crashed: asyncio.Future[BaseException] | None = None
        self._held: dict[int, int] = {}  # partition -> the epoch its local store was last run at
        self._followers: dict[int, tuple[Follower, asyncio.Task[None]]] = {}  # standby of
        self._instances: AppInstances | None = None
        self.standbys = (config.standbys if config.standbys is not None
                         else app.config.standbys)
        self.instance = config.instance or default_instance_name(app.state_dir)

    async def run(self, stop: asyncio.Event) -> None:
        """Join, run what is assigned until ``stop``, then hand everything over and leave."""
        loop = asyncio.get_running_loop()
        self._crashed = loop.create_future()
        instances = AppInstances(self.config.etcd, self.config.cluster, self.app.name,
                                 self.instance, self.app.partitions, listener=self,
                                 lease_ttl=self.config.lease_ttl, standbys=self.standbys)
        logger.info("app=%s instance=%s joining through etcd %s cluster=%s", self.app.name,
                    self.instance, ",".join(self.config.etcd), self.config.cluster)
        self._instances = instances
        # One exit stack: stop = start reversed, each step run even when a later one raised
        # (no follower or partition loop outlives this call).
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self.follow, frozenset())  # the standby copies, last
            stack.push_async_callback(self._stop_remaining)  # what a failed hand-over left
            await instances.start()
            stack.push_async_callback(instances.stop)  # revokes (finishes, commits, acks) all
            waits: list[asyncio.Future[Any]] = [
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(instances.wait_failed()), self._crashed]
            for w in waits[:2]:
                stack.callback(w.cancel)
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in done:
            if w is not waits[0] and not w.cancelled():
                raise w.result()

    def failing(self) -> Mapping[int, int]:
        """The partitions whose start failed here and that are retried -> the failures in a
        row (none before the instance joined)."""
        return self._instances.failing() if self._instances is not None else {}

    # --- the listener --------------------------------------------------------------------

    async def assigned(self, partition: int, epoch: int) -> None:
        started = time.monotonic()
        # The store and the engine of a partition not owned yet are this task's alone: bring
        # them current and load them without the lock, so the partitions already running go
        # on meanwhile (a failover of several partitions starts the first one sooner).
        store = self._stores[partition]
        how, warm = await self._bring_current(partition, epoch, store)
        current = time.monotonic()
        self._held[partition] = epoch
        checkpoint = self._parts.prepare(partition, epoch, warm)
        # An empty store is restored from the changelog; a standby's warm engine is loaded.
        await checkpoint.load(engine_loaded=warm is not None)
        loaded = time.monotonic()
        async with self._lock:
            self._parts.install(checkpoint)
            engine = checkpoint.engine
            stop = self._stops[partition] = asyncio.Event()
            instances = self._instances
            if instances is not None:
                checkpoint.owner_proof = functools.partial(instances.prove, stop)
            tasks: list[asyncio.Task[None]] = []
            for stream in self._streams[partition]:
                self._parts.stream_partition[stream] = partition
                saved = engine.positions.get(stream, {})
                consumer = self._client.consumer(
                    stream, group=self.app.name,
                    positions={o: Position(c, off) for o, (c, off) in saved.items()},
                    max_batch_bytes=self.app.config.max_batch_bytes, fence=(partition, epoch))
                self._consumers[stream] = consumer
                task = asyncio.create_task(self._consume_loop(stream, consumer, stop),
                                           name=f"app-{self.app.name}-{stream}")
                task.add_done_callback(self._on_done)
                tasks.append(task)
            for i, loop in enumerate(self._with_partition.get(partition, ())):
                task = asyncio.create_task(loop(stop, epoch),
                                           name=f"app-{self.app.name}-p{partition}-loop{i}")
                task.add_done_callback(self._on_done)
                tasks.append(task)
            self._tasks[partition] = tasks
        logger.info("app=%s instance=%s partition %d assigned (epoch %d): %s; started in "
                    "%.2f s (current %.2f s, state %s %.2f s)", self.app.name, self.instance,
                    partition, epoch, how, time.monotonic() - started, current - started,
                    "warm" if warm is not None else "loaded", loaded - current)

    async def _bring_current(self, partition: int, epoch: int,
                             store: StateStore) -> tuple[str, Engine | None]:
        """Make the local store the bus's latest state of ``partition`` before it runs at
        ``epoch``; returns what was done (for the log) and a standby's warm engine (loaded and
        current with the store), if it has one."""
        if self._held.get(partition) == epoch:
            # The same epoch as last time here (the lease survived an etcd outage): nobody
            # else ran the partition meanwhile; the local store is its latest state (with its
            # unpublished records, published now).
            return "local copy kept (same epoch)", None
        standby = await self._stop_following(partition)
        if standby is None:
            copy = await asyncio.to_thread(local_copy, store)
            if copy.empty:
                return "restored from the bus", None
            seq = copy.head.seq if copy.head is not None else 0
        else:
            seq = standby.head.seq
        # A standby's copy, or one from an earlier ownership here: it may be current, behind
        # (replay only the records after it, if they continue its history) or diverged
        # (rebuild it).
        follower = standby or Follower(
            changelog_category(self.app.name, partition), partition, store, self._bus,
            min_sync_replicas=self.app.config.changelog_min_sync_replicas)
        rebuilds = follower.rebuilds
        applied = await follower.catch_up()
        await follower.sync()
        warm = follower.take_engine()
        what = "standby copy" if standby is not None else "local copy"
        if follower.rebuilds > rebuilds:
            return f"{what} rebuilt from the bus ({applied} records)", warm
        if applied:
            return (f"{what} brought current: {applied} record(s) after seq {seq} replayed",
                    warm)
        return f"{what} current (epoch {follower.head.epoch}, seq {follower.head.seq})", warm

    async def follow(self, partitions: frozenset[int]) -> None:
        """Be a standby of ``partitions``: follow each one's changelog into its local store
        (stopping the followers of the others; their stores stay as they are)."""
        for p in sorted(set(self._followers) - partitions):
            await self._stop_following(p)
            logger.info("app=%s instance=%s no longer a standby of partition %d",
                        self.app.name, self.instance, p)
        for p in sorted(partitions - set(self._followers) - set(self._parts.owned)):
            self._held.pop(p, None)  # what runs here now is another owner's history
            # A warm engine needs no load at a takeover; with timers the engine is loaded
            # then (a periodic timer's next run is computed when it is loaded).
            timers = bool(self.app.timers) or self.app.key_timer is not None
            follower = Follower(changelog_category(self.app.name, p), p, self._stores[p],
                                self._bus, engine=None if timers
                                else functools.partial(self._parts.new_engine, p),
                                min_sync_replicas=self.app.config.changelog_min_sync_replicas)
            task = asyncio.create_task(follower.follow(
                on_error=functools.partial(self._follow_failed, p),
                on_ready=functools.partial(self._copy_ready, p)),
                name=f"app-{self.app.name}-standby-p{p}")
            task.add_done_callback(self._on_done)
            self._followers[p] = (follower, task)
            logger.info("app=%s instance=%s standby of partition %d: following its changelog",
                        self.app.name, self.instance, p)

    def _copy_ready(self, partition: int) -> None:
        logger.info("app=%s instance=%s standby of partition %d: copy caught up",
                    self.app.name, self.instance, partition)
        if self._instances is not None:
            self._instances.standby_ready(partition)

    def _follow_failed(self, partition: int, exc: Exception) -> None:
        logger.warning("app=%s instance=%s standby of partition %d: reading its changelog "
                       "failed (retrying): %s", self.app.name, self.instance, partition, exc)

    async def _stop_following(self, partition: int) -> Follower | None:
        entry = self._followers.pop(partition, None)
        if entry is None:
            return None
        follower, task = entry
        task.cancel()
        await asyncio.wait([task])  # a store write in progress ends first (shielded)
        return follower

    async def revoking(self, partition: int) -> None:
        started = time.monotonic()
        await self._stop_loops(partition)
        async with self._lock:
            if partition in self._parts.owned:
                await self._parts.checkpoints[partition].finish()  # commit, publish, ack
            await self._close(partition)
        logger.info("app=%s instance=%s partition %d handed over in %.2f s", self.app.name,
                    self.instance, partition, time.monotonic() - started)

    async def lost(self, partition: int) -> None:
        await self._stop_loops(partition)
        async with self._lock:
            await self._close(partition)
        logger.warning("app=%s instance=%s partition %d stopped: ownership lost",
                       self.app.name, self.instance, partition)

    # --- helpers -------------------------------------------------------------------------

    async def _stop_remaining(self) -> None:
        """Stop the loops of any partition still running here (none after an orderly stop:
        the instances hand every partition over first)."""
        for p in sorted(set(self._tasks) | set(self._parts.owned)):
            logger.warning("app=%s instance=%s partition %d still running when leaving: "
                           "stopped without a hand-over", self.app.name, self.instance, p)
            await self._stop_loops(p)
            async with self._lock:
                await self._close(p)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        if isinstance(task.exception(), OwnershipUnproven):
            # Stopped as lost (logged there), not a crash of the app.
            logger.warning("%s; %s", task.exception(), task.get_name())
            return
        crashed = self._crashed
        if crashed is not None and not crashed.done():
            crashed.set_result(task.exception())  # type: ignore[arg-type]

    async def _stop_loops(self, partition: int) -> None:
        stop = self._stops.pop(partition, None)
        if stop is not None:
            stop.set()
        tasks = self._tasks.pop(partition, [])
        if tasks:
            # A loop finishes its batch (and its commit) before it sees the stop.
            await asyncio.wait(tasks, timeout=self.app.config.stop_timeout)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)

    async def _close(self, partition: int) -> None:
        for stream in self._streams[partition]:
            consumer = self._consumers.pop(stream, None)
            if consumer is not None:
                await consumer.stop()
        if partition in self._parts.owned:
            self._parts.drop(partition)

