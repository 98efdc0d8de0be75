"""Real nodes as subprocesses for tests, examples and benchmarks (re-exported by
:mod:`chukcha.testing`, which is where users import them from).

- :func:`bind_loopback`: a listening-ready socket on ``127.0.0.1:<free port>``.
- :class:`NodeProcess`: a node as a subprocess (so it can be killed with SIGKILL). The listening
  socket is bound here and handed to the child (``--listen-fd``), so the port is known before the
  child starts and stays the same across restarts; connections made while the child is down wait
  in the backlog instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["NodeProcess", "bind_loopback", "read_log", "spawn_node", "terminate", "wait_http_ready"]


def bind_loopback() -> socket.socket:
    """A listening TCP socket on ``127.0.0.1`` with a port the kernel picked, with
    ``SO_REUSEPORT``: a ``--workers N`` node given it (``--listen-fd``) binds one more socket on
    its port for each worker (a port picked for it is never one in use, reuse or not)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


async def wait_http_ready(
    url: str, proc: asyncio.subprocess.Process | None = None, timeout: float = 15.0
) -> None:
    """Wait until ``url`` answers 200 (one request: the socket is bound already), failing fast if
    ``proc`` exits first."""

    async def probe() -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(url) as resp:
                        if resp.status in (200, 401):  # 401: a node with --auth-reads
                            return
                except aiohttp.ClientConnectionError:
                    pass
                # Only reached when the socket refuses (not ours) or answers non-200.
                await asyncio.sleep(0.05)

    try:
        async with asyncio.timeout(timeout):
            probe_task = asyncio.create_task(probe())
            waiters: set[asyncio.Future[Any]] = {probe_task}
            exit_task = asyncio.create_task(proc.wait()) if proc is not None else None
            if exit_task is not None:
                waiters.add(exit_task)
            try:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in waiters:
                    t.cancel()
            if probe_task not in done:
                raise RuntimeError(f"process exited with {proc.returncode if proc else '?'} "
                                   f"before {url} was ready")
            probe_task.result()
    except TimeoutError:
        raise TimeoutError(f"{url} did not answer 200 within {timeout:g} s") from None


def _workers(cmd: Sequence[str]) -> int:
    """The ``--workers`` a ``chukcha node`` command line asks for (the last one wins; 1 when
    absent or not a number: the node then refuses it itself)."""
    count = "1"
    for i, arg in enumerate(cmd):
        flag, eq, value = arg.lstrip("-").partition("=")
        if flag == "workers" and arg.startswith("-"):
            count = value if eq else (cmd[i + 1] if i + 1 < len(cmd) else "")
    return int(count) if count.isdigit() and int(count) > 0 else 1


def read_log(path: Path) -> str:
    """A child process's log so far (``""`` before it wrote one), for failure messages."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


async def terminate(proc: asyncio.subprocess.Process, timeout: float) -> int:
    """SIGTERM a child and wait for it; SIGKILL if it takes longer than ``timeout``. Returns
    its exit code (a child that has already exited is only reaped)."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
    return proc.returncode if proc.returncode is not None else 0


class NodeProcess:
    """``chukcha node`` as a subprocess on a fixed loopback port.

    ``args`` are extra command-line flags. Logs go to ``<data_dir>.log``. ``own_group``: the
    node leads a process group of its own (a test can signal the whole group with
    ``os.killpg(node.proc.pid, ...)``, as Ctrl-C in a terminal does).
    """

    def __init__(
        self,
        data_dir: Path,
        instance: str,
        args: Sequence[str] = (),
        *,
        sock: socket.socket | None = None,
        own_group: bool = False,
    ) -> None:
        self.own_group = own_group
        self.data_dir = data_dir
        self.instance = instance
        self.args = list(args)
        self._sock = sock or bind_loopback()
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = data_dir.with_name(data_dir.name + ".log")

    @property
    def address(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"{host}:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    async def start(self, timeout: float | None = None) -> None:
        """Start the node and wait until it answers, failing if it exits first or takes over
        ``timeout`` seconds (default: 30, and 10 more for each worker past the first)."""
        cmd = [
            sys.executable, "-m", "chukcha", "node",
            "--instance", self.instance,
            "--dirname", str(self.data_dir),
            "--listen", self.address,
            "--listen-fd", str(self._sock.fileno()),
            *self.args,
        ]
        if not any(a.lstrip("-").startswith("workers") for a in self.args):
            # One process unless CHUKCHA_TEST_WORKERS=N (the suite's check that every guarantee
            # holds whichever worker a request lands on), whatever the machine's core count.
            cmd += ["--workers", os.environ.get("CHUKCHA_TEST_WORKERS", "1")]
        if timeout is None:
            # Every worker is a process starting on the same cores: on a loaded 2-core machine
            # (load 10) three 4-worker nodes starting at once took over 15 s to answer, and at
            # load 9-14 so did three 1-worker nodes of a cluster. Only a failure waits it out.
            timeout = 30.0 + 10.0 * (_workers(cmd) - 1)
        log = self.log_path.open("ab")
        try:
            # A session of its own, which leads a process group of its own: uvloop's
            # subprocess_exec (bench_vs_go's loop) refuses process_group, even as None.
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=log, stderr=subprocess.STDOUT, pass_fds=[self._sock.fileno()],
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=self.own_group,
            )
        finally:
            log.close()
        await wait_http_ready(f"{self.url}/listCategories", self.proc, timeout)

    async def kill(self) -> None:
        """SIGKILL: no graceful anything."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; SIGKILL if it takes longer than ``timeout``. Returns the exit code."""
        proc = self.proc
        if proc is None:
            return 0
        return await terminate(proc, timeout)

    async def restart(self) -> None:
        await self.kill()
        await self.start()

    def close(self) -> None:
        self._sock.close()

    def log_text(self) -> str:
        return read_log(self.log_path)


@contextlib.asynccontextmanager
async def spawn_node(
    data_dir: Path, instance: str = "test", args: Sequence[str] = ()
) -> AsyncIterator[NodeProcess]:
    """A :class:`NodeProcess`, started, and stopped (then killed) when the block ends."""
    node = NodeProcess(data_dir, instance, args)
    try:
        await node.start()
        yield node
    finally:
        await node.stop()
        node.close()
