"""The cluster part of a node: membership + both halves of replication + ``/status``.

:class:`~chukcha.bus.node.Node` builds one :class:`Cluster` and only calls :meth:`routes` (before
the HTTP server starts), :meth:`start` (once the address is bound: etcd registers it) and
:meth:`stop` (before the HTTP server stops, so that open events streams do not hold the
graceful stop up).

Modes: ``etcd`` (``--etcd``), ``static`` (``--peers``), ``standalone`` (neither: the events and
status endpoints still answer, nothing is replicated and ``min_sync_replicas`` is refused).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from chukcha.bus import web
from chukcha.bus.chunks import ChunkStore
from chukcha.bus.config import NodeConfig, Peer
from chukcha.bus.coordination import EtcdMembership, Membership, StaticMembership
from chukcha.bus.group_coordination import EtcdGroups
from chukcha.bus.http import Handler, ReplicaWaiter
from chukcha.bus.peers import PeerAccess
from chukcha.bus.replication import ReplicationServer
from chukcha.bus.replicator import Replicator
from chukcha.bus.status import StatusApi

__all__ = ["PEERS_FILE", "Cluster"]

logger = logging.getLogger(__name__)

PEERS_FILE: Final = ".peers.json"
"""The last membership seen in etcd (used at start until etcd answers)."""


class _Address:
    def __init__(self) -> None:
        self.value = ""

    def __call__(self) -> str:
        return self.value


class Cluster:
    """Membership, replication (both directions) and ``/status`` of one node."""

    def __init__(
        self, config: NodeConfig, store: ChunkStore, access: PeerAccess | None = None
    ) -> None:
        self._config = config
        self._access = access or PeerAccess()
        self._store = store
        if config.etcd_endpoints:
            self.mode = "etcd"
        elif config.peers:
            self.mode = "static"
        else:
            self.mode = "standalone"
        self._address = _Address()
        self.membership: Membership | None = None
        self.replicator: Replicator | None = None
        self.server = ReplicationServer(store, config.replication, self._live_peers,
                                        self._is_peer)
        self._status = StatusApi(
            config.instance, self._address, mode=self.mode, server=self.server
        )
        # What consumer groups share through (see chukcha.bus.groups); ConsumerGroups starts
        # and stops them, because the registry must be shared before any ack is served.
        self.group_store: EtcdGroups | None = None
        self.group_peers: tuple[Peer, ...] = ()
        if self.mode == "etcd":
            self.group_store = EtcdGroups(config.etcd_endpoints, config.cluster, config.instance)
        elif self.mode == "static":
            self.group_peers = tuple(p for p in config.peers if p.instance != config.instance)

    @property
    def replica_waiter(self) -> ReplicaWaiter | None:
        """What ``/write?min_sync_replicas=K`` waits on (``None`` standalone)."""
        return None if self.mode == "standalone" else self.server

    def _live_peers(self) -> int:
        return len(self.membership.peers()) if self.membership is not None else 0

    def _is_peer(self, instance: str) -> bool:
        return self.membership is not None and instance in self.membership.peers()

    def routes(self) -> dict[str, Handler]:
        return {**self.server.routes(), "/status": self._serve_status}

    async def start(self, address: str) -> None:
        """Join the cluster as ``address`` (``host:port``) and start replicating."""
        cfg = self._config
        self._address.value = address
        if self.mode == "standalone":
            return
        if self.mode == "etcd":
            self.membership = EtcdMembership(
                cfg.etcd_endpoints, cfg.cluster, cfg.instance, address,
                lease_ttl=cfg.replication.lease_ttl, remember=cfg.data_dir / PEERS_FILE,
            )
        else:
            self.membership = StaticMembership(cfg.peers, cfg.instance)
        self.replicator = Replicator(self._store, cfg.replication, self.membership,
                                     self._access)
        self._status = StatusApi(
            cfg.instance, self._address, mode=self.mode, membership=self.membership,
            replicator=self.replicator, server=self.server,
        )
        await self.membership.start()
        await self.replicator.start()
        logger.info("instance=%s cluster mode %s started", cfg.instance, self.mode)

    def status(self) -> dict[str, Any]:
        """The ``/status`` document."""
        return self._status.snapshot()

    async def _serve_status(self, request: web.Request) -> web.StreamResponse:
        # Delegates at request time: start() replaces the StatusApi once the peers are known.
        return await self._status.status(request)

    async def stop(self) -> None:
        """Leave: end events streams, stop downloads, revoke the etcd lease. Idempotent.

        Never raises: the node's own stop (HTTP server, chunk files) must run whatever happens
        here."""
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [("events", self.server.stop)]
        if self.replicator is not None:
            replicator, self.replicator = self.replicator, None
            steps.append(("replication",
                          lambda: replicator.stop(self._config.stop_timeout / 2)))
        if self.membership is not None:
            steps.append(("membership", self.membership.stop))
        for name, step in steps:
            try:
                await step()
            except Exception:
                logger.exception("instance=%s stopping %s failed", self._config.instance, name)
