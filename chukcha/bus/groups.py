"""Consumer groups and retention (extensions; see DESIGN.md "Consumer groups").

In the Go server an ack deletes a chunk for everyone. Here a consumer group registers for a
category (``/groups/register?category=C&group=G``); ``/ack?...&group=G`` then only records that
G is done with the chunk, and the chunk is tombstoned when *every* group registered for the
category has acked it. An ack without ``group`` keeps the Go behaviour while no group is
registered for the category: the chunk is tombstoned at once. While groups are registered, it is
an ack of the group ``default`` (:data:`DEFAULT_GROUP`), which that ack registers (cluster-wide,
like any registration), so one Go consumer cannot delete the other groups' input: the chunk goes
when every registered group, ``default`` included, has acked it. (With etcd, "no group is
registered" is checked against etcd when it answers, not only against this node's mirror.) An
ack for a named group that is not registered is refused (400), so a typo in a group name cannot
silently keep data forever or, worse, delete it early.

Retention (``/retention?category=C&max_age=SECONDS&max_bytes=BYTES``) deletes the oldest
*complete* chunks of a category, acked or not, once they are older than ``max_age`` or while the
category holds more than ``max_bytes``: Kafka-like expiry for users who want it.

Registrations, group acks, retention policies and the outbox (below) are kept in
``<data_dir>/.groups.json`` by :class:`~chukcha.bus.group_registry.GroupRegistry`; the HTTP
routes are :class:`~chukcha.bus.group_api.GroupsApi`. This module decides what acks,
registrations and retention do.

Groups are cluster-wide. A chunk's tombstone replicates to every node, so a node must not
tombstone a chunk that a group registered *anywhere* has not acked:

- **With etcd** (``--etcd``) registrations and group acks live in etcd
  (:class:`~chukcha.bus.group_coordination.EtcdGroups`:
  ``chukcha/<cluster>/groups/<category>/<group>`` and ``.../<group>/<chunk>`` = size) and every
  node watches them (its listing and its check of "is this group registered" use that mirror,
  which keeps the last known set while etcd is down).
  A node never decides from its mirror alone: after writing a group ack to etcd it reads the
  category's groups and acks from etcd (a linearizable read) and tombstones the chunk only if
  every group registered in the cluster at that moment has acked it; then it deletes the acks
  of that chunk. Unregistering re-checks the category the same way. A write that etcd cannot
  take now waits in the outbox, so while etcd is down group acks are accepted and recorded but
  nothing is tombstoned for a group ack. A group ack is written only if the group is still
  registered (one etcd transaction), an unregistration deletes the group and its acks in one
  transaction, and an ack key without its registration is ignored: a late ack from an outbox
  cannot bring an unregistered group back (which would keep its category's chunks forever).
- **With static peers** (``--peers``) the node that receives a registration, an unregistration
  or a group ack from a client records it and forwards it to every peer (``/groups/register``,
  ``/groups/unregister``, ``/groups/ack`` with ``from=<instance>``, which is not forwarded again)
  from a durable outbox: the entry is saved in the same write as the change itself and removed
  only when the peer has confirmed it, retried with backoff meanwhile, so a peer that is down
  gets it when it is back. A forwarded ack implies its group's registration (the forwards of two
  origins may arrive in any order). Each node then decides locally, as a single node does. The
  window that remains: a peer that has not received a registration yet (it was unreachable)
  does not know the group, and if every group it does know acks a chunk there, it tombstones
  the chunk, which then replicates. Register a group before its data is consumed by others, or
  use etcd.

The outbox's delivery (to etcd or to the peers) lives in :mod:`chukcha.bus.group_forwarding`.

The client still registers a group consumer on every node it knows and copies its acks to
them (belt and braces: the copy is synchronous, so another node's listing shows the ack as soon
as the commit returns); correctness no longer depends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Final

from chukcha.bus.app_coordination import app_prefix, claim_key
from chukcha.bus.chunks import ChunkStore
from chukcha.bus.config import Peer
from chukcha.bus.coordination import etcd_errors
from chukcha.bus.group_coordination import EtcdGroups
from chukcha.bus.group_forwarding import INLINE_TIMEOUT, GroupForwarder, outbox_entry
from chukcha.bus.group_registry import GROUPS_FILE, GroupRegistry, RetentionPolicy, validate_group
from chukcha.bus.http import Fence
from chukcha.bus.peers import PeerAccess
from chukcha.bus.retain import AckedRetention
from chukcha.errors import (
    BadRequestError,
    CoordinationError,
    InvalidAckError,
    StaleEpochError,
)
from chukcha.partitioning import parse_partition_category
from chukcha.protocol import parse_chunk_name, validate_category

__all__ = ["DEFAULT_GROUP", "ConsumerGroups"]

logger = logging.getLogger(__name__)

DEFAULT_GROUP: Final = "default"
"""The group of an ack without ``group`` while other groups are registered for the category."""
CHANGELOG_SUFFIX: Final = ".changelog"
"""``<app>.changelog.p<NNNN>``: a partition's changelog (``chukcha.processors.changelog``)."""


class ConsumerGroups:
    """The node's :class:`~chukcha.bus.http.AckHandler` with groups, and retention.

    Args:
        store: the node's chunk store.
        retention_interval: seconds between retention passes.
        peers: static peers (``--peers``) to forward registrations and group acks to.
        etcd: the etcd-backed groups (``--etcd``); this component starts and stops it.
        retry_interval: first pause before a failed forward (or etcd write) is retried; it
            doubles up to 2 s.
    """

    def __init__(
        self,
        store: ChunkStore,
        *,
        retention_interval: float = 10.0,
        peers: tuple[Peer, ...] = (),
        etcd: EtcdGroups | None = None,
        retry_interval: float = 0.2,
        retain: AckedRetention | None = None,
        access: PeerAccess | None = None,
    ) -> None:
        if retention_interval <= 0 or retry_interval <= 0:
            raise ValueError("retention_interval and retry_interval must be positive")
        if peers and etcd is not None:
            raise ValueError("groups are shared through etcd or static peers, not both")
        self._store = store
        self._registry = GroupRegistry(store.data_dir / GROUPS_FILE)
        self._retention_interval = retention_interval
        self._etcd = etcd
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.retain = retain or AckedRetention(store)
        """What a full acknowledgement does (``--retain-acked``: keep the chunk a while)."""
        self._forwarder = GroupForwarder(store, self._registry, self._lock, peers=peers,
                                         etcd=etcd, retry_interval=retry_interval,
                                         on_tombstoned=self._prune,
                                         tombstone=self._tombstone_replica, access=access)
        self.acks: dict[tuple[str, str], int] = {}
        """(category, group) -> ``/ack`` requests accepted here since start (group ``""``: a
        plain ack that tombstoned at once, the Go behaviour); read by the metrics."""
        self.retention_deleted: dict[str, int] = {}
        """category -> chunks the retention policy deleted here since start."""

    @property
    def registry(self) -> GroupRegistry:
        return self._registry

    def _destinations(self) -> list[str]:
        return self._forwarder.destinations()

    def pending(self) -> dict[str, int]:
        """Outbox entries not confirmed yet, per destination (for tests and status)."""
        return self._forwarder.pending()

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the registry (after the store is open), start sharing it with the cluster
        and the retention loop."""
        if self._task is not None:
            return
        await self._registry.load()
        await self.retain.load()
        await self._forwarder.start()
        self._task = asyncio.create_task(self._retention_forever(), name="retention")

    async def stop(self) -> None:
        """Stop forwarding (the outbox stays on disk) and the retention loop. Idempotent."""
        if (task := self._task) is None:
            return
        self._task = None
        task.cancel()
        await asyncio.wait([task])
        await self._forwarder.stop()

    async def __aenter__(self) -> ConsumerGroups:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- acks ---------------------------------------------------------------------------

    async def ack(
        self, category: str, chunk: str, size: int, group: str | None, *,
        fence: Fence | None = None,
    ) -> None:
        """Apply ``/ack``; see the module docstring (and :meth:`_check_fence`)."""
        if fence is not None:
            await self._check_fence(category, chunk, size, group, fence)
        elif self._etcd is not None:
            await self._refuse_unfenced(category, group)
        implicit = group is None
        if group is None:
            if not await self._has_groups(category):
                if (self.retain.period(category) is not None
                        and not self._store.is_tombstoned(category, chunk)):
                    self._check_ack(category, chunk, size)
                await self.retain.acked(category, chunk, size)  # the Go behaviour by default
                self._count_ack(category, "")
                return
            group = DEFAULT_GROUP
        validate_group(group)
        done = False
        async with self._lock:
            groups = self._registry.groups(category)
            # A mistyped group is refused even for a chunk that is gone already.
            if group not in groups and not implicit:
                raise BadRequestError(
                    f"consumer group {group!r} is not registered for category {category!r}; "
                    f"register it first (/groups/register?category={category}&group={group})"
                )
            if self._store.is_tombstoned(category, chunk):
                return
            self._check_ack(category, chunk, size)
            registered = False
            async with self._registry.change():
                if group not in groups:
                    # A plain ack while groups are registered: the default group registers
                    # (cluster-wide, like any registration) by acking.
                    registered = self._registry.register(category, group)
                    self._registry.enqueue(self._destinations(),
                                           outbox_entry("register", category, group))
                    groups = self._registry.groups(category)
                new = registered or groups[group].get(chunk) != size
                self._registry.record_ack(category, group, chunk, size)
                # Static peers or a single node: decide here (see the module docstring).
                done = self._etcd is None and all(chunk in acked for acked in groups.values())
                if new:
                    self._registry.enqueue(self._destinations(),
                                           outbox_entry("ack", category, group, chunk, size))
            if done:
                # Only once the ack is durable: a tombstone cannot be taken back.
                await self.retain.acked(category, chunk, size)
                self._prune(category)
                await self._registry.save_quietly(f"category={category}")
        self._count_ack(category, group)
        if registered:
            logger.info("instance=%s category=%s registered group %s (a plain ack while "
                        "groups are registered)", self._store.instance, category, group)
        logger.debug("category=%s group=%s acked %s%s", category, group, chunk,
                     " (all groups: tombstoned)" if done else "")
        if new:
            await self._forwarder.sent()

    def _count_ack(self, category: str, group: str) -> None:
        key = (category, group)
        self.acks[key] = self.acks.get(key, 0) + 1

    async def _check_fence(
        self, category: str, chunk: str, size: int, group: str | None, fence: Fence
    ) -> None:
        """A partitioned group's ack carries its partition and epoch: it is taken only if an etcd
        transaction finds the partition's claim at that epoch now, so an instance that lost the
        partition (paused past its lease, cut off) cannot ack after the new owner took over
        (:class:`~chukcha.errors.StaleEpochError`, HTTP 409). An ack that passes is then
        applied as any other (recorded, and delivered to etcd through the outbox: it was valid
        when it was taken). A fenced ack without a group (``app=A``: the claim of app ``A``; a
        partition's changelog, which no group reads) is then a plain ack: a zombie's snapshot
        cannot delete the new owner's changelog chunks."""
        etcd = self._etcd
        app = group if group is not None else fence.app
        if app is None or etcd is None:
            raise BadRequestError("a fenced ack (partition, epoch) needs group= (or app=) and a "
                                  "node started with --etcd (the partition claims live there)")
        validate_group(app)
        if self._store.is_tombstoned(category, chunk):
            return
        self._check_ack(category, chunk, size)
        claim = claim_key(etcd.cluster, app, fence.partition)
        try:
            async with asyncio.timeout(INLINE_TIMEOUT):
                await etcd.check_epoch(claim, fence.epoch)
        except etcd_errors() as exc:
            raise CoordinationError(f"etcd did not answer, the epoch of a fenced ack cannot be "
                                    f"checked now; retry ({exc})") from exc

    async def _refuse_unfenced(self, category: str, group: str | None) -> None:
        """An app that runs as instances through etcd (it holds partition claims) acks only
        with fences: an unfenced ack as its group (an instance of the same app started without
        etcd, inside the window before it is noticed) or of one of its changelog categories is
        refused (409), so it cannot ack away the fenced group's input or the owners' changelog.
        Decided from etcd when it answers; while it does not, the ack is taken (as group acks
        are while etcd is down)."""
        etcd = self._etcd
        app = group
        if app is None:
            parsed = parse_partition_category(category)
            if parsed is None or not parsed[0].endswith(CHANGELOG_SUFFIX):
                return
            app = parsed[0][:-len(CHANGELOG_SUFFIX)]
        if etcd is None or not app or not etcd.connected:
            return
        try:
            async with asyncio.timeout(INLINE_TIMEOUT):
                claimed = await etcd.has_claims(app_prefix(etcd.cluster, app) + b"claims/")
        except etcd_errors() as exc:
            logger.info("instance=%s category=%s etcd did not answer (%s); taking an unfenced "
                        "ack without checking the app's claims", self._store.instance,
                        category, exc)
            return
        if claimed:
            raise StaleEpochError(
                f"app {app!r} runs as instances through etcd (it holds partition claims): its "
                f"acks of {category!r} must be fenced (partition, epoch); an instance of it "
                "outside the etcd group (started without --etcd) must not ack")

    async def _has_groups(self, category: str) -> bool:
        """Whether any group is registered for ``category``: this node's view, and with etcd
        (when it answers) etcd's, since the mirror may not have seen a new registration."""
        if self._registry.groups(category):
            return True
        etcd = self._etcd
        if etcd is None or not etcd.connected:
            return False
        try:
            async with asyncio.timeout(INLINE_TIMEOUT):
                return bool(await etcd.read(category))
        except etcd_errors() as exc:
            logger.info("instance=%s category=%s etcd did not answer (%s); deciding a plain ack "
                        "from the known groups", self._store.instance, category, exc)
            return False

    async def record_ack(
        self, category: str, chunk: str, size: int, group: str, origin: str | None = None
    ) -> bool:
        """``/groups/ack``: record ``group``'s ack of ``chunk`` made on another node (no checks
        against this node's copy, which may lag); tombstone the chunk here when every group has
        acked it and it is complete here (not with etcd: there the node that took the ack
        decides). ``origin`` is the forwarding peer (its ack implies the registration). Returns
        whether the chunk was tombstoned."""
        validate_category(category)
        parse_chunk_name(chunk)
        validate_group(group)
        async with self._lock:
            groups = self._registry.groups(category)
            if group not in groups and origin is None:
                raise BadRequestError(
                    f"consumer group {group!r} is not registered for category {category!r}"
                )
            if self._store.is_tombstoned(category, chunk) or (
                    groups.get(group, {}).get(chunk) == size):
                return False
            async with self._registry.change():
                if group not in groups:
                    self._registry.register(category, group)
                    groups = self._registry.groups(category)
                self._registry.record_ack(category, group, chunk, size)
                done = (
                    self._etcd is None
                    and all(chunk in acked for acked in groups.values())
                    and self._store.is_complete(category, chunk)
                    and (self._store.chunk_size(category, chunk) or 0) <= size
                )
            if done:
                done = await self.retain.acked(category, chunk, None)
                self._prune(category)
                await self._registry.save_quietly(f"category={category}")
        return done

    def _check_ack(self, category: str, chunk: str, size: int) -> None:
        # The same checks as ChunkStore.ack, without tombstoning.
        parse_chunk_name(chunk)
        have = self._store.chunk_size(category, chunk)
        if have is None:
            raise InvalidAckError(f"chunk {category}/{chunk} not found")
        if not self._store.is_complete(category, chunk):
            raise InvalidAckError(f"chunk {chunk} is not complete yet; cannot ack it")
        if size < have:
            raise InvalidAckError(
                f"size {size} is smaller than chunk {chunk} ({have} bytes): "
                "it has not been read to the end"
            )

    async def _tombstone_replica(self, category: str, chunk: str) -> bool:
        return await self.retain.acked(category, chunk, None, replica=True)

    def _prune(self, category: str) -> None:
        # Keep acks of chunks not here yet (copied from another node); drop tombstoned ones.
        gone = {chunk for acked in self._registry.groups(category).values() for chunk in acked
                if self._store.is_tombstoned(category, chunk)}
        self._registry.forget_chunks(category, gone)

    async def _tombstone_fully_acked(self, category: str) -> list[str]:
        groups = self._registry.groups(category)
        if not groups:
            return []
        done: list[str] = []
        for info in self._store.list_chunks(category):
            if (info.complete and all(info.name in acked for acked in groups.values())
                    and await self.retain.acked(category, info.name, None)):
                done.append(info.name)
        return done

    # --- registration -------------------------------------------------------------------

    async def register(self, category: str, group: str, origin: str | None = None) -> bool:
        """Register ``group`` for ``category``; ``origin`` is the forwarding peer, if any."""
        validate_category(category)
        validate_group(group)
        async with self._lock, self._registry.change():
            created = self._registry.register(category, group)
            # With etcd always (re)written: the local view may be stale while etcd is down.
            share = origin is None and (created or self._etcd is not None)
            if share:
                self._registry.enqueue(self._destinations(),
                                       outbox_entry("register", category, group))
        if created:
            logger.info("instance=%s category=%s registered group %s%s", self._store.instance,
                        category, group, f" (from {origin})" if origin else "")
        if share:
            await self._forwarder.sent()
        return created

    async def unregister(self, category: str, group: str, origin: str | None = None) -> bool:
        """Remove ``group``; chunks every remaining group has acked are tombstoned now (with
        etcd: once etcd has taken the change, checked against etcd)."""
        validate_category(category)
        validate_group(group)
        async with self._lock:
            async with self._registry.change():
                removed = self._registry.unregister(category, group)
                share = origin is None and (removed or self._etcd is not None)
                if share:
                    self._registry.enqueue(self._destinations(),
                                           outbox_entry("unregister", category, group))
            # Only once the unregistration is durable: tombstones cannot be taken back.
            if removed and self._etcd is None and await self._tombstone_fully_acked(category):
                self._prune(category)
                await self._registry.save_quietly(f"category={category}")
        if removed:
            logger.info("instance=%s category=%s unregistered group %s%s",
                        self._store.instance, category, group,
                        f" (from {origin})" if origin else "")
        if share:
            await self._forwarder.sent()
        return removed

    async def record_partitions(self, category: str, count: int, origin: str | None) -> None:
        """Record ``category``'s partition count durably (checked by the caller,
        :mod:`chukcha.bus.partitions`) and, unless it came from a peer, forward it to the static
        peers through the outbox (with etcd the caller wrote it to etcd first)."""
        peers = [d for d in self._destinations() if self._etcd is None]
        async with self._lock, self._registry.change():
            self._registry.set_partitions(category, count)
            if origin is None and peers:
                self._registry.enqueue(peers, {"op": "partitions", "category": category,
                                               "count": count})
        if origin is None and peers:
            await self._forwarder.sent()

    def describe(self, category: str) -> dict[str, Any]:
        """``/groups/list``: the groups of ``category`` and the chunks each has acked (live
        here, or not replicated here yet)."""
        validate_category(category)
        return {
            "category": category,
            "groups": [
                {"name": g, "acked": sorted(c for c in acked
                                            if not self._store.is_tombstoned(category, c))}
                for g, acked in sorted(self._registry.groups(category).items())
            ],
            "retention": self._registry.retention(category).to_json(),
        }

    # --- retention ----------------------------------------------------------------------

    async def set_retention(self, category: str, policy: RetentionPolicy) -> None:
        validate_category(category)
        async with self._lock, self._registry.change():
            self._registry.set_retention(category, policy)
        logger.info("instance=%s category=%s retention max_age=%s max_bytes=%s",
                    self._store.instance, category, policy.max_age, policy.max_bytes)

    async def apply_retention(self, now: float | None = None) -> list[str]:
        """Delete what the retention policies say must go; returns ``category/chunk`` names."""
        deleted: list[str] = []
        for category in self._registry.categories():
            policy = self._registry.retention(category)
            if policy.enabled:
                deleted += await self._apply(category, policy, now)
        async with self._lock:
            deleted += await self.retain.expire(now)
        return deleted

    async def _apply(
        self, category: str, policy: RetentionPolicy, now: float | None
    ) -> list[str]:
        chunks = self._store.list_chunks(category)
        complete = [c for c in chunks if c.complete]
        if not complete:
            return []
        cat_dir = self._store.data_dir / category
        mtimes = await asyncio.to_thread(_mtimes, cat_dir, [c.name for c in complete])
        # Oldest first: by last write, then by name (a stream's chunks in order).
        order = sorted(complete, key=lambda c: (mtimes.get(c.name, 0.0), c.name))
        total = sum(c.size for c in chunks)
        now = time.time() if now is None else now
        victims: list[str] = []
        for c in order:
            too_old = policy.max_age is not None and now - mtimes.get(c.name, now) > policy.max_age
            too_big = policy.max_bytes is not None and total > policy.max_bytes
            if not (too_old or too_big):
                if policy.max_age is None:
                    break  # by size only: the rest is newer
                continue
            victims.append(c.name)
            total -= c.size
        deleted: list[str] = []
        async with self._lock:
            for name in victims:
                if await self._store.ack(category, name, None):
                    deleted.append(f"{category}/{name}")
            if victims:
                self._prune(category)
                await self._registry.save_quietly(f"category={category} retention")
        if deleted:
            self.retention_deleted[category] = (
                self.retention_deleted.get(category, 0) + len(deleted)
            )
            logger.info("instance=%s category=%s retention deleted %s", self._store.instance,
                        category, ", ".join(deleted))
        return deleted

    async def _retention_forever(self) -> None:
        while True:
            await asyncio.sleep(self._retention_interval)
            try:
                await self.apply_retention()
            except Exception:
                logger.exception("retention failed; retrying in %g s", self._retention_interval)


def _mtimes(directory: Path, names: list[str]) -> dict[str, float]:
    result: dict[str, float] = {}
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            result[name] = (directory / name).stat().st_mtime
    return result
