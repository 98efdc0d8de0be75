"""Cluster membership: who the other nodes are, static (``--peers``) or through etcd.

Every access to etcd lives in this module (through ``aetcd``), behind the small
:class:`Membership` protocol, so that the replication code never sees the etcd client and the
client library can be swapped.

etcd layout: ``chukcha/<cluster>/peers/<instance>`` = ``host:port``, put under a lease that the
node keeps alive. Every node watches the prefix, so joins and leaves are seen without restarts; a
node whose lease expired (killed, partitioned) disappears from everyone's view. When etcd is
unreachable the node keeps the peers it knows and, when etcd is back, resumes the watch from the
last revision it saw (so no join or leave in between is missed), re-registering if its lease
expired meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import aetcd
import aetcd.exceptions
import aetcd.rpc

from chukcha.bus.config import Peer, parse_etcd_endpoint
from chukcha.errors import CoordinationError
from chukcha.protocol import validate_instance

__all__ = [
    "DEFAULT_LEASE_TTL",
    "EtcdMembership",
    "Membership",
    "StaticMembership",
    "parse_etcd_endpoint",
    "peers_prefix",
]

logger = logging.getLogger(__name__)

DEFAULT_LEASE_TTL: Final = 10
"""Seconds a killed node stays registered in etcd (etcd's lease TTL; kept alive every TTL/3)."""
_RPC_TIMEOUT: Final = 5
_MAX_BACKOFF: Final = 5.0
# grpc's own reconnect backoff grows to 120 s; we reconnect ourselves, so keep its quick.
_CHANNEL_OPTIONS: Final = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}
# What a broken etcd session raises: aetcd wraps most gRPC errors, not all.
_ETCD_ERRORS: Final = (
    aetcd.exceptions.ClientError, aetcd.rpc.RpcError, CoordinationError, OSError, TimeoutError,
)

MembershipListener = Callable[[Mapping[str, Peer]], None]


class Membership(Protocol):
    """The set of other live nodes, and changes to it."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def peers(self) -> Mapping[str, Peer]:
        """The other nodes known to be members now (instance -> peer), without this node."""
        ...

    @property
    def connected(self) -> bool:
        """Whether membership is current (etcd reachable); static membership always is."""
        ...

    def add_listener(self, callback: MembershipListener) -> None:
        """Call ``callback(peers)`` (on the loop) after every change of :meth:`peers`."""
        ...


class StaticMembership:
    """The Go server's ``--peers``: a fixed list, always "connected"."""

    def __init__(self, peers: tuple[Peer, ...], instance: str) -> None:
        self._peers = {p.instance: p for p in peers if p.instance != instance}

    async def start(self) -> None:
        return

    async def stop(self) -> None:
        return

    def peers(self) -> Mapping[str, Peer]:
        return self._peers

    @property
    def connected(self) -> bool:
        return True

    def add_listener(self, callback: MembershipListener) -> None:
        # Never changes; the replicator reads peers() once at start.
        return


def peers_prefix(cluster: str) -> bytes:
    """The etcd key prefix every node of ``cluster`` registers under."""
    return f"chukcha/{cluster}/peers/".encode()


class EtcdMembership:
    """Membership through etcd: register under a kept-alive lease, watch the peer prefix.

    :meth:`start` returns at once; connecting, registering and watching happen in the
    background and are retried (with backoff) for as long as etcd is unreachable, so a node
    starts and serves even while etcd is down. :attr:`revision` is the last etcd revision seen.
    """

    def __init__(
        self,
        endpoints: tuple[str, ...],
        cluster: str,
        instance: str,
        address: str,
        *,
        lease_ttl: int = DEFAULT_LEASE_TTL,
        retry_interval: float = 0.2,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self._endpoints = [parse_etcd_endpoint(e) for e in endpoints]
        self._prefix = peers_prefix(cluster)
        self._instance = instance
        self._address = address
        self._ttl = lease_ttl
        self._retry = retry_interval
        self._peers: dict[str, Peer] = {}
        self._listeners: list[MembershipListener] = []
        self._lease_id: int | None = None
        self.revision = 0
        self._connected = False
        self._registered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._endpoint_index = 0
        self.sessions = 0
        """How many etcd sessions were established (reconnects + 1); for tests and status."""

    @property
    def key(self) -> bytes:
        return self._prefix + self._instance.encode()

    @property
    def connected(self) -> bool:
        return self._connected

    def peers(self) -> Mapping[str, Peer]:
        return self._peers

    def add_listener(self, callback: MembershipListener) -> None:
        self._listeners.append(callback)

    async def wait_registered(self, timeout: float) -> None:
        """Wait until this node is registered in etcd (or raise ``TimeoutError``)."""
        async with asyncio.timeout(timeout):
            await self._registered.wait()

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._task = asyncio.create_task(self._run_forever(), name=f"etcd-{self._instance}")
        self._task.add_done_callback(_log_crash)

    async def stop(self) -> None:
        """Stop watching and leave the cluster (revoke the lease) if etcd answers quickly."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task], timeout=_RPC_TIMEOUT)
        lease, self._lease_id = self._lease_id, None
        if lease is not None:
            # A graceful leave: the others see us go now instead of after the lease TTL.
            client = self._client()
            try:
                async with asyncio.timeout(2):
                    await client.revoke_lease(lease)
            except _ETCD_ERRORS as exc:
                logger.info("instance=%s could not revoke etcd lease: %s", self._instance, exc)
            finally:
                with contextlib.suppress(*_ETCD_ERRORS):
                    await client.close()
        self._connected = False

    # --- the session ---------------------------------------------------------------------

    def _client(self) -> Any:
        host, port = self._endpoints[self._endpoint_index % len(self._endpoints)]
        return aetcd.Client(host, port, timeout=_RPC_TIMEOUT, options=dict(_CHANNEL_OPTIONS))

    async def _run_forever(self) -> None:
        backoff = self._retry
        while True:
            client = self._client()
            started = time.monotonic()
            try:
                await self._session(client)
            except _ETCD_ERRORS as exc:
                if self._connected:
                    logger.warning("instance=%s lost etcd (%s); keeping %d known peers",
                                   self._instance, exc, len(self._peers))
                else:
                    logger.debug("instance=%s etcd unreachable: %s", self._instance, exc)
            finally:
                self._connected = False
                with contextlib.suppress(*_ETCD_ERRORS):
                    await client.close()
            if time.monotonic() - started > 10 * self._retry:
                backoff = self._retry  # the session had been working: retry quickly
            self._endpoint_index += 1
            await asyncio.sleep(backoff)  # retry backoff, not synchronisation
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _session(self, client: Any) -> None:
        await self._register(client)
        if self.revision == 0:
            await self._resync(client)
        try:
            watch = await client.watch_prefix(self._prefix, start_revision=self.revision + 1)
        except aetcd.exceptions.RevisionCompactedError:
            # The history since our revision is gone: re-read the whole prefix instead.
            await self._resync(client)
            watch = await client.watch_prefix(self._prefix, start_revision=self.revision + 1)
        self._connected = True
        self.sessions += 1
        logger.info("instance=%s etcd session %d: watching %s from revision %d",
                    self._instance, self.sessions, self._prefix.decode(), self.revision + 1)
        tasks = [
            asyncio.create_task(self._keepalive_loop(client), name="etcd-keepalive"),
            asyncio.create_task(self._watch_loop(watch), name="etcd-watch"),
        ]
        # Both run until the session breaks; the first failure ends the session (a TaskGroup
        # would wrap it in an ExceptionGroup, which the retry loop would have to unpick).
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks)
        for t in done:
            t.result()

    async def _register(self, client: Any) -> None:
        if self._lease_id is not None:
            reply = await client.refresh_lease(self._lease_id)
            if reply is not None and reply.TTL > 0:
                # Our lease survived the outage; make sure the key is still ours.
                await client.put(self.key, self._address.encode(), lease=self._lease_id)
                self._registered.set()
                return
        lease = await client.lease(self._ttl)
        self._lease_id = lease.id
        await client.put(self.key, self._address.encode(), lease=lease.id)
        self._registered.set()
        logger.info("instance=%s registered in etcd as %s=%s (lease ttl %ds)",
                    self._instance, self.key.decode(), self._address, self._ttl)

    async def _resync(self, client: Any) -> None:
        resp = await client.get_prefix(self._prefix)
        peers: dict[str, Peer] = {}
        for kv in resp:
            peer = self._peer_from(kv.key, kv.value)
            if peer is not None:
                peers[peer.instance] = peer
        self.revision = resp.header.revision
        self._set_peers(peers)

    async def _keepalive_loop(self, client: Any) -> None:
        while True:
            await asyncio.sleep(max(self._ttl / 3, 0.5))  # the keep-alive period
            lease = self._lease_id
            reply = await client.refresh_lease(lease) if lease is not None else None
            if reply is None or reply.TTL <= 0:
                logger.warning("instance=%s etcd lease expired; registering again",
                               self._instance)
                self._lease_id = None
                await self._register(client)

    async def _watch_loop(self, watch: Any) -> None:
        async for event in watch:
            kv = event.kv
            self.revision = max(self.revision, kv.mod_revision)
            peers = dict(self._peers)
            if event.kind == "PUT":
                peer = self._peer_from(kv.key, kv.value)
                if peer is not None:
                    peers[peer.instance] = peer
            else:
                peers.pop(kv.key[len(self._prefix):].decode(errors="replace"), None)
            self._set_peers(peers)
        raise CoordinationError("etcd watch ended")

    def _peer_from(self, key: bytes, value: bytes) -> Peer | None:
        name = key[len(self._prefix):].decode(errors="replace")
        if name == self._instance:
            return None
        try:
            return Peer(validate_instance(name), value.decode())
        except ValueError:
            logger.warning("ignoring etcd key %r: not a valid instance", key)
            return None

    def _set_peers(self, peers: dict[str, Peer]) -> None:
        if peers == self._peers:
            return
        joined = sorted(peers.keys() - self._peers.keys())
        left = sorted(self._peers.keys() - peers.keys())
        self._peers = peers
        logger.info("instance=%s peers now %s (joined %s, left %s)",
                    self._instance, sorted(peers), joined, left)
        for cb in list(self._listeners):
            try:
                cb(peers)
            except Exception:
                logger.exception("membership listener failed")


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("membership task crashed", exc_info=task.exception())
