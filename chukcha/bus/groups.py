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
``<data_dir>/.groups.json`` (written atomically: temp file, fsync, rename), which is not a
directory and so never mistaken for a category.

Groups are cluster-wide. A chunk's tombstone replicates to every node, so a node must not
tombstone a chunk that a group registered *anywhere* has not acked:

- **With etcd** (``--etcd``) registrations and group acks live in etcd
  (:class:`~chukcha.bus.coordination.EtcdGroups`: ``chukcha/<cluster>/groups/<category>/<group>``
  and ``.../<group>/<chunk>`` = size) and every node watches them (its listing and its check of
  "is this group registered" use that mirror, which keeps the last known set while etcd is down).
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
import errno
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from chukcha.bus import files, web
from chukcha.bus.app_coordination import claim_key
from chukcha.bus.chunks import ChunkStore
from chukcha.bus.config import Peer
from chukcha.bus.coordination import ETCD_ERRORS, EtcdGroups, GroupsSnapshot
from chukcha.bus.group_forwarding import INLINE_TIMEOUT, GroupForwarder, outbox_entry
from chukcha.bus.http import Fence, Handler, float_param, int_param, str_param
from chukcha.bus.peers import PeerAccess
from chukcha.bus.retain import AckedRetention
from chukcha.bus.tasks import run_to_end
from chukcha.errors import (
    BadRequestError,
    CoordinationError,
    DiskWriteError,
    InvalidAckError,
)
from chukcha.partitioning import MAX_PARTITIONS
from chukcha.protocol import MAX_INT_PARAM, parse_chunk_name, validate_category, validate_instance

__all__ = [
    "DEFAULT_GROUP",
    "GROUPS_FILE",
    "ConsumerGroups",
    "GroupRegistry",
    "RetentionPolicy",
    "validate_group",
]

logger = logging.getLogger(__name__)

GROUPS_FILE: Final = ".groups.json"
DEFAULT_GROUP: Final = "default"
"""The group of an ack without ``group`` while other groups are registered for the category."""
_GROUP_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}")
_JSON: Final = "application/json"
_MAX_AGE: Final = 100 * 365 * 86400.0


def validate_group(name: str) -> str:
    """Return ``name`` if it is a valid group name (letters, digits, ``_ . : -``; 1-200)."""
    if not _GROUP_RE.fullmatch(name):
        raise BadRequestError(
            f"invalid group name {name!r}: use 1-200 letters, digits, '_', '.', ':' or '-', "
            "starting with a letter, digit or '_'"
        )
    return name


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Delete complete chunks older than ``max_age`` seconds, and the oldest complete chunks
    while the category holds more than ``max_bytes``; ``None`` turns a limit off."""

    max_age: float | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_age is not None and self.max_age <= 0:
            raise ValueError("max_age must be positive")
        if self.max_bytes is not None and not 0 < self.max_bytes <= MAX_INT_PARAM:
            raise ValueError(f"max_bytes must be between 1 and {MAX_INT_PARAM}")

    @property
    def enabled(self) -> bool:
        return self.max_age is not None or self.max_bytes is not None

    def to_json(self) -> dict[str, Any]:
        return {"max_age": self.max_age, "max_bytes": self.max_bytes}


@dataclass(slots=True)
class _CategoryGroups:
    groups: dict[str, dict[str, int]] = field(default_factory=dict)  # group -> chunk -> size
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    partitions: int = 0  # 0: not a partitioned category (see chukcha.bus.partitions)


class GroupRegistry:
    """Registrations, group acks and retention policies of one node, persisted in one file.

    Mutations are applied in memory and then written out; callers hold the
    :class:`ConsumerGroups` lock so writes never interleave.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._cats: dict[str, _CategoryGroups] = {}
        self.outbox: dict[str, list[dict[str, Any]]] = {}
        """Destination (peer instance, or ``"etcd"``) -> changes not confirmed there yet."""
        self._on_disk: bytes | None = None  # the document last written (or loaded)

    async def load(self) -> None:
        raw = await asyncio.to_thread(files.read_file, self._path)
        if raw is not None:
            self._decode(raw)
            self._on_disk = raw

    def _decode(self, raw: bytes) -> None:
        """Make memory the registry document ``raw`` (all or nothing)."""
        try:
            data = orjson.loads(raw)
            cats: dict[str, _CategoryGroups] = {}
            for cat, obj in data.get("categories", {}).items():
                ret = obj.get("retention") or {}
                cats[validate_category(cat)] = _CategoryGroups(
                    groups={validate_group(g): {str(c): _size(s) for c, s in acked.items()}
                            for g, acked in obj.get("groups", {}).items()},
                    retention=RetentionPolicy(ret.get("max_age"), ret.get("max_bytes")),
                    partitions=_count(obj.get("partitions", 0)),
                )
            outbox = {str(dest): [dict(e) for e in entries]
                      for dest, entries in data.get("outbox", {}).items() if entries}
        except (orjson.JSONDecodeError, ValueError, AttributeError, TypeError) as exc:
            raise ValueError(f"{self._path} is damaged: {exc}") from exc
        self._cats, self.outbox = cats, outbox

    def _encode(self) -> bytes:
        return orjson.dumps({
            "categories": {
                cat: {"groups": cg.groups, "retention": cg.retention.to_json(),
                      **({"partitions": cg.partitions} if cg.partitions else {})}
                for cat, cg in sorted(self._cats.items())
                if cg.groups or cg.retention.enabled or cg.partitions
            },
            "outbox": {dest: entries for dest, entries in self.outbox.items() if entries},
        })

    async def save(self) -> None:
        """Write the registry out (atomically, fsync'ed).

        Raises:
            DiskWriteError: the file could not be written (memory is left as it is: use
                :meth:`change` to have it put back).
        """
        try:
            await run_to_end(self._write(self._encode()))
        except OSError as exc:
            raise DiskWriteError(
                exc.errno or errno.EIO,
                f"saving the consumer-group registry {self._path} failed: {exc.strerror}; "
                "nothing was changed",
            ) from exc

    async def _write(self, data: bytes) -> None:
        await asyncio.to_thread(files.write_atomic, self._path, data)
        self._on_disk = data

    @contextlib.asynccontextmanager
    async def change(self) -> AsyncIterator[None]:
        """One durable change: the block changes memory, the exit saves it, and if either
        fails memory is put back as it was, so a change answered 200 is on disk and a failed
        one is nowhere (the caller holds the :class:`ConsumerGroups` lock)."""
        before = self._encode()
        try:
            yield
            if self._on_disk != self._encode():
                await self.save()
        except BaseException:
            # Unless the file has it after all (cancelled after the write), put memory back.
            if self._on_disk != self._encode():
                self._decode(before)
            raise

    async def save_quietly(self, what: str) -> None:
        """Save a change that needs no rollback (dropping the acks of tombstoned chunks: the
        next save writes it); a failure is logged."""
        try:
            await self.save()
        except DiskWriteError as exc:
            logger.warning("%s: %s", what, exc)

    def groups(self, category: str) -> dict[str, dict[str, int]]:
        cg = self._cats.get(category)
        return cg.groups if cg else {}

    def categories(self) -> list[str]:
        return sorted(self._cats)

    def retention(self, category: str) -> RetentionPolicy:
        cg = self._cats.get(category)
        return cg.retention if cg else RetentionPolicy()

    def partitions(self, category: str) -> int:
        """The recorded partition count of ``category`` (0: none)."""
        cg = self._cats.get(category)
        return cg.partitions if cg else 0

    def set_partitions(self, category: str, count: int) -> None:
        self._cat(category).partitions = count

    def _cat(self, category: str) -> _CategoryGroups:
        return self._cats.setdefault(category, _CategoryGroups())

    def register(self, category: str, group: str) -> bool:
        groups = self._cat(category).groups
        if group in groups:
            return False
        groups[group] = {}
        return True

    def unregister(self, category: str, group: str) -> bool:
        return self._cat(category).groups.pop(group, None) is not None

    def record_ack(self, category: str, group: str, chunk: str, size: int) -> None:
        self._cat(category).groups.setdefault(group, {})[chunk] = size

    def replace_groups(self, snapshot: GroupsSnapshot) -> None:
        """Make the groups and acks those of ``snapshot`` (etcd's); retention stays."""
        for cg in self._cats.values():
            cg.groups = {}
        for category, groups in snapshot.items():
            self._cat(category).groups = {g: dict(acked) for g, acked in groups.items()}

    def apply(self, entry: dict[str, Any]) -> None:
        """Apply an outbox entry to this registry (it is not in etcd's snapshot yet)."""
        category, group = entry["category"], entry.get("group", "")
        if entry["op"] == "partitions":
            self.set_partitions(category, entry["count"])
        elif entry["op"] == "register":
            self.register(category, group)
        elif entry["op"] == "unregister":
            self.unregister(category, group)
        else:
            self.record_ack(category, group, entry["chunk"], entry["size"])

    def enqueue(self, destinations: list[str], entry: dict[str, Any]) -> None:
        """Queue ``entry`` for each destination (not twice in a row)."""
        for dest in destinations:
            box = self.outbox.setdefault(dest, [])
            if not box or box[-1] != entry:
                box.append(entry)

    def forget_chunks(self, category: str, gone: set[str]) -> None:
        """Drop the acks of chunks that are gone."""
        for acked in self._cat(category).groups.values():
            for chunk in gone & acked.keys():
                del acked[chunk]

    def set_retention(self, category: str, policy: RetentionPolicy) -> None:
        self._cat(category).retention = policy


class ConsumerGroups:
    """The node's :class:`~chukcha.bus.http.AckHandler` with groups, their routes, retention.

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
        when it was taken)."""
        etcd = self._etcd
        if group is None or etcd is None:
            raise BadRequestError("a fenced ack (partition, epoch) needs group= and a node "
                                  "started with --etcd (the partition claims live there)")
        validate_group(group)
        if self._store.is_tombstoned(category, chunk):
            return
        self._check_ack(category, chunk, size)
        claim = claim_key(etcd.cluster, group, fence.partition)
        try:
            async with asyncio.timeout(INLINE_TIMEOUT):
                await etcd.check_epoch(claim, fence.epoch)
        except ETCD_ERRORS as exc:
            raise CoordinationError(f"etcd did not answer, the epoch of a fenced ack cannot be "
                                    f"checked now; retry ({exc})") from exc

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
        except ETCD_ERRORS as exc:
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

    # --- HTTP ---------------------------------------------------------------------------

    def routes(self) -> dict[str, Handler]:
        return {
            "/groups/register": self._serve_register,
            "/groups/unregister": self._serve_unregister,
            "/groups/list": self._serve_list,
            "/groups/ack": self._serve_record_ack,
            "/retention": self._serve_retention,
        }

    async def _serve_register(self, request: web.Request) -> web.StreamResponse:
        created = await self.register(str_param(request, "category"),
                                      str_param(request, "group"), _origin(request))
        return web.json_response({"created": created})

    async def _serve_unregister(self, request: web.Request) -> web.StreamResponse:
        removed = await self.unregister(str_param(request, "category"),
                                        str_param(request, "group"), _origin(request))
        return web.json_response({"removed": removed})

    async def _serve_record_ack(self, request: web.Request) -> web.StreamResponse:
        done = await self.record_ack(
            str_param(request, "category"), str_param(request, "chunk"),
            int_param(request, "size"), str_param(request, "group"), _origin(request),
        )
        return web.json_response({"tombstoned": done})

    async def _serve_list(self, request: web.Request) -> web.StreamResponse:
        body = orjson.dumps(self.describe(str_param(request, "category")))
        return web.Response(body=body, content_type=_JSON)

    async def _serve_retention(self, request: web.Request) -> web.StreamResponse:
        category = validate_category(str_param(request, "category"))
        if "max_age" in request.query or "max_bytes" in request.query:
            max_age = float_param(request, "max_age", 0.0, maximum=_MAX_AGE)
            max_bytes = int_param(request, "max_bytes", 0)
            await self.set_retention(
                category, RetentionPolicy(max_age or None, max_bytes or None)
            )
        body = orjson.dumps(self._registry.retention(category).to_json())
        return web.Response(body=body, content_type=_JSON)


def _origin(request: web.Request) -> str | None:
    """``from=<instance>``: the request is a peer's forward (not forwarded again)."""
    origin = request.query.get("from")
    return validate_instance(origin) if origin else None


def _count(value: Any) -> int:
    """A recorded partition count from the registry file (0: none, else 1..1024)."""
    if value == 0:
        return 0
    if type(value) is not int or not 1 <= value <= MAX_PARTITIONS:
        raise ValueError(f"partition count {value!r} is not an integer from 1 to "
                         f"{MAX_PARTITIONS}")
    return value


def _size(value: Any) -> int:
    """A recorded ack size from the registry file (an int in the parameter range)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT_PARAM:
        raise ValueError(f"ack size {value!r} is not an integer between 0 and {MAX_INT_PARAM}")
    return value


def _mtimes(directory: Path, names: list[str]) -> dict[str, float]:
    result: dict[str, float] = {}
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            result[name] = (directory / name).stat().st_mtime
    return result
