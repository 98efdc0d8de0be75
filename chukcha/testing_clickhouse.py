"""A real ClickHouse server on loopback, for tests, examples and benchmarks.

:func:`run_clickhouse` starts ``clickhouse-server`` (Debian's package; the official packages'
``clickhouse server`` works too) with its own config and data directory, HTTP interface only, on
``127.0.0.1``. ClickHouse cannot take an inherited socket, so the port is found by binding port 0
and closing it right before the start; if another process takes it in between, the server fails
with "Address already in use" and is started again on a new port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import aiohttp

__all__ = ["ClickHouseError", "ClickHouseServer", "clickhouse_command", "run_clickhouse"]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin",
                                "/usr/local/bin", "/usr/local/sbin"])

_CONFIG = """<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <console>1</console>
    </logger>
    <http_port>{port}</http_port>
    <listen_host>127.0.0.1</listen_host>
    <path>{data}/</path>
    <tmp_path>{data}/tmp/</tmp_path>
    <user_files_path>{data}/user_files/</user_files_path>
    <format_schema_path>{data}/format_schemas/</format_schema_path>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <max_concurrent_queries>100</max_concurrent_queries>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mlock_executable>false</mlock_executable>
    <profiles><default></default></profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas><default></default></quotas>
</yandex>
"""


class ClickHouseError(RuntimeError):
    """ClickHouse answered a query with an error (``status`` is the HTTP status)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


def clickhouse_command(config_file: Path) -> list[str]:
    """The command line that starts a ClickHouse server with ``config_file``.

    Raises:
        FileNotFoundError: neither ``clickhouse-server`` nor ``clickhouse`` is installed
            (``scripts/install-system-deps.sh`` installs Debian's ``clickhouse-server``).
    """
    if server := shutil.which("clickhouse-server", path=_SEARCH_PATH):
        return [server, f"--config-file={config_file}"]
    if multi := shutil.which("clickhouse", path=_SEARCH_PATH):
        return [multi, "server", f"--config-file={config_file}"]
    raise FileNotFoundError(
        "clickhouse-server is not installed (run scripts/install-system-deps.sh)"
    )


@dataclass(frozen=True, slots=True)
class ClickHouseServer:
    """A running server: ``url`` is its HTTP interface, ``log_path`` its console log."""

    url: str
    pid: int
    log_path: Path

    async def query(self, sql: str, body: bytes | None = None, timeout: float = 30.0) -> str:
        """Run one statement over HTTP (``body``, if any, is the data of an ``INSERT``).

        Raises:
            ClickHouseError: the server answered with an error.
        """
        params = {"query": sql}
        async with asyncio.timeout(timeout), aiohttp.ClientSession() as session:
            if body is None:
                req = session.post(self.url, data=sql.encode())
            else:
                req = session.post(self.url, params=params, data=body)
            async with req as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise ClickHouseError(text.strip(), status=resp.status)
                return text


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the process that started it dies, so a test
    run that is killed does not leave ClickHouse servers behind (Linux only; elsewhere a no-op).
    """
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _prepare(root: Path, port: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = root / "config.xml"
    config.write_text(_CONFIG.format(port=port, data=escape(str(data))))
    return config


def _read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


async def _wait_ping(url: str, proc: asyncio.subprocess.Process) -> bool:
    """True when ``/ping`` answers "Ok."; False when the process exits first."""

    async def probe() -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"{url}/ping") as resp:
                        if resp.status == 200 and (await resp.text()).strip() == "Ok.":
                            return
                # The port is not bound until the server has loaded its metadata; there is
                # nothing to wait on but the socket itself, so probe it at a short interval.
                await asyncio.sleep(0.05)

    probe_task = asyncio.create_task(probe(), name="clickhouse-ping")
    exit_task = asyncio.create_task(proc.wait(), name="clickhouse-exit")
    try:
        done, _ = await asyncio.wait(
            {probe_task, exit_task}, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for task in (probe_task, exit_task):
            task.cancel()
        await asyncio.gather(probe_task, exit_task, return_exceptions=True)
    return probe_task in done and not probe_task.cancelled() and probe_task.exception() is None


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()


@contextlib.asynccontextmanager
async def run_clickhouse(
    root: Path, *, timeout: float = 60.0, attempts: int = 5
) -> AsyncIterator[ClickHouseServer]:
    """Run a ClickHouse server with config and data under ``root`` until the block ends.

    Waits (under ``timeout``) until ``GET /ping`` answers ``Ok.``; kills the server on exit.
    """
    log_path = root / "clickhouse.log"
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        port = _free_port()
        config = await asyncio.to_thread(_prepare, root, port)
        cmd = await asyncio.to_thread(clickhouse_command, config)
        log = await asyncio.to_thread(log_path.open, "wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=root, start_new_session=True, preexec_fn=_die_with_parent,
            )
        finally:
            await asyncio.to_thread(log.close)
        url = f"http://127.0.0.1:{port}"
        try:
            async with asyncio.timeout(timeout):
                ready = await _wait_ping(url, proc)
        except BaseException:
            await _kill(proc)
            raise
        if not ready:
            text = await asyncio.to_thread(_read_log, log_path)
            await _kill(proc)
            if "Address already in use" in text and attempt < attempts:
                logger.info("clickhouse port %d was taken, retrying on another", port)
                continue
            raise RuntimeError(
                f"clickhouse-server exited with {proc.returncode}: {text[-2000:]}"
            )
        logger.info("clickhouse started url=%s pid=%d", url, proc.pid)
        try:
            yield ClickHouseServer(url=url, pid=proc.pid, log_path=log_path)
        finally:
            await _kill(proc)
            logger.info("clickhouse stopped url=%s", url)
        return
    raise AssertionError("unreachable")  # pragma: no cover
