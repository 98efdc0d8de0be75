"""Node configuration: one frozen dataclass per component, composed by :class:`NodeConfig`."""

from __future__ import annotations

import importlib.util
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from chukcha.bus.server import ServerLimits
from chukcha.protocol import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_CHUNK_SIZE,
    DEFAULT_ROTATE_INTERVAL,
    MAX_MESSAGE_SIZE,
    validate_instance,
)

__all__ = [
    "ETCD_EXTRA_MISSING",
    "NodeConfig",
    "Peer",
    "ReplicationConfig",
    "default_instance_name",
    "etcd_installed",
    "parse_etcd_endpoint",
    "parse_peers",
]

ETCD_EXTRA_MISSING = (
    "etcd support is not installed (--etcd needs the aetcd package): "
    "pip install 'chukcha[etcd]'"
)


def etcd_installed() -> bool:
    """Whether the ``chukcha[etcd]`` extra (the aetcd client) is installed."""
    return importlib.util.find_spec("aetcd") is not None


@dataclass(frozen=True, slots=True)
class Peer:
    """Another node of the cluster: its instance name and ``host:port`` address."""

    instance: str
    address: str

    @property
    def url(self) -> str:
        return self.address if "://" in self.address else f"http://{self.address}"


def parse_peers(text: str) -> tuple[Peer, ...]:
    """Parse the Go ``--peers`` syntax: ``"a=127.0.0.1:8080,b=127.0.0.1:8081"``."""
    peers: list[Peer] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, addr = item.partition("=")
        if not sep or not name.strip() or not addr.strip():
            raise ValueError(f"invalid peer {item!r}: expected NAME=HOST:PORT")
        peers.append(Peer(validate_instance(name.strip()), addr.strip()))
    return tuple(peers)


def parse_etcd_endpoint(url: str) -> tuple[str, int]:
    """``http://127.0.0.1:2379`` (or ``127.0.0.1:2379``) -> ``("127.0.0.1", 2379)``."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    try:
        port = parts.port or 2379
    except ValueError:
        port = -1
    if parts.scheme != "http" or not parts.hostname or port < 0 or parts.path not in ("", "/"):
        raise ValueError(f"invalid etcd endpoint {url!r}: expected http://HOST:PORT")
    return parts.hostname, port


def default_instance_name() -> str:
    """The host name, made into a valid instance name."""
    name = socket.gethostname().split(".")[0] or "chukcha"
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)


@dataclass(frozen=True, slots=True)
class ReplicationConfig:
    """Replication settings.

    Attributes:
        batch_size: bytes asked per ``/read`` while downloading a peer's chunk (default 4 MiB).
        retry_interval: seconds between attempts to reach a failed peer (default 1 s).
        dead_peer_timeout: seconds after which an owner that is gone has its last chunk treated
            as complete, so readers move past it (default 1 h).
        min_sync_timeout: how long a ``min_sync_replicas`` write waits (default 60 s).
        poll_wait: the ``/read?wait=`` long poll a replica holds open on a peer's open chunk
            (default 10 s). Data arrives the moment it is written whatever this is; it only
            bounds how long an idle poll lasts (an idle replica makes one request per period)
            and how long a peer's graceful stop may wait for it.
        lease_ttl: etcd lease TTL in seconds (default 10): how long a killed node stays
            registered.
    """

    batch_size: int = 4 << 20
    retry_interval: float = 1.0
    dead_peer_timeout: float = 3600.0
    min_sync_timeout: float = 60.0
    poll_wait: float = 10.0
    lease_ttl: int = 10

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if self.retry_interval <= 0 or self.dead_peer_timeout <= 0 or self.min_sync_timeout <= 0:
            raise ValueError("replication intervals must be positive")
        if not 0 < self.poll_wait <= 60 or self.lease_ttl < 2:
            raise ValueError("poll_wait must be in (0, 60] and lease_ttl at least 2 s")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything one node needs; the command line builds it in :mod:`chukcha.cli.node`.

    Attributes:
        instance: this node's name; chunk files it owns start with it.
        data_dir: where chunks live (``<data_dir>/<category>/<instance>-chunk<N>``).
        listen: ``(host, port)``; port 0 picks a free port (see ``Node.address``).
        listen_fd: an already bound listening socket to serve on instead of ``listen``
            (socket activation; tests use it to restart a node on the same port).
        peers: the static peer list (``--peers``); ignored for membership when etcd is used.
        max_chunk_size: a new chunk is started when a write would take the current one past
            this (default 20 MiB).
        rotate_interval: a non-empty current chunk is closed this often (default 10 min).
        max_batch_size: largest write body (default 4 MiB).
        max_message_size: largest message (default 1 MiB).
        sync_each_write: fsync every write before answering (default off: page cache).
        group_commit: durable writes (``sync=1``, ``sync_each_write``) that arrive together
            share one fsync (default on); off, each pays its own under the category lock.
        etcd_endpoints: etcd URLs; empty means no etcd.
        cluster: the cluster name, the etcd key prefix ``chukcha/<cluster>/``.
        stop_timeout: seconds a graceful stop may take.
        retain_acked: keep a chunk every consumer acknowledged this many seconds before it is
            tombstoned, so it can be replayed (``None``, the default: tombstone at once, as
            the Go server does); see :mod:`chukcha.bus.retain`.
        retain_acked_categories: ``(category, seconds or None)`` overrides of
            ``retain_acked``.
        auth_token_file: accept only requests bearing one of the tokens in this file (for
            changes; for everything with ``auth_reads``), and present its first token to peers;
            see :mod:`chukcha.bus.auth`. ``None`` (default): no tokens, Go-compatible.
        auth_reads: require a token for reads too.
        tls_cert: serve HTTPS with this certificate (PEM, with its chain); needs ``tls_key``.
        tls_key: the certificate's private key (PEM).
        tls_ca: CA certificate(s) to trust for ``https://`` peers (default: the system's).
        metrics: serve ``/metrics`` and time every request (default on; see
            :mod:`chukcha.bus.metrics` and ``bench/bench_metrics.py`` for the cost).
        server: connection and memory limits of the HTTP server (its body limit is
            ``max_batch_size``).
        internal_socket: with ``--workers``, the unix socket path where this (primary)
            process also serves the front workers' requests.
        serve_clients: whether the node accepts clients on its listening socket (default);
            off for the writer of ``--workers N`` when its fronts take every client (the
            socket then only names the node's address).
    """

    instance: str
    data_dir: Path
    listen: tuple[str, int] = ("127.0.0.1", 8080)
    listen_fd: int | None = None
    peers: tuple[Peer, ...] = ()
    max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE
    rotate_interval: float = DEFAULT_ROTATE_INTERVAL
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_message_size: int = MAX_MESSAGE_SIZE
    sync_each_write: bool = False
    group_commit: bool = True
    etcd_endpoints: tuple[str, ...] = ()
    cluster: str = "default"
    stop_timeout: float = 10.0
    metrics: bool = True
    auth_token_file: Path | None = None
    auth_reads: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    retain_acked: float | None = None
    retain_acked_categories: tuple[tuple[str, float | None], ...] = ()
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    server: ServerLimits = field(default_factory=ServerLimits)
    internal_socket: str | None = None
    serve_clients: bool = True

    def _check_operations(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.auth_reads and self.auth_token_file is None:
            raise ValueError("--auth-reads needs --auth-token-file")
        for _, period in [("", self.retain_acked), *self.retain_acked_categories]:
            if period is not None and period <= 0:
                raise ValueError("retain_acked must be positive (None: off)")

    def __post_init__(self) -> None:
        validate_instance(self.instance)
        if self.max_chunk_size <= 0:
            raise ValueError("max_chunk_size must be positive")
        if self.rotate_interval <= 0:
            raise ValueError("rotate_interval must be positive")
        if not 0 < self.max_message_size <= self.max_batch_size:
            raise ValueError("max_message_size must be positive and at most max_batch_size")
        if self.stop_timeout <= 0:
            raise ValueError("stop_timeout must be positive")
        self._check_operations()
        for endpoint in self.etcd_endpoints:
            parse_etcd_endpoint(endpoint)
        if self.etcd_endpoints:
            if not etcd_installed():
                raise ValueError(ETCD_EXTRA_MISSING)
            try:
                validate_instance(self.cluster)  # it becomes part of an etcd key
            except ValueError as exc:
                raise ValueError(f"invalid cluster name: {exc}".replace("instance ", "")) from None
        if any(p.instance == self.instance for p in self.peers):
            # The Go server's --peers lists the other nodes; a start-up script that lists every
            # node (itself included) is common, so the own entry is dropped, not refused.
            object.__setattr__(
                self, "peers", tuple(p for p in self.peers if p.instance != self.instance)
            )
