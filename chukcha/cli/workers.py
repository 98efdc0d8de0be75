"""``chukcha node --workers N``: one node served by N processes (see :mod:`chukcha.bus.front`).

The process started by the command is a small supervisor: it binds one listening socket per
accepting worker on the node's address (``SO_REUSEPORT``: the kernel spreads the clients over
them evenly, where one shared socket let whichever process woke first take a burst of them),
forks the primary (the whole node, which also listens on a private unix socket; named
``chukcha-writer``) and ``N - 1`` front workers (``chukcha-front``), restarts any of them that
dies (on the same socket, which the supervisor keeps open: clients waiting in it are served by
the successor), and on SIGTERM/SIGINT stops the fronts first (their requests in flight finish),
then the primary. The workers ignore SIGINT (Ctrl-C in a terminal reaches the whole process
group: the supervisor stops them in that order). With 2 workers the writer accepts clients too;
with more it leaves them to the fronts (:func:`_writer_accepts`). Children die with the
supervisor (``PR_SET_PDEATHSIG``), so a SIGKILL of the command leaves nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import importlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Final

from chukcha.bus.config import NodeConfig
from chukcha.errors import ChukchaError
from chukcha.loop import run_loop, stop_signals

__all__ = ["run_workers"]

logger = logging.getLogger(__name__)

_STOP_SIGNALS: Final = {signal.SIGINT, signal.SIGTERM}
_WRITER_ACCEPTS_UP_TO: Final = 2
"""With at most this many workers the writer takes clients too (:func:`_writer_accepts`)."""
_EARLY_EXIT = 5.0
"""A primary that exits with an error this soon after its first start, or before it bound its
private socket, is a bad start (a held lock, a bad directory): the command exits with its code
instead of restarting it forever."""


def _die_with_parent(name: str) -> None:
    """Die with the supervisor; and be called ``name`` (``ps -o comm``, ``top``,
    ``/proc/PID/comm``: which worker is the writer, which a front)."""
    with contextlib.suppress(OSError, AttributeError):
        # The running process's own symbols (libc's among them), as in chukcha.cli.node.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        libc.prctl(15, name.encode()[:15])  # PR_SET_NAME


def _listening_socket(config: NodeConfig, *, reuse_port: bool) -> socket.socket:
    if config.listen_fd is not None:
        return socket.socket(fileno=config.listen_fd)
    host, port = config.listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Bound without SO_REUSEPORT: a port that anything listens on already (another node's
    # workers, whose sockets have the option, among them) refuses it (EADDRINUSE), as it did
    # before the workers had a socket each; with the option it would join them and take a
    # share of their clients. Set after the bind, before listen: so are the connections it
    # accepts (see _listening_sockets), and the workers' other sockets can join it.
    sock.bind((host, port))
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.listen(1024)
    return sock


def _listening_sockets(config: NodeConfig, count: int) -> list[socket.socket]:
    """``count`` listening sockets on the node's address, one per accepting worker, joined
    with ``SO_REUSEPORT`` (the kernel spreads new connections over them evenly); the first is
    the one bound or given (``--listen-fd``). Where they cannot be joined, that one alone, which
    every worker then shares.

    A socket given without ``SO_REUSEPORT`` gets it here, which works unless a connection
    waits in it already: that one was accepted without the option, and its port then refuses
    the new sockets' bind (EADDRINUSE). Give one bound with the option (``bind_loopback``
    does; systemd: ``ReusePort=yes``)."""
    first = _listening_socket(config, reuse_port=count > 1)
    socks = [first]
    if count < 2:
        return socks
    try:
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        address = first.getsockname()
        for _ in range(count - 1):
            sock = socket.socket(first.family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(1024)
    except (OSError, AttributeError) as exc:
        for sock in socks[1:]:
            sock.close()
        logger.warning("instance=%s: the workers share one listening socket (SO_REUSEPORT: "
                       "%s), so connections may spread unevenly over them", config.instance, exc)
        return [first]
    return socks


async def _serve_front(config: NodeConfig, primary_socket: str) -> None:
    from chukcha.bus.front import FrontWorker  # noqa: PLC0415 - only in front processes
    from chukcha.bus.node import server_tls  # noqa: PLC0415

    limits = dataclasses.replace(
        config.server, max_body_size=config.max_batch_size,
        memory_budget=max(config.server.memory_budget, config.max_batch_size),
    )
    front = FrontWorker(primary_socket, limits, max_message_size=config.max_message_size)
    assert config.listen_fd is not None  # noqa: S101 - run_workers sets it
    sock = socket.socket(fileno=config.listen_fd)
    sock.setblocking(False)
    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        tls = await asyncio.to_thread(server_tls, config.tls_cert, config.tls_key)
    await front.start(sock, ssl=tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in stop_signals():
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await front.stop(config.stop_timeout)


def _child(role: str, config: NodeConfig, primary_socket: str, others: list[int]) -> None:
    """The body of a forked child (forked with the stop signals blocked): never returns.
    ``others``: the listening sockets of the other workers (closed here)."""
    code = 1
    try:
        # The supervisor's handlers first, then the signals: one that came since the fork
        # (pending) now stops this child as it would have stopped the child with its own.
        # SIGINT is ignored: Ctrl-C in a terminal signals the whole process group, and the
        # supervisor, which gets it too, stops the workers in order (fronts, then the writer);
        # a worker that stopped on it at once would stop the writer under the fronts.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        _die_with_parent("chukcha-writer" if role == "primary" else "chukcha-front")
        for fd in others:
            os.close(fd)
        if role == "primary":
            from chukcha.cli.node import run_async  # noqa: PLC0415 - avoids an import cycle

            run_loop(run_async(dataclasses.replace(config, internal_socket=primary_socket)))
        else:
            run_loop(_serve_front(config, primary_socket))
        code = 0
    except (ChukchaError, OSError) as exc:
        logger.error("%s worker: %s", role, exc)  # noqa: TRY400 - one clear line
    except BaseException:
        logger.exception("%s worker failed", role)
    finally:
        logging.shutdown()
        os._exit(code)


class _Supervisor:
    """Forks the workers, restarts the one that dies (in its slot: with its listening socket,
    which the supervisor keeps open, so connections waiting in it are accepted by the next),
    and stops them: the fronts first, then the writer."""

    def __init__(self, config: NodeConfig, workers: int, primary_socket: str,
                 sockets: list[socket.socket], *, writer_accepts: bool) -> None:
        self.config = config
        self.workers = workers
        self.primary_socket = primary_socket
        self.sockets = sockets
        self.writer_accepts = writer_accepts
        self.children: dict[int, tuple[str, float, int]] = {}  # pid -> role, started, slot
        self.first_start: dict[str, float] = {}
        self.stopping = False
        self.primary_signalled = False
        self.code = 0

    def _socket_of(self, slot: int) -> socket.socket:
        """Slot 0 is the writer's, 1.. the fronts': the listening socket each accepts on
        (the writer that takes no clients gets the first, for the node's address only)."""
        if len(self.sockets) == 1 or slot == 0:
            return self.sockets[0]
        return self.sockets[slot if self.writer_accepts else slot - 1]

    def spawn(self, role: str, slot: int) -> None:
        # SIGTERM/SIGINT wait (blocked) from before the fork until the child has dropped the
        # supervisor's handlers and the supervisor knows the child. Else one that came in
        # between ran the inherited handler in the child, which then served on, or missed the
        # child in the supervisor: either way the supervisor waited for that child forever.
        own = self._socket_of(slot)
        config = dataclasses.replace(
            self.config, listen_fd=own.fileno(),
            serve_clients=self.writer_accepts or slot != 0)
        others = [s.fileno() for s in self.sockets if s is not own]
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                _child(role, config, self.primary_socket, others)
            now = time.monotonic()
            self.children[pid] = (role, now, slot)
            self.first_start.setdefault(role, now)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            logger.info("instance=%s stopping %d workers (signal)", self.config.instance,
                        self.workers)
        self.stopping = True
        self._signal("front")

    def _signal(self, role: str) -> None:
        for pid, (r, _, _) in list(self.children.items()):
            if r == role:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

    def run(self) -> None:
        self.spawn("primary", 0)
        for slot in range(1, self.workers):
            if self.stopping:  # a front forked now would never be told to stop
                break
            self.spawn("front", slot)
        logger.info("instance=%s serving from %d processes (1 writer, %d fronts; %s)",
                    self.config.instance, self.workers, self.workers - 1,
                    "one listening socket each" if len(self.sockets) > 1 else
                    "one shared listening socket")
        while self.children:
            if self.stopping and not self.primary_signalled and \
                    all(r == "primary" for r, _, _ in self.children.values()):
                # The fronts are gone (their requests answered): now the writer.
                self.primary_signalled = True
                logger.info("instance=%s the fronts stopped: stopping the writer",
                            self.config.instance)
                self._signal("primary")
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            self._reap(pid, os.waitstatus_to_exitcode(status))

    def _reap(self, pid: int, exit_code: int) -> None:
        role, started, slot = self.children.pop(pid, ("?", 0.0, -1))
        if self.stopping:
            logger.info("instance=%s %s worker %d stopped (code %d)", self.config.instance,
                        role, pid, exit_code)
            if role == "primary" and exit_code > 0:
                self.code = exit_code
            return
        if role == "primary" and exit_code > 0 and started == self.first_start["primary"] \
                and (time.monotonic() - started < _EARLY_EXIT
                     or not Path(self.primary_socket).exists()):
            # Its private socket is bound once the store is open: a first writer that never
            # got that far could not start, however long it took to fail (under load, over
            # _EARLY_EXIT; it was then restarted forever).
            logger.error("the writer process could not start (exit code %d)", exit_code)
            self.code = exit_code
            self.on_signal(signal.SIGTERM, None)
            return
        if slot < 0:
            return  # not ours (cannot happen: os.wait only reports our children)
        how = f"code {exit_code}" if exit_code >= 0 else f"signal {-exit_code}"
        logger.warning("instance=%s %s worker %d exited (%s): restarting it",
                       self.config.instance, role, pid, how)
        if time.monotonic() - started < 1.0:
            time.sleep(1.0)  # a crash loop must not spin
        self.spawn(role, slot)


def _import_before_fork() -> None:
    """Import what the writer and the fronts run, once, here, before they are forked: each
    child then starts with it in memory (shared until written) instead of importing it again.

    Why: the children's imports were most of a 4-worker node's start. With the writer and three
    fronts each importing the node's modules on the same cores (a front needs
    :mod:`chukcha.bus.node` too), the writer answered 1.7 s after the fork at load 8 where the
    imports alone take 0.2 s in a quiet process (``bench/bench_node_start.py``; the figures are in
    the README's workers paragraph). A restarted worker starts at once too. Nothing imported
    here starts a thread or opens a connection (etcd's client connects only in the writer)."""
    for module in ("chukcha.bus.node", "chukcha.bus.front"):
        importlib.import_module(module)


def run_workers(config: NodeConfig, workers: int) -> int:
    """Serve ``config`` from ``workers`` processes until SIGTERM/SIGINT; the exit code."""
    _import_before_fork()
    writer_accepts = _writer_accepts(workers)
    sockets = _listening_sockets(config, workers if writer_accepts else workers - 1)
    for sock in sockets:
        os.set_inheritable(sock.fileno(), True)
    tmp = tempfile.mkdtemp(prefix="chukcha-node-")
    supervisor = _Supervisor(config, workers, str(Path(tmp) / "writer.sock"), sockets,
                             writer_accepts=writer_accepts)
    signal.signal(signal.SIGTERM, supervisor.on_signal)
    signal.signal(signal.SIGINT, supervisor.on_signal)
    try:
        supervisor.run()
    finally:
        for sock in sockets:
            sock.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return supervisor.code


def _writer_accepts(workers: int) -> bool:
    """Whether the writer takes clients itself (its share: one listening socket of
    ``workers``), or leaves every client to the fronts.

    Why up to 2 only: on a 2-core box a write forwarded by a front costs the node more CPU in
    all (the front's HTTP work as in one process, plus the writer's share of the batch) than
    one the writer serves itself: 42.0 against 35.7 us per write at 64 connections (writer not
    accepting against accepting half the clients; ``bench/bench_vs_go.py``, docs/PERFORMANCE.md).
    With more workers the writer, the one process every write passes through, keeps its core
    for the fronts' batches, the appends and the connections handed over to it: a client it
    served would cost it a whole write's CPU (~25 us) instead of a batch's share (~7 us)."""
    return workers <= _WRITER_ACCEPTS_UP_TO
