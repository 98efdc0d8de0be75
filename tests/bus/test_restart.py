"""Restart continuity, ``running.lock``, graceful SIGTERM and the fsync knobs."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from chukcha.bus.config import NodeConfig
from chukcha.bus.node import Node
from chukcha.errors import AlreadyRunningError
from chukcha.testing import NodeProcess, bind_loopback, run_node
from tests.bus.conftest import Api, disk_state, read_file


def chunk(i: int, owner: str = "moscow") -> str:
    return f"{owner}-chunk{i:09d}"


async def test_restart_continues_numbering_and_never_appends_to_an_old_chunk(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = tmp_path / "data"
    async with run_node(data, instance="moscow") as node:
        await Api(http, node.url).write("c", b"before\n")
    async with run_node(data, instance="moscow") as node:
        api = Api(http, node.url)
        # The old chunk is complete at once: readers can finish it and move on.
        assert await api.list_chunks("c") == [
            {"name": chunk(0), "complete": True, "size": 7},
            {"name": chunk(1), "complete": False, "size": 0},
        ]
        await api.write("c", b"after\n")
    async with run_node(data, instance="moscow") as node:
        api = Api(http, node.url)
        await node.store.rotate()
        assert [c["name"] for c in await api.list_chunks("c")] == [chunk(0), chunk(1), chunk(2)]
    # An empty last chunk is not reused either (as the Go server does): the next write starts
    # a new chunk, and the empty one is complete, so readers ack it and move on.
    async with run_node(data, instance="moscow") as node:
        api = Api(http, node.url)
        await api.write("c", b"third\n")
        assert await api.read("c", chunk(3)) == b"third\n"
        assert (await api.list_chunks("c"))[2] == {"name": chunk(2), "complete": True,
                                                    "size": 0}
    state = await disk_state(data / "c")
    assert state == {chunk(0): 7, chunk(1): 6, chunk(2): 0, chunk(3): 6}


async def test_numbering_counts_tombstones_and_other_owners_do_not_matter(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = tmp_path / "data"

    def make() -> None:
        (data / "c").mkdir(parents=True)
        (data / "c" / f"{chunk(2)}").write_bytes(b"old\n")
        (data / "c" / f"{chunk(5)}.acknowledged").write_bytes(b"")
        (data / "c" / f"{chunk(9, 'kazan')}").write_bytes(b"k\n")

    await asyncio.to_thread(make)
    async with run_node(data, instance="moscow") as node:
        api = Api(http, node.url)
        await api.write("c", b"new\n")
        names = [c["name"] for c in await api.list_chunks("c")]
        assert names == [chunk(9, "kazan"), chunk(2), chunk(6)]
        assert await api.read("c", chunk(6)) == b"new\n"
    assert (await disk_state(data / "c"))[chunk(2)] == 4


async def test_a_partial_trailing_message_is_cut_on_start(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = tmp_path / "data"

    def make() -> None:
        (data / "c").mkdir(parents=True)
        (data / "c" / chunk(0)).write_bytes(b"a\nbb\nparti")  # a crash mid-write
        (data / "c" / chunk(0, "kazan")).write_bytes(b"k\nhal")
        (data / "c" / chunk(3, "amur")).write_bytes(b"no newline at all")
        (data / "c" / f"{chunk(1, 'kazan')}.acknowledged").write_bytes(b"junk")

    await asyncio.to_thread(make)
    async with run_node(data, instance="moscow") as node:
        api = Api(http, node.url)
        assert await api.read("c", chunk(0)) == b"a\nbb\n"
        assert await api.read("c", chunk(0), 5) == b""
        assert await api.read("c", chunk(0, "kazan")) == b"k\n"
        assert await api.read("c", chunk(3, "amur")) == b""
        await api.write("c", b"next\n")
        assert [(c["name"], c["size"]) for c in await api.list_chunks("c")] == [
            (chunk(3, "amur"), 0), (chunk(0, "kazan"), 2), (chunk(0), 5), (chunk(1), 5),
        ]
    state = await disk_state(data / "c")
    assert state == {
        chunk(0): 5, chunk(1): 5, chunk(0, "kazan"): 2, chunk(3, "amur"): 0,
        f"{chunk(1, 'kazan')}.acknowledged": 0,  # a crash between rename and truncate
    }


async def test_second_node_on_the_same_dir_refuses_in_process(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with run_node(data, instance="moscow"):
        second = Node(NodeConfig(instance="moscow", data_dir=data, listen=("127.0.0.1", 0)))
        with pytest.raises(AlreadyRunningError, match="in use by another chukcha node"):
            await second.start()
        # Even under another instance name: the directory is what is locked.
        other = Node(NodeConfig(instance="kazan", data_dir=data, listen=("127.0.0.1", 0)))
        with pytest.raises(AlreadyRunningError, match=r"running\.lock"):
            await other.start()
    # Released on stop: the next node starts.
    async with run_node(data, instance="moscow") as node:
        assert node.url.startswith("http://127.0.0.1:")


def _try_lock(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops the lock again
    return True


@pytest.mark.allow_blocking
async def test_second_chukcha_node_process_refuses_with_a_clear_message(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with run_node(data, instance="moscow"):
        proc = NodeProcess(data, "moscow")
        try:
            with pytest.raises(RuntimeError, match="exited with 1"):
                await proc.start()
        finally:
            await proc.stop()
            proc.close()
        log = proc.log_text()
        assert "in use by another chukcha node" in log
        assert "Traceback" not in log
        assert not await asyncio.to_thread(_try_lock, data / "running.lock")
    assert await asyncio.to_thread(_try_lock, data / "running.lock")


# ``chukcha node`` with ``_EARLY_EXIT`` (the supervisor's window for "the writer could not start")
# at 0 s: what a failing start that takes longer than the window looks like.
_SLOW_FAILING_START = """\
import runpy, sys
import chukcha.cli.workers
chukcha.cli.workers._EARLY_EXIT = 0.0
sys.argv = ["chukcha", *sys.argv[1:]]
runpy.run_module("chukcha", run_name="__main__")
"""


@pytest.mark.allow_blocking
async def test_workers_exit_when_the_writer_cannot_start_however_long_it_took(
    tmp_path: Path,
) -> None:
    """``--workers``: a writer whose first start fails (here: the lock is held) ends the command
    with its code, whatever the time it took to fail. Under load (CHUKCHA_TEST_WORKERS=4, load
    20 on 2 cores) such a start took over the supervisor's 5 s window and the command restarted
    the writer forever instead of exiting."""
    data = tmp_path / "data"
    async with run_node(data, instance="moscow"):
        sock = bind_loopback()
        host, port = sock.getsockname()[:2]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _SLOW_FAILING_START, "node", "--instance", "moscow",
            "--dirname", str(data), "--listen", f"{host}:{port}",
            "--listen-fd", str(sock.fileno()), "--workers", "2",
            pass_fds=[sock.fileno()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(30):
                out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            sock.close()
        assert proc.returncode == 1, out.decode(errors="replace")
        assert b"in use by another chukcha node" in out
        assert b"restarting it" not in out


@pytest.mark.allow_blocking
async def test_sigterm_finishes_in_flight_writes_and_exits_0(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = tmp_path / "data"
    proc = NodeProcess(data, "moscow")
    await proc.start()
    acked: list[bytes] = []
    enough = asyncio.Event()
    try:

        async def writer(w: int) -> None:
            for i in range(100_000):
                body = b"".join(b"w%d-%d-%d %s\n" % (w, i, k, b"p" * 200) for k in range(50))
                try:
                    async with http.post(f"{proc.url}/write?category=c", data=body) as r:
                        if r.status != 200:
                            return
                except aiohttp.ClientError:
                    return
                acked.append(body)
                if len(acked) >= 40:
                    enough.set()

        async with asyncio.timeout(60):
            writers = [asyncio.create_task(writer(w)) for w in range(6)]
            try:
                await enough.wait()
                assert proc.proc is not None
                proc.proc.terminate()  # SIGTERM while writes are in flight
                code = await proc.proc.wait()
            finally:
                # Requests sent after the node closed its listener wait in the backlog of the
                # socket this test holds: they will never be answered.
                for t in writers:
                    t.cancel()
                await asyncio.gather(*writers, return_exceptions=True)
    finally:
        await proc.stop()
        proc.close()
    assert code == 0, proc.log_text()
    content = await read_file(data / "c" / chunk(0))
    assert content.endswith(b"\n")
    for body in acked:
        assert content.count(body) == 1
    # Nothing partial: the file holds whole messages of whole bodies only.
    lines = content.split(b"\n")[:-1]
    assert len(lines) % 50 == 0
    assert all(re.fullmatch(rb"w\d-\d+-\d+ p{200}", line) for line in lines)
    assert await asyncio.to_thread(_try_lock, data / "running.lock")


class _FsyncSpy:
    """Counts real fsync calls on the chunk files of a directory (os.fsync still runs)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.calls = 0
        self._real: Callable[[int], None] = os.fsync

    def __call__(self, fd: int) -> None:
        target = str(Path(f"/proc/self/fd/{fd}").readlink())
        if target.startswith(str(self.directory)) and "-chunk" in target:
            self.calls += 1
        self._real(fd)


async def test_sync_parameter_and_sync_each_write_fsync_before_answering(
    tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    spy = _FsyncSpy(data / "c")
    monkeypatch.setattr(os, "fsync", spy)
    async with run_node(data, instance="moscow") as node:
        api = Api(http, node.url)
        await api.write("c", b"plain\n")
        assert spy.calls == 0  # default: page cache only
        await api.write("c", b"synced\n", sync=1)
        assert spy.calls == 1
        await api.write("c", b"x\n", sync="true")
        assert spy.calls == 2
    spy.calls = 0
    async with run_node(data, instance="moscow", sync_each_write=True) as node:
        api = Api(http, node.url)
        await api.write("c", b"a\n")
        await api.write("c", b"b\n")
        assert spy.calls == 2
        assert await api.read("c", chunk(1)) == b"a\nb\n"


@pytest.mark.allow_blocking
async def test_sync_each_write_data_survives_sigkill(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = tmp_path / "data"
    proc = NodeProcess(data, "moscow", ["-sync-each-write"])
    await proc.start()
    try:
        api = Api(http, proc.url)
        for i in range(20):
            await api.write("c", b"durable %d\n" % i)
        await api.write("c", b"per-request\n", sync=1)
        await proc.kill()
    finally:
        await proc.stop()
        proc.close()
    expected = b"".join(b"durable %d\n" % i for i in range(20)) + b"per-request\n"
    assert await read_file(data / "c" / chunk(0)) == expected
