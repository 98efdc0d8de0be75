"""Cluster membership (static ``--peers`` or etcd) and the etcd session base.

Every access to etcd (through ``aetcd``) lives in the one etcd layer: this module (the session
base :class:`EtcdWatcher` and the membership), :mod:`chukcha.bus.group_coordination` (the
consumer groups, :class:`~chukcha.bus.group_coordination.EtcdGroups`) and
:mod:`chukcha.bus.app_coordination` (the instances of an app and their partition claims),
which share the session base. :mod:`chukcha.bus.app_standbys` (the standby keys) and
:mod:`chukcha.bus.app_retries` (the ``failing`` keys of partitions whose start failed) only say
which of the instance's own keys to put and delete, through :class:`ClientKeys` over the same
session's client; they never see it. Membership is behind the small :class:`Membership`
protocol, so that the replication code never sees the etcd client and the client library can be
swapped.

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
import functools
import logging
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import orjson

from chukcha.bus.config import ETCD_EXTRA_MISSING, Peer, etcd_installed, parse_etcd_endpoint
from chukcha.bus.files import read_file, write_atomic
from chukcha.bus.tasks import log_task_crash, run_until_first_ends
from chukcha.errors import CoordinationError
from chukcha.protocol import validate_instance

# aetcd (with grpcio and protobuf) comes with the chukcha[etcd] extra; a standalone node or a
# static cluster runs without it, and a node without --etcd never imports it (grpc and protobuf
# cost a process ~0.1 s of CPU and memory): it is imported when the first client is made.

__all__ = [
    "DEFAULT_LEASE_TTL",
    "ClientKeys",
    "EtcdMembership",
    "EtcdWatcher",
    "Membership",
    "StaticMembership",
    "etcd_client",
    "etcd_errors",
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
_BASE_ERRORS: Final[tuple[type[Exception], ...]] = (CoordinationError, OSError, TimeoutError)
_errors = _BASE_ERRORS


def etcd_errors(*more: type[Exception]) -> tuple[type[Exception], ...]:
    """What a call of the etcd layer (a session, :class:`~chukcha.bus.group_coordination.
    EtcdGroups`, :mod:`~chukcha.bus.app_coordination`) raises when etcd fails (retry later):
    aetcd's errors (it wraps most gRPC errors, not all) once aetcd is imported (none can be
    raised before), and ours, and ``more``. A function, evaluated where the error is caught
    (``except etcd_errors() as exc``): the tuple grows when aetcd is first imported."""
    global _errors  # noqa: PLW0603 - set once, when aetcd is first seen imported
    if _errors is _BASE_ERRORS and "aetcd.exceptions" in sys.modules:
        import aetcd.exceptions  # noqa: PLC0415 - imported already (sys.modules)
        import aetcd.rpc  # noqa: PLC0415

        _errors = (aetcd.exceptions.ClientError, aetcd.rpc.RpcError, *_BASE_ERRORS)
    return (*_errors, *more) if more else _errors


def etcd_client(host: str, port: int, **options: Any) -> Any:
    """An ``aetcd.Client`` (aetcd imported here, on first use: see the note above)."""
    import aetcd  # noqa: PLC0415 - an optional extra (chukcha[etcd]), loaded on first use

    return aetcd.Client(host, port, timeout=_RPC_TIMEOUT, **options)

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


class ClientKeys:
    """:class:`~chukcha.bus.app_view.OwnKeys` over a session's etcd client: the puts and
    deletes that :mod:`chukcha.bus.app_standbys` and :mod:`chukcha.bus.app_retries` ask for
    (they never see the client)."""

    __slots__ = ("_client",)

    def __init__(self, client: Any) -> None:
        self._client = client

    async def put(self, key: bytes, value: bytes, lease: int | None) -> None:
        await self._client.put(key, value, lease=lease)

    async def delete(self, key: bytes) -> None:
        await self._client.delete(key)


class EtcdWatcher:
    """What :class:`EtcdMembership` and :class:`~chukcha.bus.group_coordination.EtcdGroups`
    share: a background session with etcd that watches one key prefix.

    :meth:`start` returns at once. The session is (re)established in the background, rotating
    over the endpoints with backoff for as long as etcd is unreachable; the watch resumes from
    the last revision seen (:attr:`revision`), or re-reads the prefix (:meth:`_resync`) when
    that history was compacted. Subclasses implement :meth:`_session` and :meth:`_resync`.
    """

    _what = "session"  # for task names and log lines

    def __init__(
        self, endpoints: tuple[str, ...], prefix: bytes, instance: str, retry_interval: float
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        if not etcd_installed():
            raise CoordinationError(ETCD_EXTRA_MISSING)
        self._endpoints = [parse_etcd_endpoint(e) for e in endpoints]
        self._prefix = prefix
        self._instance = instance
        self._retry = retry_interval
        self._task: asyncio.Task[None] | None = None
        self._endpoint_index = 0
        self._live: Any = None  # the client of the working session, None without one
        self.revision = 0
        self.synced = False
        """Whether the prefix has been read from etcd at least once (since start)."""

    @property
    def connected(self) -> bool:
        return self._live is not None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(
                self._run_forever(), name=f"etcd-{self._what}-{self._instance}"
            )
            self._task.add_done_callback(
                functools.partial(log_task_crash, what=f"etcd {self._what}")
            )

    async def stop(self) -> None:
        """Stop the session (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=_RPC_TIMEOUT)

    def _client(self) -> Any:
        host, port = self._endpoints[self._endpoint_index % len(self._endpoints)]
        return etcd_client(host, port, options=dict(_CHANNEL_OPTIONS))

    async def _run_forever(self) -> None:
        backoff = self._retry
        while True:
            client = self._client()
            started = time.monotonic()
            try:
                await self._session(client)
            except etcd_errors() as exc:
                if self._live is not None:
                    logger.warning("instance=%s lost etcd (%s); keeping %s", self._instance,
                                   exc, self._kept())
                else:
                    logger.debug("instance=%s etcd unreachable: %s", self._instance, exc)
            finally:
                self._live = None
                with contextlib.suppress(*etcd_errors()):
                    await client.close()
            if time.monotonic() - started > 10 * self._retry:
                backoff = self._retry  # the session had been working: retry quickly
            self._endpoint_index += 1
            await asyncio.sleep(backoff)  # retry backoff, not synchronisation
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _watch(self, client: Any) -> Any:
        """Read the prefix if never read, then watch it from the last revision seen; the
        session counts as working from here on."""
        from aetcd.exceptions import RevisionCompactedError  # noqa: PLC0415 - loaded (client)

        if not self.synced:
            await self._resync(client)
        try:
            watch = await client.watch_prefix(self._prefix, start_revision=self.revision + 1)
        except RevisionCompactedError:
            # The history since our revision is gone: re-read the whole prefix instead.
            await self._resync(client)
            watch = await client.watch_prefix(self._prefix, start_revision=self.revision + 1)
        self._live = client
        return watch

    async def _session(self, client: Any) -> None:
        raise NotImplementedError

    async def _resync(self, client: Any) -> None:
        raise NotImplementedError

    def _kept(self) -> str:
        """What stays known while etcd is away (for the log line)."""
        raise NotImplementedError


class EtcdMembership(EtcdWatcher):
    """Membership through etcd: register under a kept-alive lease, watch the peer prefix.

    :meth:`start` returns at once; connecting, registering and watching happen in the
    background and are retried (with backoff) for as long as etcd is unreachable, so a node
    starts and serves even while etcd is down. :attr:`revision` is the last etcd revision seen.
    """

    _what = "membership"

    def __init__(
        self,
        endpoints: tuple[str, ...],
        cluster: str,
        instance: str,
        address: str,
        *,
        lease_ttl: int = DEFAULT_LEASE_TTL,
        retry_interval: float = 0.2,
        remember: Path | None = None,
    ) -> None:
        super().__init__(endpoints, peers_prefix(cluster), instance, retry_interval)
        self._address = address
        self._remember = remember
        self._ttl = lease_ttl
        self._peers: dict[str, Peer] = {}
        self._listeners: list[MembershipListener] = []
        self._lease_id: int | None = None
        self._registered = asyncio.Event()
        self.sessions = 0
        """How many etcd sessions were established (reconnects + 1); for tests and status."""

    @property
    def key(self) -> bytes:
        return self._prefix + self._instance.encode()

    async def start(self) -> None:
        """Start with the peers remembered from the last run (if any), so that a node
        restarted while etcd is down replicates with them; etcd's view replaces them once it
        answers."""
        if self._task is None and self._remember is not None:
            self._peers = await asyncio.to_thread(self._recall, self._remember)
            if self._peers:
                logger.info("instance=%s starting with the last known peers %s (from %s) "
                            "until etcd answers", self._instance, sorted(self._peers),
                            self._remember)
        await super().start()

    def _recall(self, path: Path) -> dict[str, Peer]:
        raw = read_file(path)
        if raw is None:
            return {}
        try:
            doc = orjson.loads(raw)
            return {name: Peer(validate_instance(name), str(address))
                    for name, address in doc["peers"].items() if name != self._instance}
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
            logger.warning("instance=%s ignoring %s: %s", self._instance, path, exc)
            return {}

    async def _memorize(self) -> None:
        """Write the current peers to the remembered file (a failure is only logged)."""
        if self._remember is None:
            return
        doc = orjson.dumps({"peers": {n: p.address for n, p in sorted(self._peers.items())}})
        try:
            await asyncio.to_thread(write_atomic, self._remember, doc)
        except OSError as exc:
            logger.warning("instance=%s cannot remember the peers in %s: %s", self._instance,
                           self._remember, exc)

    def peers(self) -> Mapping[str, Peer]:
        return self._peers

    def add_listener(self, callback: MembershipListener) -> None:
        self._listeners.append(callback)

    async def wait_registered(self, timeout: float) -> None:
        """Wait until this node is registered in etcd (or raise ``TimeoutError``)."""
        async with asyncio.timeout(timeout):
            await self._registered.wait()

    # --- lifecycle -----------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop watching and leave the cluster (revoke the lease) if etcd answers quickly."""
        if self._task is None:
            return
        await super().stop()
        lease, self._lease_id = self._lease_id, None
        if lease is not None:
            # A graceful leave: the others see us go now instead of after the lease TTL.
            client = self._client()
            try:
                async with asyncio.timeout(2):
                    await client.revoke_lease(lease)
            except etcd_errors() as exc:
                logger.info("instance=%s could not revoke etcd lease: %s", self._instance, exc)
            finally:
                with contextlib.suppress(*etcd_errors()):
                    await client.close()

    # --- the session ---------------------------------------------------------------------

    def _kept(self) -> str:
        return f"{len(self._peers)} known peers"

    async def _session(self, client: Any) -> None:
        await self._register(client)
        watch = await self._watch(client)
        self.sessions += 1
        logger.info("instance=%s etcd session %d: watching %s from revision %d",
                    self._instance, self.sessions, self._prefix.decode(), self.revision + 1)
        tasks = [
            asyncio.create_task(self._keepalive_loop(client), name="etcd-keepalive"),
            asyncio.create_task(self._watch_loop(watch), name="etcd-watch"),
        ]
        await run_until_first_ends(tasks)  # both run until the session breaks

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
        self.synced = True
        self._set_peers(peers)
        await self._memorize()

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
            if self._set_peers(peers):
                await self._memorize()
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

    def _set_peers(self, peers: dict[str, Peer]) -> bool:
        """Make ``peers`` the membership; returns whether it changed."""
        if peers == self._peers:
            return False
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
        return True
