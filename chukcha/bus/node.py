"""The node: chunk store + HTTP API + rotation (+ replication and membership when clustered)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
import warnings
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any

from chukcha.bus.auth import NodeAuth, TokenFile
from chukcha.bus.chunks import ChunkStore
from chukcha.bus.cluster import Cluster
from chukcha.bus.config import NodeConfig
from chukcha.bus.coordination import etcd_errors
from chukcha.bus.group_api import GroupsApi
from chukcha.bus.groups import ConsumerGroups
from chukcha.bus.handover import HandoverReceiver, handover_path
from chukcha.bus.http import BusApi
from chukcha.bus.lag import LagApi, LagMeter
from chukcha.bus.metrics import NodeMetrics
from chukcha.bus.partitions import CategoryPartitions
from chukcha.bus.peers import PeerAccess
from chukcha.bus.retain import AckedRetention
from chukcha.bus.server import HttpServer, Router
from chukcha.bus.ui import NodeUi
from chukcha.errors import ChukchaError

__all__ = ["Node", "NodeState", "server_tls"]

logger = logging.getLogger(__name__)


class NodeState(Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Node:
    """One Chukcha node.

    ``async with Node(config) as node:`` serves until the block ends; :meth:`serve_forever`
    serves until cancelled. :attr:`address` is the bound ``host:port`` (useful with port 0).
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store = ChunkStore(
            config.data_dir,
            config.instance,
            max_chunk_size=config.max_chunk_size,
            sync_each_write=config.sync_each_write,
            group_commit=config.group_commit,
        )
        self.api = BusApi(
            self.store,
            max_batch_size=config.max_batch_size,
            max_message_size=config.max_message_size,
        )
        # Who may talk to us, and how we talk to peers (issue 12): tokens, cross-site check.
        self.tokens = TokenFile(config.auth_token_file) if config.auth_token_file else None
        self.auth = NodeAuth(self.tokens, auth_reads=config.auth_reads)
        tokens = self.tokens
        self.peer_access = PeerAccess(
            (lambda: tokens.current) if tokens is not None else None,
        )
        # Routes and per-request checks are added here; the server's parser never changes.
        self.router = Router()
        self.router.add_routes(self.api.routes())
        self.router.add_fast_routes(self.api.fast_routes())
        # Replication, membership and /status (issue 3).
        self.cluster = Cluster(config, self.store, self.peer_access)
        self.api.replicas = self.cluster.replica_waiter
        self.router.add_routes(self.cluster.routes())
        # Consumer groups and retention (issue 4): /ack with group=, /groups/*, /retention.
        self.groups = ConsumerGroups(
            self.store, peers=self.cluster.group_peers, etcd=self.cluster.group_store,
            retry_interval=config.replication.retry_interval,
            retain=AckedRetention(self.store, config.retain_acked,
                                  dict(config.retain_acked_categories)),
            access=self.peer_access,
        )
        self.api.acks = self.groups
        # Partitioned categories (issue 14): /partitions, recorded like the groups.
        self.partitions = CategoryPartitions(self.store, self.groups,
                                             self.cluster.group_store)
        self.router.add_routes(GroupsApi(self.groups).routes())
        self.router.add_routes(self.partitions.routes())
        # Operations (issue 12): /groups/lag and /metrics.
        self.lag = LagMeter(self.store, self.groups.registry)
        self.router.add_routes(LagApi(self.lag).routes())
        self.ui = NodeUi(config.instance, lambda: self.address if self._sock else "",
                         self.store, self.cluster.status, self.lag,
                         apps=self._read_apps if config.etcd_endpoints else None)
        self.router.add_routes(self.ui.routes())
        self.metrics: NodeMetrics | None = None
        # Before every handler.
        self.router.add_check(self.auth.check, only_with=self.auth.only_with)
        if config.metrics:
            self.metrics = NodeMetrics(
                config.instance, self.cluster.mode, store=self.store, groups=self.groups,
                replicator=lambda: self.cluster.replicator, lag=self.lag,
            )
            self.router.add_observer(self.metrics.observe)  # sees every answer's status
            self.router.add_routes(self.metrics.routes())
        limits = config.server
        self.server = HttpServer(self.router, dataclasses.replace(
            limits, max_body_size=config.max_batch_size,
            memory_budget=max(limits.memory_budget, config.max_batch_size),
        ))
        self._serving = False
        self.internal = HttpServer(self.router, dataclasses.replace(
            self.server.limits, max_connections=100_000, keepalive_timeout=3600.0,
        ))
        self.handovers: HandoverReceiver | None = None  # --workers: fronts' connections
        self._sock: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._state = NodeState.NEW
        self._stopped = asyncio.Event()

    async def _read_apps(self, names: list[str]) -> dict[str, Any]:
        """The partition claims of the apps ``names`` in etcd (for ``/ui``); an app etcd does
        not answer for within 2 s, or knows nothing of, is left out."""
        from chukcha.bus.app_coordination import read_app  # noqa: PLC0415 - etcd is an extra

        cfg = self.config
        apps: dict[str, Any] = {}
        for name in names:
            try:
                async with asyncio.timeout(2.0):
                    view = await read_app(cfg.etcd_endpoints, cfg.cluster, name)
            except etcd_errors(ChukchaError) as exc:
                logger.debug("app %s: no claims from etcd: %r", name, exc)
                continue
            if view.claims or view.members:
                apps[name] = {
                    "partitions": view.partitions, "members": sorted(view.members),
                    "claims": {str(p): {"owner": c.owner, "epoch": c.epoch}
                               for p, c in sorted(view.claims.items())},
                }
        return apps

    @property
    def state(self) -> NodeState:
        return self._state

    @property
    def address(self) -> str:
        """``host:port`` the node listens on."""
        if self._sock is None:
            raise RuntimeError("node is not started")
        host, port = self._sock.getsockname()[:2]
        return f"{host}:{port}"

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls_cert is not None else "http"
        return f"{scheme}://{self.address}"

    async def start(self) -> None:
        """Open the store (takes ``running.lock``), bind, and start serving."""
        if self._state is not NodeState.NEW:
            raise RuntimeError(f"node is {self._state.value}")
        cfg = self.config
        if self.tokens is not None:
            await asyncio.to_thread(self.tokens.load)  # a bad file stops the start here
        server_tls = None
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            server_tls = await asyncio.to_thread(_server_tls, cfg.tls_cert, cfg.tls_key)
        if cfg.tls_ca is not None:
            self.peer_access.ssl_context = await asyncio.to_thread(_client_tls, cfg.tls_ca)
        await asyncio.to_thread(self.store.open)
        try:
            await self.groups.start()  # the registry is loaded before any ack is served
            self._sock = self._bind()
            if cfg.serve_clients:
                await self.server.start(self._sock, ssl=server_tls)
            self._serving = True
            if cfg.internal_socket is not None:
                # --workers: the front workers hand their requests over here.
                await self.internal.start(await asyncio.to_thread(_bind_unix, cfg.internal_socket))
                if server_tls is None:  # ... and pass the connections they do not relay
                    self.handovers = HandoverReceiver(self.server,
                                                      handover_path(cfg.internal_socket))
                    await self.handovers.start()
            self._tasks.append(
                asyncio.create_task(self._rotate_forever(), name="chunk-rotation")
            )
            if self.tokens is not None:
                self._tasks.append(
                    asyncio.create_task(self.tokens.watch_forever(), name="auth-tokens")
                )
            self._tasks.append(asyncio.create_task(self.ui.sample_forever(), name="ui-rates"))
            # With TLS peers must be told to use https: etcd gets the URL, not host:port.
            await self.cluster.start(self.url if server_tls is not None else self.address)
        except BaseException:
            await self._abort_start()
            raise
        self._state = NodeState.RUNNING
        logger.info("instance=%s serving %s on http://%s", cfg.instance, cfg.data_dir, self.address)

    async def _abort_start(self) -> None:
        """Undo a start that failed part-way (whatever got started), in reverse order, so that
        nothing keeps running and ``running.lock`` is released."""
        await self.cluster.stop()  # never raises; copes with a cluster that did not start
        await self.groups.stop()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.config.stop_timeout)
        self._tasks.clear()
        if self._serving:
            self._serving = False
            if self.handovers is not None:
                self.handovers.stop()
            await self.server.stop(self.config.stop_timeout)
            await self.internal.stop(self.config.stop_timeout)
        await self._close_store()

    def _bind(self) -> socket.socket:
        cfg = self.config
        if cfg.listen_fd is not None:
            sock = socket.socket(fileno=cfg.listen_fd)
        else:
            host, port = cfg.listen
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                raise
            sock.listen(1024)
        sock.setblocking(False)
        return sock

    async def _rotate_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.rotate_interval)
            rotated = await self.store.rotate()
            if rotated:
                logger.info("instance=%s rotated %s", self.config.instance, ", ".join(rotated))

    async def stop(self) -> None:
        """Drain and stop: finish in-flight requests, flush chunks, release the lock.

        Idempotent; bounded by ``config.stop_timeout``.
        """
        if self._state in (NodeState.STOPPING, NodeState.STOPPED, NodeState.NEW):
            if self._state is NodeState.STOPPING:
                await self._stopped.wait()
            self._state = NodeState.STOPPED
            return
        self._state = NodeState.STOPPING
        try:
            # The cluster first: it ends the never-ending events streams that would otherwise
            # hold the HTTP server's graceful stop up.
            await self.cluster.stop()
            await self.groups.stop()
            for task in reversed(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=self.config.stop_timeout)
            self._tasks.clear()
            self.store.wake_waiters()  # parked long-poll reads answer now, not after wait=
            if self._serving:
                # Stops accepting, then waits (up to stop_timeout) for in-flight requests.
                self._serving = False
                if self.handovers is not None:
                    self.handovers.stop()
                await self.server.stop(self.config.stop_timeout)
                await self.internal.stop(self.config.stop_timeout)
            await self._close_store()
        finally:
            self._state = NodeState.STOPPED
            self._stopped.set()
            logger.info("instance=%s stopped", self.config.instance)

    async def _close_store(self) -> None:
        with contextlib.suppress(Exception):
            await self.store.sync()
        await asyncio.to_thread(self.store.close)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def serve_forever(self) -> None:
        """Start (if needed) and serve until cancelled; then stop gracefully."""
        if self._state is NodeState.NEW:
            await self.start()
        try:
            await asyncio.Future()
        finally:
            await asyncio.shield(self.stop())

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __del__(self) -> None:
        if self._state is NodeState.RUNNING:
            warnings.warn(f"Node {self.config.instance} was not stopped", ResourceWarning,
                          stacklevel=1)


def _bind_unix(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        Path(path).unlink()  # left by a killed predecessor
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    """The TLS context of a node serving HTTPS (front workers use it too)."""
    return _server_tls(cert, key)


def _server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def _client_tls(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca)
