"""A failed write whose rollback fails too (the write stopped part-way, then ``ftruncate`` failed:
a disk going bad) leaves bytes past the chunk's last good size. No later write may land after
them: readers would get those bytes inside the next write's messages. The next write first
removes them, or fails (500) while they cannot be removed; reads keep seeing the last good
chunk meanwhile."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from chukcha.bus.chunks import INLINE_WRITE_LIMIT, ChunkStore, WriteResult
from chukcha.errors import DiskWriteError

C0 = "me-chunk000000000"


def _body(tag: int, size: int) -> bytes:
    line = b"%05d %s\n" % (tag, b"m" * 93)  # 100-byte messages
    return (line * (size // len(line) + 1))[: size // len(line) * len(line)]


class _Disk:
    """``os.write`` that stops part-way once (``cut``: bytes it lets in, then ENOSPC), and
    ``os.ftruncate`` that fails with EIO while ``truncate_fails``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cut: int | None = None
        self.truncate_fails = False
        self._write, self._truncate = os.write, os.ftruncate
        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(os, "ftruncate", self.ftruncate)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if self.cut is None:
            return self._write(fd, data)
        if self.cut == 0:
            self.cut = None
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self._write(fd, memoryview(data)[: self.cut])
        self.cut -= n
        return n

    def ftruncate(self, fd: int, length: int) -> None:
        if self.truncate_fails:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self._truncate(fd, length)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> _Disk:
    return _Disk(monkeypatch)


async def _chunk_bytes(tmp_path: Path) -> bytes:
    return await asyncio.to_thread((tmp_path / "data" / "c" / C0).read_bytes)


@pytest.mark.parametrize("next_size", [100, INLINE_WRITE_LIMIT + 100],
                         ids=["small next write", "big next write"])
async def test_bytes_a_failed_rollback_left_are_removed_before_the_next_write(
    store: ChunkStore, disk: _Disk, tmp_path: Path, next_size: int,
) -> None:
    first = _body(0, 1000)
    assert await store.write("c", first) == WriteResult(C0, len(first))
    disk.cut, disk.truncate_fails = 1050, True  # 1,050 bytes in, then the disk is full
    with pytest.raises(DiskWriteError, match="No space left on device"):
        await store.write("c", _body(1, INLINE_WRITE_LIMIT + 100))
    assert store.chunk_size("c", C0) == len(first)
    disk.truncate_fails = False  # the disk answers again
    after = _body(2, next_size)
    assert await store.write("c", after) == WriteResult(C0, len(first) + len(after))
    assert await _chunk_bytes(tmp_path) == first + after
    assert await store.read("c", C0, 0, 1 << 20) == first + after


async def test_no_write_lands_while_the_bytes_cannot_be_removed(
    store: ChunkStore, disk: _Disk, tmp_path: Path,
) -> None:
    first = _body(0, 1000)
    await store.write("c", first)
    disk.cut, disk.truncate_fails = 1050, True
    with pytest.raises(DiskWriteError):
        await store.write("c", _body(1, INLINE_WRITE_LIMIT + 100))
    for body in (_body(2, 100), _body(3, INLINE_WRITE_LIMIT + 100)):  # small, big: refused
        with pytest.raises(DiskWriteError, match="could not be removed"):
            await store.write("c", body)
    assert store.chunk_size("c", C0) == len(first)
    assert await store.read("c", C0, 0, 1 << 20) == first  # reads keep working
    disk.truncate_fails = False
    last = _body(4, 100)
    assert await store.write("c", last) == WriteResult(C0, len(first) + len(last))
    assert await _chunk_bytes(tmp_path) == first + last


@pytest.mark.parametrize("how", ["rotation", "stop"])
async def test_bytes_a_failed_rollback_left_are_removed_before_the_chunk_is_closed(
    disk: _Disk, tmp_path: Path, how: str,
) -> None:
    # The chunk is closed for writes (a rotation makes it complete, or the node stops) before
    # any write removed the failed write's bytes: they are cut then, or the node, reopened,
    # would read them as messages of a write that was answered 500 (and retried: doubled).
    store = ChunkStore(tmp_path / "data", "me", max_chunk_size=1 << 20)
    await asyncio.to_thread(store.open)
    first = _body(0, 1000)
    try:
        await store.write("c", first)
        disk.cut, disk.truncate_fails = 1000, True  # 10 whole messages in, then ENOSPC
        with pytest.raises(DiskWriteError):
            await store.write("c", _body(1, INLINE_WRITE_LIMIT + 100))
        disk.truncate_fails = False  # the disk answers again
        if how == "rotation":
            assert await store.rotate() == ["c/me-chunk000000001"]
    finally:
        await asyncio.to_thread(store.close)
    assert await _chunk_bytes(tmp_path) == first
    reopened = ChunkStore(tmp_path / "data", "me", max_chunk_size=1 << 20)
    await asyncio.to_thread(reopened.open)
    try:
        assert reopened.chunk_size("c", C0) == len(first)
        assert await reopened.read("c", C0, 0, 1 << 20) == first
    finally:
        await asyncio.to_thread(reopened.close)
