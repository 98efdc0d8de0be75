"""Bad input gets a clear error and changes nothing on disk (issue 2, item 6)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from chukcha.bus.chunks import INLINE_WRITE_LIMIT
from chukcha.bus.node import Node
from chukcha.protocol import MAX_MESSAGE_SIZE
from chukcha.testing import run_node
from tests.bus.conftest import Api, disk_state, read_file

C0 = "moscow-chunk000000000"


@pytest.fixture
async def primed(tmp_path: Path, http: aiohttp.ClientSession) -> AsyncIterator[tuple[Node, Api]]:
    """A node with one category, one complete and one current chunk."""
    async with run_node(tmp_path / "data", instance="moscow", max_batch_size=64 << 10,
                        max_message_size=32 << 10) as node:
        api = Api(http, node.url)
        await api.write("c", b"first\n")
        await node.store.rotate()
        await api.write("c", b"second\n")
        yield node, api


def bad_names(tmp_path: Path) -> list[str]:
    return [
        "..", ".", "../c", "c/..", "/c", "a/b", "a\\b", "..\\c", "a\x00b", "\x00",
        "/etc/passwd", str(tmp_path / "evil"), str(tmp_path / "data" / "c"), " c", "c\n",
    ]


async def test_bad_category_names_are_refused_everywhere(
    primed: tuple[Node, Api], tmp_path: Path
) -> None:
    _, api = primed
    before = await disk_state(tmp_path)
    for name in bad_names(tmp_path):
        calls: list[tuple[str, dict[str, str | int], bytes | None]] = [
            ("/write", {"category": name}, b"x\n"),
            ("/read", {"category": name, "chunk": C0, "off": 0, "max_size": 10}, None),
            ("/ack", {"category": name, "chunk": C0, "size": 6}, None),
            ("/listChunks", {"category": name}, None),
        ]
        for path, params, body in calls:
            ans = await api.call(path, params, body)
            assert ans.status == 400, (path, name, ans)
            assert "category" in ans.text, (path, name, ans)
    assert await disk_state(tmp_path) == before


async def test_bad_chunk_names_are_refused(primed: tuple[Node, Api], tmp_path: Path) -> None:
    _, api = primed
    before = await disk_state(tmp_path)
    names = [*bad_names(tmp_path), "../" + C0, C0 + "/..", "../../data/c/" + C0,
             str(tmp_path / "data" / "c" / C0), "moscow\x00-chunk000000000", "moscow-chunk",
             "moscow-chunk0x1", "moscow-chunk-1", C0 + ".acknowledged", "-chunk000000000"]
    for name in names:
        calls: list[tuple[str, dict[str, str | int]]] = [
            ("/read", {"category": "c", "chunk": name, "off": 0, "max_size": 10}),
            ("/ack", {"category": "c", "chunk": name, "size": 100}),
        ]
        for path, params in calls:
            ans = await api.call(path, params)
            assert ans.status == 400, (path, name, ans)
            assert "chunk name" in ans.text, (path, name, ans)
    assert await disk_state(tmp_path) == before


async def test_bad_numbers_are_400_and_change_nothing(
    primed: tuple[Node, Api], tmp_path: Path
) -> None:
    _, api = primed
    before = await disk_state(tmp_path)
    for value in (None, "", "x", "-1", "1e3", "0x10", "1.0", " 1", "\u0661"):
        for path, name in [("/read", "off"), ("/read", "max_size"), ("/ack", "size")]:
            params: dict[str, str | int] = {"category": "c", "chunk": C0, "off": 0,
                                            "max_size": 100, "size": 6}
            if value is None:
                del params[name]
            else:
                params[name] = value
            ans = await api.call(path, params)
            assert ans.status == 400, (path, name, value, ans)
            assert name in ans.text, (path, name, value, ans)
    ans = await api.call("/read", {"category": "c", "chunk": C0, "off": 0,
                                   "max_size": (16 << 20) + 1})
    assert ans.status == 400
    assert "max_size" in ans.text
    assert await disk_state(tmp_path) == before


async def test_refused_write_bodies_change_nothing(
    primed: tuple[Node, Api], tmp_path: Path
) -> None:
    node, api = primed
    assert node.config.max_message_size == 32 << 10
    before = await disk_state(tmp_path)
    big = b"y" * ((32 << 10) + 1)
    cases = [
        (b"ok\n" + big + b"\nok\n", 500, "over the limit"),
        (big + b"\n", 500, "over the limit"),
        (b"a\nb", 500, "must end with a newline"),
        (b"no newline", 500, "must end with a newline"),
        (b"", 500, "empty write body"),
    ]
    for body, status, message in cases:
        ans = await api.call("/write", {"category": "c"}, body)
        assert ans.status == status, (body[:20], ans)
        assert message in ans.text
        ans = await api.call("/write", {"category": "fresh"}, body)
        assert ans.status == status
    assert await disk_state(tmp_path) == before
    # The limit itself is fine.
    await api.write("c", b"y" * (32 << 10) + b"\n")


async def test_the_default_message_limit_is_1_mib(api: Api, node: Node) -> None:
    ans = await api.call("/write", {"category": "c"}, b"z" * (MAX_MESSAGE_SIZE + 1) + b"\n")
    assert ans.status == 500
    assert f"over the limit of {MAX_MESSAGE_SIZE} bytes" in ans.text
    assert await api.list_chunks("c") == []
    await api.write("c", b"z" * MAX_MESSAGE_SIZE + b"\n")


async def _raw_request_until_closed(url: str, head: bytes, body: bytes) -> bytes:
    """Send a hand-made request and read until the server closes the connection.

    A server that kept the connection open would make this time out (keep-alive is 75 s).
    """
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + body)
        async with asyncio.timeout(30):
            with contextlib.suppress(ConnectionError):
                await writer.drain()  # the server may close before taking the whole body
            return await reader.read()  # up to EOF
    finally:
        writer.close()


async def test_body_over_the_batch_limit_is_400_and_the_connection_closed(
    primed: tuple[Node, Api], tmp_path: Path
) -> None:
    node, _ = primed
    before = await disk_state(tmp_path)
    limit = node.config.max_batch_size
    body = b"m\n" * (limit // 2 + 1)
    head = b"POST /write?category=c HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    response = await _raw_request_until_closed(node.url, head, body)
    assert response.startswith(b"HTTP/1.1 400"), response
    assert b"over the batch limit of %d bytes" % limit in response
    # The same with a chunked body, whose length the server only learns while reading.
    head = b"POST /write?category=c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in [body[:40000], body[40000:]])
    response = await _raw_request_until_closed(node.url, head, chunked + b"0\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400"), response
    assert b"over the batch limit" in response
    assert await disk_state(tmp_path) == before


def _connections(node: Node) -> int:
    return len(node.server.connections)


async def _connections_down_to(node: Node, count: int) -> None:
    async with asyncio.timeout(10):
        # The server has no "connection closed" hook to await; its connection list is the state.
        while _connections(node) > count:  # noqa: ASYNC110 - no push to wait on
            await asyncio.sleep(0.01)


async def test_client_disconnecting_mid_body_writes_nothing(
    primed: tuple[Node, Api], tmp_path: Path
) -> None:
    node, api = primed
    before = await disk_state(tmp_path)
    baseline = _connections(node)  # the session's keep-alive connections
    for category in ("c", "new"):
        host, port = node.address.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        sent = b"abc\n" * 1000
        writer.write(b"POST /write?category=%b HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                     % (category.encode(), len(sent) + 10_000) + sent)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        assert await reader.read() == b""  # no answer: the body never completed
    await _connections_down_to(node, baseline)
    assert await disk_state(tmp_path) == before
    await api.write("c", b"after\n")
    assert await read_file(tmp_path / "data" / "c" / "moscow-chunk000000001") == b"second\nafter\n"


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True, capture_output=True)


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@pytest.fixture
async def small_fs(tmp_path: Path) -> AsyncIterator[Path]:
    if os.geteuid() != 0 or await asyncio.to_thread(shutil.which, "mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mnt = tmp_path / "mnt"
    try:
        await asyncio.to_thread(_mount_tmpfs, mnt, "256k")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount tmpfs here: {exc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        await asyncio.to_thread(_umount, mnt)


async def test_enospc_answers_an_error_keeps_the_chunk_whole_and_recovers(
    small_fs: Path, http: aiohttp.ClientSession
) -> None:
    filler = small_fs / "filler"
    await asyncio.to_thread(filler.write_bytes, b"\0" * (64 << 10))
    async with run_node(small_fs / "data", instance="moscow") as node:
        api = Api(http, node.url)
        good: list[bytes] = []
        for i in range(100):
            body = b"%04d %s\n" % (i, b"e" * 10_000)
            ans = await api.call("/write", {"category": "c"}, body)
            if ans.status != 200:
                break
            good.append(body)
        else:
            pytest.fail("the 256 KiB file system never filled up")
        assert ans.status == 500
        assert "No space left on device" in ans.text
        assert good  # some writes fit
        expected = b"".join(good)
        path = small_fs / "data" / "c" / C0
        assert await read_file(path) == expected  # rolled back to the last good length
        assert await api.list_chunks("c") == [{"name": C0, "complete": False,
                                               "size": len(expected)}]
        assert await api.read("c", C0, 0, len(expected)) == expected  # reads still work
        # More writes keep failing cleanly while the disk is full ...
        # (a body over INLINE_WRITE_LIMIT: the worker-thread path)
        ans = await api.call("/write", {"category": "c"}, b"%s\n" % (b"f" * 70_000))
        assert ans.status == 500
        assert await read_file(path) == expected
        # ... also when part of the body fits: 64 KiB get free, a 100 KB write lands partly in
        # the file and is rolled back ...
        await asyncio.to_thread(filler.unlink)
        ans = await api.call("/write", {"category": "c"}, b"%s\n" % (b"g" * 100_000))
        assert ans.status == 500
        assert "No space left on device" in ans.text
        assert await read_file(path) == expected
        # ... and work again once there is room.
        await api.write("c", b"after\n")
        assert await api.read("c", C0, len(expected)) == b"after\n"
        assert await read_file(path) == expected + b"after\n"


class _FullDisk:
    """``os.write`` that lets ``budget`` more bytes into one fd, then fails with ENOSPC (other
    fds are untouched): a full disk in process, without root or a tmpfs."""

    def __init__(
        self, real: Callable[[int, bytes | memoryview], int], fd: int, budget: int
    ) -> None:
        self._real, self.fd, self.budget = real, fd, budget

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if fd != self.fd:
            return self._real(fd, data)
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self._real(fd, memoryview(data)[: self.budget])
        self.budget -= n
        return n


async def test_enospc_in_process_rolls_the_chunk_back_and_the_node_recovers(
    node: Node, api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await api.write("c", b"good\n")
    path = tmp_path / "data" / "c" / C0
    disk = _FullDisk(os.write, node.store._categories["c"].write_fd, budget=3)
    monkeypatch.setattr("chukcha.bus.chunks.os.write", disk.write)
    small, big = b"abcdefgh\n", b"%s\n" % (b"f" * (INLINE_WRITE_LIMIT + 10))
    for body in (small, big, small):  # on the loop, in a worker thread, and again
        ans = await api.call("/write", {"category": "c"}, body)
        assert ans.status == 500, ans
        assert "No space left on device" in ans.text
        assert await read_file(path) == b"good\n"  # rolled back to the last good length
        assert await api.list_chunks("c") == [{"name": C0, "complete": False, "size": 5}]
        assert await api.read("c", C0) == b"good\n"  # reads still work
        assert await api.read("c", C0, 5) == b""
    disk.budget = 1 << 30  # room again
    await api.write("c", b"after\n")
    await api.write("c", big)
    assert await api.read("c", C0, 0, 1 << 20) == b"good\nafter\n" + big
    assert await read_file(path) == b"good\nafter\n" + big
