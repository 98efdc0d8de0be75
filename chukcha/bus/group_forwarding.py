"""Sharing consumer-group changes with the cluster: the durable outbox's delivery.

A registration, an unregistration or a group ack taken by :class:`~chukcha.bus.groups.
ConsumerGroups` is saved with an outbox entry per destination (in the same write as the change,
see :class:`~chukcha.bus.group_registry.GroupRegistry`); :class:`GroupForwarder` delivers each
destination's entries in order and removes one only once it is confirmed, retrying with backoff
meanwhile. A destination is etcd (``--etcd``: the change is written to etcd, and a group ack is
followed by a linearizable check that may tombstone the chunk) or each static peer (``--peers``:
``/groups/register``, ``/groups/unregister``, ``/groups/ack`` with ``from=<instance>``). The
module docstring of :mod:`chukcha.bus.groups` describes the guarantees.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiohttp

from chukcha.bus.chunks import ChunkStore
from chukcha.bus.config import Peer
from chukcha.bus.coordination import etcd_errors
from chukcha.bus.group_coordination import EtcdGroups, GroupsSnapshot
from chukcha.bus.group_registry import GroupRegistry
from chukcha.bus.peers import PeerAccess
from chukcha.bus.tasks import log_task_crash
from chukcha.errors import ChukchaError, ReplicationError

__all__ = ["INLINE_TIMEOUT", "GroupForwarder", "outbox_entry"]

logger = logging.getLogger(__name__)

_ETCD: Final = "etcd"
"""The outbox destination of etcd writes (peer destinations are instance names)."""
_MAX_BACKOFF: Final = 2.0
_BATCH: Final = 64
INLINE_TIMEOUT: Final = 5.0
"""How long a request waits for etcd to take its change before leaving it to the outbox."""
_FORWARD_PATHS: Final = {
    "register": "/groups/register",
    "unregister": "/groups/unregister",
    "ack": "/groups/ack",
    "partitions": "/partitions",
}
_log_crash: Final = functools.partial(log_task_crash, what="group")


def outbox_entry(
    op: str, category: str, group: str, chunk: str | None = None, size: int | None = None
) -> dict[str, Any]:
    """The outbox entry of a change (``op``: ``register``, ``unregister`` or ``ack``)."""
    entry: dict[str, Any] = {"op": op, "category": category, "group": group}
    if chunk is not None:
        entry["chunk"], entry["size"] = chunk, size
    return entry


class GroupForwarder:
    """Delivers the registry's outbox to etcd or to the static peers (one task each).

    Args:
        store: the node's chunk store.
        registry: the groups registry holding the outbox.
        lock: the lock every change of ``registry`` is made under.
        peers: static peers (``--peers``).
        etcd: the etcd-backed groups (``--etcd``); this component starts and stops it.
        retry_interval: first pause before a failed delivery is retried; doubles up to 2 s.
        on_tombstoned: called (under ``lock``) with a category where the etcd check tombstoned
            chunks.
        tombstone: what the etcd check calls for a chunk every group acked; returns whether it
            was tombstoned (``False``: kept for replay, ``--retain-acked``: its acks stay).
    """

    def __init__(
        self,
        store: ChunkStore,
        registry: GroupRegistry,
        lock: asyncio.Lock,
        *,
        peers: tuple[Peer, ...],
        etcd: EtcdGroups | None,
        retry_interval: float,
        on_tombstoned: Callable[[str], None],
        tombstone: Callable[[str, str], Awaitable[bool]] | None = None,
        access: PeerAccess | None = None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._lock = lock
        self._peers = {p.instance: p for p in peers if p.instance != store.instance}
        self._etcd = etcd
        self._retry = retry_interval
        self._on_tombstoned = on_tombstoned
        self._access = access or PeerAccess()
        self._tombstone = tombstone or self._tombstone_now
        self._forwarders: list[asyncio.Task[None]] = []
        self._wake: dict[str, asyncio.Event] = {}
        self._pump_locks: dict[str, asyncio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None
        self._mirror_dirty = False

    def destinations(self) -> list[str]:
        """Where every change goes: etcd, or each static peer."""
        return [_ETCD] if self._etcd is not None else sorted(self._peers)

    def pending(self) -> dict[str, int]:
        """Outbox entries not confirmed yet, per destination (for tests and status)."""
        return {dest: len(box) for dest, box in self._registry.outbox.items() if box}

    async def start(self) -> None:
        """Start delivering (after the registry is loaded): what a previous run left first."""
        dests = self.destinations()
        for dest in list(self._registry.outbox):
            if dest not in dests:
                logger.warning("instance=%s dropping %d group change(s) queued for %s: not a "
                               "peer any more", self._store.instance,
                               len(self._registry.outbox[dest]), dest)
                del self._registry.outbox[dest]
        if self._etcd is not None:
            self._etcd.add_listener(self._on_etcd)
            await self._etcd.start()
        if self._peers:
            self._session = self._access.session()
        for dest in dests:
            self._wake[dest] = asyncio.Event()
            self._wake[dest].set()  # deliver what a previous run left
            self._pump_locks[dest] = asyncio.Lock()
            task = asyncio.create_task(self._forward_forever(dest), name=f"groups-to-{dest}")
            task.add_done_callback(_log_crash)
            self._forwarders.append(task)

    async def stop(self) -> None:
        """Stop delivering (the outbox stays on disk) and stop etcd. Idempotent."""
        tasks, self._forwarders = self._forwarders, []
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._etcd is not None:
            await self._etcd.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None


    async def sent(self) -> None:
        """A change was queued: wake the forwarders. With etcd, deliver it now when etcd
        answers, so the reply to the request means "cluster-wide" (and a last ack tombstones
        before it returns); what fails stays queued for the forwarder."""
        for event in self._wake.values():
            event.set()
        if self._etcd is None or not self._etcd.connected or _ETCD not in self._pump_locks:
            return
        try:
            async with asyncio.timeout(INLINE_TIMEOUT):
                await self._pump(_ETCD)
        except etcd_errors(ChukchaError) as exc:
            logger.info("instance=%s etcd did not take a group change (%s); retrying",
                        self._store.instance, exc)
            self._wake[_ETCD].set()

    def _on_etcd(self, snapshot: GroupsSnapshot) -> None:
        # etcd's view, plus what this node has queued for etcd but not written yet.
        self._registry.replace_groups(snapshot)
        for entry in self._registry.outbox.get(_ETCD, []):
            self._registry.apply(entry)
        self._mirror_dirty = True
        if (event := self._wake.get(_ETCD)) is not None:
            event.set()  # the forwarder saves the mirror (last known set across restarts)

    async def _forward_forever(self, dest: str) -> None:
        wake = self._wake[dest]
        backoff = self._retry
        while True:
            await wake.wait()
            wake.clear()
            try:
                await self._pump(dest)
            except etcd_errors(aiohttp.ClientError, ChukchaError) as exc:
                logger.debug("instance=%s group changes to %s not delivered (%d left): %s",
                             self._store.instance, dest,
                             len(self._registry.outbox.get(dest, [])), exc)
                wake.set()
                await asyncio.sleep(backoff)  # retry backoff, not synchronisation
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            backoff = self._retry

    async def _pump(self, dest: str) -> None:
        """Deliver ``dest``'s outbox in order; each entry leaves it only once confirmed."""
        async with self._pump_locks[dest]:
            if self._mirror_dirty:
                self._mirror_dirty = False
                async with self._lock:
                    await self._registry.save()
            while batch := list(self._registry.outbox.get(dest, [])[:_BATCH]):
                done = 0
                try:
                    for entry in batch:
                        await self._deliver(dest, entry)
                        done += 1
                finally:
                    if done:
                        # Only this (locked) pump removes; new entries go to the end. If the
                        # save fails they stay (in memory too) and are delivered again, which
                        # is harmless: every change is idempotent at its destination.
                        async with self._lock, self._registry.change():
                            del self._registry.outbox[dest][:done]

    async def _deliver(self, dest: str, entry: dict[str, Any]) -> None:
        if dest == _ETCD:
            await self._deliver_etcd(entry)
            return
        peer, session = self._peers.get(dest), self._session
        if peer is None or session is None:
            return
        op = entry["op"]
        params = {k: str(v) for k, v in entry.items() if k != "op"}
        params["from"] = self._store.instance
        async with asyncio.timeout(10), session.get(f"{peer.url}{_FORWARD_PATHS[op]}",
                                                    params=params) as resp:
            text = await resp.text()
        if resp.status == 200:
            return
        # 401/403: our token is not (yet) the peer's during a rotation: retried, never dropped.
        if 400 <= resp.status < 500 and resp.status not in (401, 403, 408, 429):
            # It can never succeed (say, the peer is a Go server without groups).
            logger.warning("instance=%s peer %s refused %s of %s/%s: HTTP %d %s; dropping it",
                           self._store.instance, dest, op, entry["category"],
                           entry.get("group", ""),
                           resp.status, text.strip()[:200])
            return
        raise ReplicationError(f"forwarding {op} to {dest}: HTTP {resp.status} {text[:200]}")

    async def _deliver_etcd(self, entry: dict[str, Any]) -> None:
        etcd = self._etcd
        if etcd is None:
            return
        op, category, group = entry["op"], entry["category"], entry["group"]
        if op == "register":
            await etcd.register(category, group)
        elif op == "unregister":
            await etcd.unregister(category, group)
            await self._settle(etcd, category, None)
        elif await etcd.ack(category, group, entry["chunk"], entry["size"]):
            await self._settle(etcd, category, entry["chunk"])
        else:
            logger.info("instance=%s category=%s dropped group %s's ack of %s: the group is "
                        "not registered (any more)", self._store.instance, category, group,
                        entry["chunk"])

    async def _tombstone_now(self, category: str, chunk: str) -> bool:
        await self._store.tombstone_replica(category, chunk)
        return True

    async def _settle(self, etcd: EtcdGroups, category: str, chunk: str | None) -> None:
        """Tombstone ``chunk`` (or every chunk of ``category`` with acks) if every group
        registered in etcd has acked it, read from etcd now; then delete its acks there."""
        groups = await etcd.read(category)
        if not groups:
            return
        names = [chunk] if chunk is not None else sorted(
            {c for acked in groups.values() for c in acked})
        tombstoned = False
        for name in names:
            if self._store.is_tombstoned(category, name):
                # Gone another way (a plain ack, retention): its group acks are litter.
                await etcd.forget(category, name, sorted(groups))
                continue
            if not all(name in acked for acked in groups.values()):
                continue
            try:
                if not await self._tombstone(category, name):
                    continue  # kept for replay (--retain-acked): its acks stay
            except ChukchaError as exc:
                logger.warning("instance=%s category=%s every group acked %s but it cannot be "
                               "tombstoned: %s", self._store.instance, category, name, exc)
                continue
            tombstoned = True
            logger.debug("category=%s every group acked %s: tombstoned", category, name)
            await etcd.forget(category, name, sorted(groups))
        if tombstoned:
            async with self._lock:
                self._on_tombstoned(category)
