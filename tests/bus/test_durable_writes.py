"""``sync=1`` writes over HTTP, on the fast path with group commit: no answer before an fsync
that began after the write's bytes were in the chunk (and, for a chunk's first durable write,
an fsync of the directory after the chunk's creation); a failed fsync answers 500 to each
write it covered. ``os.fsync`` is wrapped to log what each call covered (in completion order,
beside the answers as the client reads them) and can be held shut or made to fail."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chukcha.bus.node import Node
from chukcha.testing import run_node
from tests.bus.conftest import front_and_writer, read_file
from tests.bus.test_metrics import scrape, value


@dataclass
class Hold:
    """Holds one chunk fsync in its worker thread until released (then it fails if told)."""

    released: threading.Event = field(default_factory=threading.Event)
    fail: bool = False


@dataclass
class Disk:
    """The log: ("fsync", file name, its size when the fsync began) once it ended, ("dir",
    directory name, the chunks in it when it began), ("answer", status line, body).

    ``holds``: the next chunk fsyncs each take the first hold left and wait for its release;
    ``held``: the fsyncs waiting now. ``fail``: every fsync fails."""

    log: list[tuple[str, str, object]] = field(default_factory=list)
    fail: bool = False
    holds: list[Hold] = field(default_factory=list)
    held: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hold(self, n: int = 1) -> list[Hold]:
        new = [Hold() for _ in range(n)]
        with self.lock:
            self.holds += new
        return new

    def chunk_fsyncs(self) -> list[tuple[str, int]]:
        return [(name, int(str(size))) for kind, name, size in self.log if kind == "fsync"]


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    real = os.fsync
    disk = Disk()

    def fsync(fd: int) -> None:
        path = Path(f"/proc/self/fd/{fd}").readlink()
        st = os.fstat(fd)
        hold = None
        if stat.S_ISDIR(st.st_mode):
            names = sorted(p.name for p in path.iterdir())
            entry: tuple[str, str, object] = ("dir", path.name, names)
        else:
            entry = ("fsync", path.name, st.st_size)
            with disk.lock:
                hold = disk.holds.pop(0) if disk.holds else None
                disk.held += hold is not None
        if hold is not None:
            assert hold.released.wait(30), "the test never released the fsync"
            with disk.lock:
                disk.held -= 1
        if disk.fail or (hold is not None and hold.fail):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)
        disk.log.append(entry)

    monkeypatch.setattr(os, "fsync", fsync)
    yield disk
    for hold in disk.holds:
        hold.released.set()


def _post(query: str, body: bytes) -> bytes:
    return b"POST /write?%b HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%b" % (
        query.encode(), len(body), body)


def _port(node: Node) -> int:
    return int(node.address.rsplit(":", 1)[1])


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def _conns(port: int, n: int) -> AsyncIterator[list[Conn]]:
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]
    try:
        yield conns
    finally:
        for _, writer in conns:
            writer.close()


@asynccontextmanager
async def _node_with_synced_category(
    tmp_path: Path, conns: int, first: bytes = b"0\n", **options: Any
) -> AsyncIterator[tuple[Node, aiohttp.ClientSession, list[Conn]]]:
    """A node (``options`` for :func:`run_node`) whose category ``c`` a durable write of
    ``first`` created (answered 200), a client session and ``conns`` raw connections to it."""
    async with run_node(tmp_path / "data", "moscow", **options) as node, \
            aiohttp.ClientSession() as http, _conns(_port(node), conns) as raw:
        async with http.post(f"{node.url}/write", params={"category": "c", "sync": "1"},
                             data=first) as r:
            assert r.status == 200
        yield node, http, raw


async def _answer(reader: asyncio.StreamReader, disk: Disk) -> tuple[bytes, bytes]:
    async with asyncio.timeout(30):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
        body = await reader.readexactly(length)
    status = head.split(b"\r\n", 1)[0]
    disk.log.append(("answer", status.decode(), body))
    return status, body


def _check_answers_follow_their_fsyncs(disk: Disk, chunk: str, data: bytes,
                                       bodies: list[bytes]) -> None:
    """The 200s for ``bodies`` (their ends in ``data``, the chunk's bytes): the k-th of them
    comes after an fsync of ``chunk`` that covered at least the k smallest ends (the answers
    are empty: which write each one answers, the log cannot tell), and after an fsync of the
    directory that saw the chunk's entry."""
    ends = sorted(data.index(b) + len(b) for b in bodies)
    covered, dir_seen, answered = 0, False, 0
    for kind, name, what in disk.log:
        if kind == "fsync" and name == chunk:
            covered = max(covered, int(str(what)))
        elif kind == "dir" and isinstance(what, list) and chunk in what:
            dir_seen = True
        elif kind == "answer" and name.endswith("200 OK"):
            answered += 1
            assert answered <= len(ends), disk.log
            assert covered >= ends[answered - 1], f"answer {answered} came before its fsync"
            assert dir_seen, "answered before the chunk's directory entry was synced"
    assert answered == len(ends)


async def _send_all(conns: list[Conn], query: str, bodies: list[bytes]) -> None:
    for (_, writer), body in zip(conns, bodies, strict=True):
        writer.write(_post(query, body))
    await asyncio.gather(*(writer.drain() for _, writer in conns))


async def _names(directory: Path) -> list[str]:
    return await asyncio.to_thread(lambda: sorted(p.name for p in directory.iterdir()))


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(30):
        while not condition():  # noqa: ASYNC110 - polled: no push to wait on
            await asyncio.sleep(0.005)


async def test_sync_writes_share_fsyncs_that_begin_after_them(
    tmp_path: Path, disk: Disk
) -> None:
    async with run_node(tmp_path / "data", "moscow") as node, \
            aiohttp.ClientSession() as http, _conns(_port(node), 30) as conns:
        cat_dir = node.config.data_dir / "c"
        # Created by a plain write: its directory entry was never synced.
        async with http.post(f"{node.url}/write", params={"category": "c"}, data=b"0\n") as r:
            assert r.status == 200
        chunk = (await _names(cat_dir))[0]
        holds = disk.hold(2)  # the first two fsyncs wait in their threads
        bodies = [b"sync-%02d\n" % i for i in range(30)]
        await _send_all(conns[:1], "category=c&sync=1", bodies[:1])
        await _until(lambda: disk.held == 1)
        await _send_all(conns[1:2], "category=c&sync=1", bodies[1:2])
        await _until(lambda: disk.held == 2)
        await _send_all(conns[2:], "category=c&sync=1", bodies[2:])
        cat = node.store._categories["c"]  # the queue the writes wait in
        await _until(lambda: cat.sync_waiters == 30)  # all 30 wait for an fsync
        # Nothing answered, nothing synced yet (but the data directory, when the plain write
        # created the category).
        assert [e for e in disk.log if e[:2] != ("dir", "data")] == [], disk.log
        for hold in holds:
            hold.released.set()
        answers = await asyncio.gather(*(_answer(r, disk) for r, _ in conns))
        assert answers == [(b"HTTP/1.1 200 OK", b"")] * 30
        data = await read_file(cat_dir / chunk)
        _check_answers_follow_their_fsyncs(disk, chunk, data, bodies)
        # The two fsyncs of one write each, then one for the 28 that queued behind them.
        assert len([f for f in disk.chunk_fsyncs() if f[0] == chunk]) == 3, disk.log
        m = await scrape(http, node.url)
        assert value(m, "chukcha_write_fsyncs_total", category="c") == 3
        assert value(m, "chukcha_fsynced_writes_total", category="c") == 30
        assert value(m, "chukcha_group_fsync_seconds_total", category="c") > 0


async def test_a_failed_fsync_answers_500_to_every_write_it_covered(
    tmp_path: Path, disk: Disk
) -> None:
    async with _node_with_synced_category(tmp_path, 10, b"first\n") as (node, http, conns):
        disk.fail = True
        await _send_all(conns, "category=c&sync=1", [b"lost-%d\n" % i for i in range(10)])
        answers = await asyncio.gather(*(_answer(r, disk) for r, _ in conns))
        for status, body in answers:
            assert status == b"HTTP/1.1 500 Internal Server Error", (status, body)
            assert b"fsync" in body, body
        disk.fail = False
        # The node goes on: the next durable write is answered after an fsync that covers it.
        before = len(disk.chunk_fsyncs())
        await _send_all(conns[:1], "category=c&sync=1", [b"after\n"])
        assert await _answer(conns[0][0], disk) == (b"HTTP/1.1 200 OK", b"")
        chunk = node.config.data_dir / "c" / (await _names(node.config.data_dir / "c"))[0]
        size = (await asyncio.to_thread(chunk.stat)).st_size
        assert disk.chunk_fsyncs()[before:][-1] == (chunk.name, size)
        m = await scrape(http, node.url)
        assert value(m, "chukcha_fsynced_writes_total", category="c") == 2  # not the 10


async def test_a_sync_write_into_a_chunk_a_plain_write_started_syncs_its_directory_entry(
    tmp_path: Path, disk: Disk
) -> None:
    # 20-byte chunks: the plain writes rotate (on the fast path), then a durable write lands
    # in the chunk the last of them started, whose directory entry nothing synced yet.
    async with run_node(tmp_path / "data", "moscow", max_chunk_size=20) as node, \
            aiohttp.ClientSession() as http:
        for i in range(4):
            async with http.post(f"{node.url}/write", params={"category": "c"},
                                 data=b"plain-%05d\n" % i) as r:
                assert r.status == 200
        chunks = await _names(node.config.data_dir / "c")
        assert len(chunks) >= 2
        async with http.post(f"{node.url}/write", params={"category": "c", "sync": "1"},
                             data=b"s\n") as r:
            assert r.status == 200
        disk.log.append(("answer", "HTTP/1.1 200 OK", b""))
        last = (await _names(node.config.data_dir / "c"))[-1]
        assert last == chunks[-1]  # it went into that chunk
        data = await read_file(node.config.data_dir / "c" / last)
        _check_answers_follow_their_fsyncs(disk, last, data, [b"s\n"])


async def test_sync_writes_through_a_front_wait_for_the_writers_fsync(
    tmp_path: Path, disk: Disk
) -> None:
    async with front_and_writer(tmp_path) as (node, _, port), _conns(port, 12) as conns:
        bodies = [b"f-%02d\n" % i for i in range(12)]
        await _send_all(conns, "category=c&sync=1", bodies)
        answers = await asyncio.gather(*(_answer(r, disk) for r, _ in conns))
        assert answers == [(b"HTTP/1.1 200 OK", b"")] * 12
        chunk = node.config.data_dir / "c" / (await _names(node.config.data_dir / "c"))[0]
        _check_answers_follow_their_fsyncs(disk, chunk.name, await read_file(chunk), bodies)


async def _two_fsyncs_running(node: Node, conns: list[Conn], bodies: list[bytes],
                              disk: Disk) -> Hold:
    """The first write's fsync held, the second's ended: the hold of the first."""
    (hold,) = disk.hold(1)
    await _send_all(conns[:1], "category=c&sync=1", bodies[:1])
    await _until(lambda: disk.held == 1)
    await _send_all(conns[1:2], "category=c&sync=1", bodies[1:2])
    cat = node.store._categories["c"]  # the fsyncs running, in the order they began
    await _until(lambda: len(cat.sync_rounds) == 2 and cat.sync_rounds[1].ended)
    return hold


async def _all_answered_200_after_their_fsyncs(
    node: Node, conns: list[Conn], disk: Disk, bodies: list[bytes]
) -> None:
    """Every connection gets 200, and each answer came after an fsync covering its body (all
    in category ``c``'s first chunk)."""
    answers = await asyncio.gather(*(_answer(r, disk) for r, _ in conns))
    assert answers == [(b"HTTP/1.1 200 OK", b"")] * len(conns)
    chunk = (await _names(node.config.data_dir / "c"))[0]
    data = await read_file(node.config.data_dir / "c" / chunk)
    _check_answers_follow_their_fsyncs(disk, chunk, data, bodies)


async def test_an_fsync_that_ends_first_is_answered_after_the_one_that_began_before_it(
    tmp_path: Path, disk: Disk
) -> None:
    async with _node_with_synced_category(tmp_path, 2) as (node, _http, conns):
        bodies = [b"first\n", b"second\n"]
        hold = await _two_fsyncs_running(node, conns, bodies, disk)
        cat = node.store._categories["c"]
        assert cat.sync_waiters == 2  # the second's fsync ended, its write is not answered
        hold.released.set()
        await _all_answered_200_after_their_fsyncs(node, conns, disk, bodies)


async def test_a_failed_fsync_fails_the_later_fsyncs_and_the_queued_writes(
    tmp_path: Path, disk: Disk
) -> None:
    # The kernel reports a failed writeback once per open file: a later fsync may succeed
    # without the pages it lost, which may hold the later writes too.
    async with _node_with_synced_category(tmp_path, 3) as (node, http, conns):
        bodies = [b"first\n", b"second\n", b"queued\n"]
        hold = await _two_fsyncs_running(node, conns, bodies, disk)
        await _send_all(conns[2:], "category=c&sync=1", bodies[2:])
        cat = node.store._categories["c"]
        await _until(lambda: cat.sync_waiters == 3)  # two fsyncs run: the third write queues
        hold.fail = True
        hold.released.set()
        answers = await asyncio.gather(*(_answer(r, disk) for r, _ in conns))
        for status, body in answers:
            assert status == b"HTTP/1.1 500 Internal Server Error", (status, body)
            assert b"fsync" in body, body
        await _send_all(conns[:1], "category=c&sync=1", [b"after\n"])
        assert await _answer(conns[0][0], disk) == (b"HTTP/1.1 200 OK", b"")
        m = await scrape(http, node.url)
        assert value(m, "chukcha_fsynced_writes_total", category="c") == 2  # "0", "after"


async def test_with_sync_each_write_plain_writes_wait_for_a_covering_fsync(
    tmp_path: Path, disk: Disk
) -> None:
    async with run_node(tmp_path / "data", "moscow", sync_each_write=True) as node, \
            aiohttp.ClientSession() as http, _conns(_port(node), 10) as conns:
        async with http.post(f"{node.url}/write", params={"category": "c"}, data=b"0\n") as r:
            assert r.status == 200  # creates the category (its chunk's entry synced at once)
        (hold,) = disk.hold(1)
        bodies = [b"each-%d\n" % i for i in range(10)]
        await _send_all(conns[:1], "category=c", bodies[:1])
        await _until(lambda: disk.held == 1)
        await _send_all(conns[1:], "category=c", bodies[1:])
        cat = node.store._categories["c"]
        await _until(lambda: cat.sync_waiters == 10)  # gathered, each waiting for an fsync
        hold.released.set()
        await _all_answered_200_after_their_fsyncs(node, conns, disk, bodies)


async def test_a_failed_fsync_of_a_rotation_fails_the_writes_queued_for_the_next_fsync(
    tmp_path: Path, disk: Disk
) -> None:
    # A rotation syncs the chunk it closes for the writes queued for its next fsync; if that
    # fsync fails, they are answered 500 (a later fsync of the new chunk does not cover them).
    async with _node_with_synced_category(tmp_path, 4, max_chunk_size=64) as (
            node, _http, conns):
        bodies = [b"first\n", b"second\n", b"queued\n"]
        hold = await _two_fsyncs_running(node, conns, bodies, disk)
        await _send_all(conns[2:3], "category=c&sync=1", bodies[2:])
        cat = node.store._categories["c"]
        await _until(lambda: cat.sync_waiters == 3)
        (failing,) = disk.hold(1)
        failing.fail = True
        failing.released.set()
        # A plain write that the chunk cannot take: the rotation's fsync fails.
        await _send_all(conns[3:], "category=c", [b"r" * 60 + b"\n"])
        status, body = await _answer(conns[3][0], disk)
        assert status == b"HTTP/1.1 500 Internal Server Error", (status, body)
        hold.released.set()
        answers = [await _answer(r, disk) for r, _ in conns[:3]]
        assert answers[:2] == [(b"HTTP/1.1 200 OK", b"")] * 2  # their own fsyncs succeeded
        assert answers[2][0] == b"HTTP/1.1 500 Internal Server Error", answers[2]
        assert b"fsync" in answers[2][1]
        await _send_all(conns[:1], "category=c&sync=1", [b"after\n"])
        assert await _answer(conns[0][0], disk) == (b"HTTP/1.1 200 OK", b"")


async def test_a_sync_write_that_creates_its_category_syncs_the_categorys_entry(
    tmp_path: Path, disk: Disk
) -> None:
    # The first write of a category creates its directory in the data directory: a sync=1 one
    # is answered only after an fsync of the data directory that saw that entry (else a power
    # loss may take the whole category, and the write with it), besides the category's own.
    async with run_node(tmp_path / "data", "moscow") as node, aiohttp.ClientSession() as http:
        async with http.post(f"{node.url}/write", params={"category": "n", "sync": "1"},
                             data=b"s\n") as r:
            assert r.status == 200
        disk.log.append(("answer", "HTTP/1.1 200 OK", b""))
        data = await read_file(node.config.data_dir / "n" / "moscow-chunk000000000")
    assert data == b"s\n"
    before = disk.log[:disk.log.index(("answer", "HTTP/1.1 200 OK", b""))]
    assert [n for kind, n, seen in before
            if kind == "dir" and n == "data" and isinstance(seen, list) and "n" in seen], disk.log
    _check_answers_follow_their_fsyncs(disk, "moscow-chunk000000000", data, [b"s\n"])
