"""Group commit: concurrent durable writes share fsyncs, and none is answered before an fsync
that covers its bytes (``os.fsync`` is wrapped to record what each call covered; the disk is made
slow, 20 ms per fsync, so that writes pile up behind one)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chukcha.bus.chunks import ChunkStore
from chukcha.errors import DiskWriteError


@dataclass
class Disk:
    """Every fsync, in completion order: (file name, file size when the fsync began)."""

    log: list[tuple[str, str, int]]
    fail: bool = False


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    real = os.fsync
    disk = Disk([])

    def slow_fsync(fd: int) -> None:
        name = Path(f"/proc/self/fd/{fd}").readlink().name
        size = os.fstat(fd).st_size
        time.sleep(0.02)  # a slow disk, in the worker thread that does the fsync
        if disk.fail:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)
        disk.log.append(("fsync", name, size))

    monkeypatch.setattr(os, "fsync", slow_fsync)
    yield disk


@contextlib.asynccontextmanager
async def _store(tmp_path: Path, **kwargs: Any) -> AsyncIterator[ChunkStore]:
    store = ChunkStore(tmp_path / "data", "moscow", **kwargs)
    await asyncio.to_thread(store.open)
    try:
        yield store
    finally:
        await asyncio.to_thread(store.close)


def _lines(*paths: Path) -> list[bytes]:
    return sorted(x for p in paths for x in p.read_bytes().splitlines())


async def _write_all(store: ChunkStore, disk: Disk, n: int, **kwargs: bool) -> None:
    async def one(i: int) -> None:
        result = await store.write("c", b"m%04d\n" % i, **kwargs)
        disk.log.append(("answer", result.chunk, result.end))

    await asyncio.gather(*(one(i) for i in range(n)))


def _check_each_answer_follows_a_covering_fsync(disk: Disk) -> None:
    covered: dict[str, int] = {}
    for kind, chunk, size in disk.log:
        if kind == "fsync":
            covered[chunk] = max(covered.get(chunk, 0), size)
        else:
            assert covered.get(chunk, -1) >= size, f"{chunk}@{size} answered before its fsync"


async def test_concurrent_sync_writes_share_fsyncs_and_wait_for_one(
    tmp_path: Path, disk: Disk
) -> None:
    async with _store(tmp_path, max_chunk_size=1 << 30) as store:
        await _write_all(store, disk, 60, sync=True)
    answers = [x for x in disk.log if x[0] == "answer"]
    fsyncs = [x for x in disk.log if x[0] == "fsync" and x[1].startswith("moscow-chunk")]
    assert len(answers) == 60
    _check_each_answer_follows_a_covering_fsync(disk)
    assert len(fsyncs) <= 20, f"60 concurrent sync writes took {len(fsyncs)} fsyncs"
    chunk = tmp_path / "data" / "c" / "moscow-chunk000000000"
    assert await asyncio.to_thread(_lines, chunk) == [b"m%04d" % i for i in range(60)]


async def test_without_group_commit_each_sync_write_pays_its_own_fsync(
    tmp_path: Path, disk: Disk
) -> None:
    async with _store(tmp_path, max_chunk_size=1 << 30, group_commit=False) as store:
        await _write_all(store, disk, 20, sync=True)
    _check_each_answer_follows_a_covering_fsync(disk)
    assert len([x for x in disk.log if x[0] == "fsync" and x[1].startswith("moscow-")]) == 20


async def test_sync_each_write_with_rotations_under_way(tmp_path: Path, disk: Disk) -> None:
    # 6-byte messages, chunks of 30 bytes: the chunk rotates while writes wait for an fsync.
    async with _store(tmp_path, max_chunk_size=30, sync_each_write=True) as store:
        await _write_all(store, disk, 40)
    _check_each_answer_follows_a_covering_fsync(disk)
    chunks = await asyncio.to_thread(lambda: sorted((tmp_path / "data" / "c").iterdir()))
    assert len(chunks) >= 8
    assert await asyncio.to_thread(_lines, *chunks) == [b"m%04d" % i for i in range(40)]


async def test_a_failed_group_fsync_fails_every_write_waiting_for_it(
    tmp_path: Path, disk: Disk
) -> None:
    async with _store(tmp_path, max_chunk_size=1 << 30) as store:
        await store.write("c", b"first\n", sync=True)
        disk.fail = True
        results = await asyncio.gather(
            *(store.write("c", b"w%d\n" % i, sync=True) for i in range(10)),
            return_exceptions=True,
        )
        assert all(isinstance(r, DiskWriteError) for r in results), results
        assert "fsync" in str(results[0])
        disk.fail = False
        result = await store.write("c", b"after\n", sync=True)  # the store recovers
        chunk = tmp_path / "data" / "c" / result.chunk
        assert result.end == (await asyncio.to_thread(chunk.stat)).st_size
