"""Replication, the replica side for the whole node: one link per member peer.

:class:`Replicator` follows the membership (:class:`~chukcha.bus.coordination.Membership`):
it starts a :class:`~chukcha.bus.replication_link.PeerLink` for every peer that joins (or moves)
and stops the link of one that leaves. It also marks owners gone longer than
``dead_peer_timeout`` dead (their last chunk complete, so readers move past it) and reports
per-peer replication status for ``/status``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping
from typing import Any, Final

import aiohttp

from chukcha.bus.chunks import ChunkStore
from chukcha.bus.config import Peer, ReplicationConfig
from chukcha.bus.coordination import Membership
from chukcha.bus.peers import PeerAccess
from chukcha.bus.replication_link import BufferPool, PeerLink
from chukcha.bus.tasks import log_task_crash

__all__ = ["Replicator"]

logger = logging.getLogger(__name__)


class Replicator:
    """The replica side for the whole node: one :class:`PeerLink` per member peer."""

    def __init__(
        self,
        store: ChunkStore,
        config: ReplicationConfig,
        membership: Membership,
        access: PeerAccess | None = None,
    ) -> None:
        self._store = store
        self._config = config
        self._membership = membership
        self._access = access or PeerAccess()
        self._links: dict[str, PeerLink] = {}
        self._session: aiohttp.ClientSession | None = None
        self._dead_task: asyncio.Task[None] | None = None
        self._gone_since: dict[str, float] = {}
        self._dead_owners: set[str] = set()
        self._stopping: set[asyncio.Task[None]] = set()
        self._buffers = BufferPool(config.batch_size, pairs=4)

    @property
    def links(self) -> Mapping[str, PeerLink]:
        return self._links

    async def start(self) -> None:
        self._session = self._access.session(limit=0, enable_cleanup_closed=True)
        self._membership.add_listener(self._on_members)
        self._on_members(self._membership.peers())
        self._dead_task = asyncio.create_task(self._dead_owners_loop(), name="dead-owners")
        self._dead_task.add_done_callback(_log_crash)

    async def stop(self, timeout: float = 5.0) -> None:
        links, self._links = list(self._links.values()), {}
        await asyncio.gather(*(link.stop(timeout) for link in links))
        if self._stopping:
            await asyncio.wait(list(self._stopping), timeout=timeout)
        if self._dead_task is not None:
            self._dead_task.cancel()
            await asyncio.wait([self._dead_task], timeout=timeout)
            self._dead_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _on_members(self, peers: Mapping[str, Peer]) -> None:
        if self._session is None:
            return
        for name in list(self._links):
            link = self._links[name]
            if name not in peers or peers[name].address != link.peer.address:
                del self._links[name]
                self._gone_since.setdefault(name, time.monotonic())
                self._stop_later(link)
        for name, peer in peers.items():
            if name not in self._links:
                link = PeerLink(peer, self._store, self._config, self._session, self._buffers,
                                access=self._access)
                self._links[name] = link
                link.start()

    def _stop_later(self, link: PeerLink) -> None:
        # Called from a synchronous listener; the stopping task is owned (kept in a set until
        # done, awaited by stop()).
        task = asyncio.create_task(link.stop(self._config.retry_interval + 5),
                                   name=f"unlink-{link.peer.instance}")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _dead_owners_loop(self) -> None:
        """Mark owners gone longer than ``dead_peer_timeout`` dead (their last chunk complete)."""
        timeout = self._config.dead_peer_timeout
        period = min(max(timeout / 10, 0.05), 60.0)
        while True:
            await asyncio.sleep(period)  # a coarse timer over a timeout measured in minutes
            try:
                self._mark_dead_owners(timeout)
            except Exception:
                logger.exception("instance=%s checking for dead owners failed",
                                 self._store.instance)

    def _mark_dead_owners(self, timeout: float) -> None:
        now = time.monotonic()
        owners = {o for c in self._store.categories() for o in self._store.owners(c)}
        owners.discard(self._store.instance)
        for owner in owners:
            link = self._links.get(owner)
            if link is not None and link.up:
                self._gone_since.pop(owner, None)
                if owner in self._dead_owners:
                    self._dead_owners.discard(owner)
                    self._store.set_owner_dead(owner, False)
                continue
            since = self._gone_since.setdefault(owner, now)
            if now - since >= timeout and owner not in self._dead_owners:
                logger.warning("instance=%s owner %s gone for %.1f s: treating its last "
                               "chunks as complete", self._store.instance, owner,
                               now - since)
                self._dead_owners.add(owner)
                self._store.set_owner_dead(owner, True)

    def status(self) -> list[dict[str, Any]]:
        """Per-peer replication status (``/status``)."""
        return [
            {
                "instance": name,
                "url": link.peer.url,
                "up": link.up,
                "lag_bytes": link.lag_bytes(),
                "last_seen": link.last_seen,
                "bytes_replicated": link.bytes_replicated,
            }
            for name, link in sorted(self._links.items())
        ]


_log_crash: Final = functools.partial(log_task_crash, what="replication")
