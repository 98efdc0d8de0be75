"""A partition that keeps failing to start is on the app's ``/metrics`` (not only in ``chukcha
app status`` and the log): ``chukcha_app_partitions_failing`` and
``chukcha_app_partition_start_failures``. A real ``chukcha run --etcd ... --http ...`` process
(``tests.processors.failing_start_app``: each start fails while a file exists), a real node,
real etcd; once the cause goes the partitions start and the failing series go."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from chukcha.testing import EtcdServer, run_etcd, run_node
from tests.bus.test_metrics import Samples, scrape, value
from tests.integration.cluster_helpers import wait_for

pytestmark = [pytest.mark.allow_blocking, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
APP, PARTITIONS = "failing", 2  # tests.processors.failing_start_app:app


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


class _AppProcess:
    """``chukcha run`` as a subprocess; its output is kept, its HTTP address read from it."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.address: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        assert proc.stdout is not None
        self._copy = asyncio.create_task(self._read(proc.stdout))

    async def _read(self, out: asyncio.StreamReader) -> None:
        while line := await out.readline():
            text = line.decode(errors="replace")
            self.lines.append(text)
            found = re.search(r"app HTTP port on http://(\S+) ", text)
            if found and not self.address.done():
                self.address.set_result(found.group(1))
        if not self.address.done():
            self.address.set_exception(AssertionError("the app exited:\n" + self.log()))

    def log(self) -> str:
        return "".join(self.lines[-60:])

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self._copy
        assert self.proc.returncode is not None
        return self.proc.returncode


@contextlib.asynccontextmanager
async def _run_app(fail_start: Path, *args: str) -> AsyncIterator[_AppProcess]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chukcha", "run", "tests.processors.failing_start_app:app", *args,
        "--http", "127.0.0.1:0", "--log-level", "INFO",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "CHUKCHA_TEST_FAIL_START": str(fail_start)})
    app = _AppProcess(proc)
    try:
        yield app
    finally:
        await app.stop()


async def _wait(app: _AppProcess, check: Callable[[], Awaitable[bool]], what: str) -> None:
    try:
        await wait_for(check, 60, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the app's log:\n{app.log()}") from None


async def test_partitions_that_keep_failing_to_start_are_on_the_metrics_until_they_start(
        tmp_path: Path, etcd: EtcdServer) -> None:
    fail_start = tmp_path / "fail-start"
    fail_start.touch()  # every start fails until it is gone
    async with contextlib.AsyncExitStack() as stack:
        node = await stack.enter_async_context(run_node(tmp_path / "data"))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        app = await stack.enter_async_context(_run_app(
            fail_start, "--node", node.url, "--etcd", etcd.endpoint, "--cluster", "test",
            "--instance", "i1", "--state-dir", str(tmp_path / "state")))
        try:
            async with asyncio.timeout(60):
                url = "http://" + await app.address
        except TimeoutError:
            raise AssertionError("no HTTP port in 60 s:\n" + app.log()) from None
        m: Samples = {}

        async def failing_twice() -> bool:
            nonlocal m
            m = await scrape(http, url)
            return value(m, "chukcha_app_partitions_failing", app=APP) == PARTITIONS and all(
                value(m, "chukcha_app_partition_start_failures", app=APP, partition=str(p))
                >= 2 for p in range(PARTITIONS))

        await _wait(app, failing_twice, "every partition failing to start, twice")
        assert value(m, "chukcha_app_partitions_owned", app=APP) == 0
        assert "could not start" in app.log()

        fail_start.unlink()  # the cause goes: the next tries start them

        # A partition is owned (and counted) as soon as it starts; its failures are forgotten
        # right after (Retries.started): wait for both, the failing metrics gone for good.
        async def started() -> bool:
            nonlocal m
            m = await scrape(http, url)
            return (value(m, "chukcha_app_partitions_owned", app=APP) == PARTITIONS
                    and value(m, "chukcha_app_partitions_failing", app=APP) == 0
                    and not [k for k in m if k[0] == "chukcha_app_partition_start_failures"])

        await _wait(app, started, "every partition started, and none failing, once the cause "
                                  "went")
        assert await app.stop() == 0, app.log()
