"""Concurrent big writes to one category are queued for one worker thread that appends them one
after the other (``ChunkStore._write_big``), under the category's lock, without going back to
the event loop between them. Each write still lands whole in one chunk or not at all, in the
order they came, and is answered with its own end; a failed one leaves nothing of itself."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from chukcha.bus import chunk_queue
from chukcha.bus.chunk_index import QueuedWrite
from chukcha.bus.chunks import INLINE_WRITE_LIMIT, ChunkStore, WriteResult
from chukcha.errors import DiskWriteError
from chukcha.protocol import count_newlines
from tests.bus.conftest import AppendGate

BIG = INLINE_WRITE_LIMIT + 100  # whole 100-byte messages over the limit


def _body(tag: int, size: int) -> bytes:
    line = b"%05d %s\n" % (tag, b"m" * 93)  # 100-byte messages
    return (line * (size // len(line) + 1))[: size // len(line) * len(line)]


class _Runs:
    """Counts the worker-thread runs that append queued writes."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.count = 0

    def run(self, store: ChunkStore, *args: Any) -> None:
        self.count += 1
        self._real(store, *args)


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> _Runs:
    r = _Runs(ChunkStore._append_queued)

    def run(store: ChunkStore, *args: Any) -> None:  # a function: bound to the store
        r.run(store, *args)

    monkeypatch.setattr(ChunkStore, "_append_queued", run)
    return r


async def _queue_behind_the_first(store: ChunkStore, gate: AppendGate,
                                  bodies: list[bytes]) -> list[asyncio.Task[WriteResult]]:
    first = asyncio.create_task(store.write("c", bodies[0]))
    await asyncio.to_thread(gate.entered.wait, 5)  # the first write is in its worker thread
    rest = [asyncio.create_task(store.write("c", b)) for b in bodies[1:]]
    for _ in range(10):  # every write queues (no timed sleep: only yields)
        await asyncio.sleep(0)
    assert not any(t.done() for t in [first, *rest])
    return [first, *rest]


async def test_queued_big_writes_follow_each_other_in_one_thread_and_each_lands_whole(
    store: ChunkStore, gate: AppendGate, runs: _Runs, tmp_path: Path,
) -> None:
    # 1 MiB chunks: the first write and the next three fit in chunk 0, the fifth does not and
    # starts chunk 1, with the sixth: one worker-thread run per chunk.
    bodies = [_body(i, n) for i, n in enumerate(
        [100_000, 300_000, 250_000, 200_000, 400_000, BIG])]
    tasks = await _queue_behind_the_first(store, gate, bodies)
    gate.open()
    results = await asyncio.gather(*tasks)
    assert runs.count == 2
    c0, c1 = "me-chunk000000000", "me-chunk000000001"
    ends0 = [sum(len(b) for b in bodies[:i + 1]) for i in range(4)]
    assert results[:4] == [WriteResult(c0, e) for e in ends0]
    assert results[4:] == [WriteResult(c1, len(bodies[4])),
                           WriteResult(c1, len(bodies[4]) + len(bodies[5]))]
    data = tmp_path / "data" / "c"
    assert await asyncio.to_thread((data / c0).read_bytes) == b"".join(bodies[:4])
    assert await asyncio.to_thread((data / c1).read_bytes) == b"".join(bodies[4:])
    assert store.chunk_size("c", c0) == ends0[-1]
    traffic = store.traffic()["c"]
    assert traffic.writes == len(bodies)
    assert traffic.bytes_written == sum(len(b) for b in bodies)
    assert traffic.messages_written == sum(b.count(b"\n") for b in bodies)


async def test_a_failed_write_leaves_nothing_of_itself_and_the_next_ones_go_on(
    store: ChunkStore, gate: AppendGate, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    bodies = [_body(i, 150_000) for i in range(5)]
    real = os.write
    room = [len(bodies[0]) + len(bodies[1]) + 1000]  # the disk takes this much more, then is full
    path = tmp_path / "data" / "c" / "me-chunk000000000"

    def full_disk(fd: int, data: bytes | memoryview) -> int:
        if room[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, memoryview(data)[: room[0]])
        room[0] -= n
        return n

    tasks = await _queue_behind_the_first(store, gate, bodies[:4])
    monkeypatch.setattr(os, "write", full_disk)  # before the first write's bytes
    gate.open()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    c0 = "me-chunk000000000"
    assert results[:2] == [WriteResult(c0, len(bodies[0])),
                           WriteResult(c0, len(bodies[0]) + len(bodies[1]))]
    for failed in results[2:]:  # the third half-written, then undone; the fourth found no room
        assert isinstance(failed, DiskWriteError), failed
        assert "No space left on device" in str(failed)
    assert await asyncio.to_thread(path.read_bytes) == bodies[0] + bodies[1]
    assert store.chunk_size("c", c0) == len(bodies[0]) + len(bodies[1])
    assert store.traffic()["c"].writes == 2
    room[0] = 1 << 30  # room again
    assert await store.write("c", bodies[4]) == WriteResult(
        c0, len(bodies[0]) + len(bodies[1]) + len(bodies[4]))
    assert await asyncio.to_thread(path.read_bytes) == bodies[0] + bodies[1] + bodies[4]


async def test_a_cancelled_queued_write_is_not_written_and_a_taken_one_waits(
    store: ChunkStore, gate: AppendGate, tmp_path: Path,
) -> None:
    bodies = [_body(i, 100_000) for i in range(3)]
    first, second, third = await _queue_behind_the_first(store, gate, bodies)
    second.cancel()  # still queued: never written
    first.cancel()  # being written: waits for its thread, then is cancelled
    for _ in range(10):
        await asyncio.sleep(0)
    assert not first.done()
    gate.open()
    results = await asyncio.gather(first, second, third, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert isinstance(results[1], asyncio.CancelledError)
    c0 = "me-chunk000000000"
    assert results[2] == WriteResult(c0, len(bodies[0]) + len(bodies[2]))
    path = tmp_path / "data" / "c" / c0
    assert await asyncio.to_thread(path.read_bytes) == bodies[0] + bodies[2]


async def test_a_long_stream_of_big_writes_lets_others_take_their_turn(
    store: ChunkStore, gate: AppendGate, runs: _Runs, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A run of the worker thread ends after queued_run_bytes: a durable write waiting for the
    # category's lock goes between two runs, not after the whole stream.
    monkeypatch.setattr(ChunkStore, "queued_run_bytes", 300_000)
    bodies = [_body(i, 100_000) for i in range(6)]
    tasks = await _queue_behind_the_first(store, gate, bodies)
    durable = asyncio.create_task(store.write("c", b"durable\n", sync=True))
    for _ in range(10):
        await asyncio.sleep(0)
    gate.open()
    await asyncio.gather(*tasks, durable)
    path = tmp_path / "data" / "c" / "me-chunk000000000"
    assert await asyncio.to_thread(path.read_bytes) == (
        b"".join(bodies[:3]) + b"durable\n" + b"".join(bodies[3:]))
    assert runs.count == 2


async def test_a_write_cancelled_after_its_chunk_was_chosen_lets_no_later_one_overfill_it(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    # Chunk 0 holds 600 KB of its 1 MiB. Queued: A (100 KB, fits) then B (500 KB, does not).
    # The chunk is chosen for A, then A's caller leaves before the worker thread takes it: the
    # thread's first write is B, which still needs a chunk of its own.
    first = _body(0, 600_000)
    await store.write("c", first, sync=True)  # not queued: no round still running after it
    bodies = [_body(1, 100_000), _body(2, 500_000)]
    real = store._chunk_for
    tasks: list[asyncio.Task[WriteResult]] = []

    async def chunk_for_then_cancel_a(cat: Any, size: int) -> Any:
        chunk = await real(cat, size)
        if size == len(bodies[0]) and not tasks[0].done():
            tasks[0].cancel()
            await asyncio.wait([tasks[0]])  # A left the queue (never taken)
        return chunk

    monkeypatch.setattr(store, "_chunk_for", chunk_for_then_cancel_a)
    tasks.extend(asyncio.create_task(store.write("c", b)) for b in bodies)
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    c0, c1 = "me-chunk000000000", "me-chunk000000001"
    assert await tasks[1] == WriteResult(c1, len(bodies[1]))
    data = tmp_path / "data" / "c"
    assert await asyncio.to_thread((data / c0).read_bytes) == first
    assert await asyncio.to_thread((data / c1).read_bytes) == bodies[1]
    assert store.chunk_size("c", c0) == len(first)


async def test_a_write_whose_new_chunk_fails_and_whose_caller_leaves_meanwhile_is_cancelled(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    # Chunk 0 holds 600 KB of its 1 MiB. Queued: A (500 KB, needs a new chunk) then B (100 KB,
    # fits). The disk has no room for a new file, and A's caller leaves while A's chunk is
    # being started: A's caller gets its cancellation (not an error of the queue), nothing of
    # A is anywhere, and B lands in chunk 0.
    first = _body(0, 600_000)
    await store.write("c", first, sync=True)  # not queued: no round still running after it
    bodies = [_body(1, 500_000), _body(2, 100_000)]

    def no_room(cat: Any) -> str:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "_create_chunk", no_room)
    real = store._chunk_for
    tasks: list[asyncio.Task[WriteResult]] = []
    failed: list[BaseException] = []

    async def chunk_for_as_a_leaves(cat: Any, size: int) -> Any:
        try:
            return await real(cat, size)
        except Exception as exc:
            failed.append(exc)
            tasks[0].cancel()  # the client of A disconnects in this very iteration
            raise

    monkeypatch.setattr(store, "_chunk_for", chunk_for_as_a_leaves)
    tasks.extend(asyncio.create_task(store.write("c", b)) for b in bodies)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert len(failed) == 1 and isinstance(failed[0], DiskWriteError), failed
    assert isinstance(results[0], asyncio.CancelledError), results[0]
    c0 = "me-chunk000000000"
    assert results[1] == WriteResult(c0, len(first) + len(bodies[1]))
    data = tmp_path / "data" / "c"
    assert sorted(p.name for p in await asyncio.to_thread(lambda: list(data.iterdir()))) == [c0]
    assert await asyncio.to_thread((data / c0).read_bytes) == first + bodies[1]
    assert store.chunk_size("c", c0) == len(first) + len(bodies[1])


async def test_writes_still_queued_when_the_round_is_stopped_get_their_cancellation(
    store: ChunkStore, gate: AppendGate, tmp_path: Path,
) -> None:
    # A durable big write holds the category (its append waits at the gate); B, a big write,
    # is queued, and its round waits for the category. The loop is closing: the round and
    # B's caller are cancelled together, the round first. B's caller gets its cancellation,
    # and B is never written.
    durable = asyncio.create_task(store.write("c", _body(0, 100_000), sync=True))
    await asyncio.to_thread(gate.entered.wait, 5)
    b = asyncio.create_task(store.write("c", _body(1, 100_000)))
    for _ in range(10):  # B queues, its round waits for the lock (no timed sleep: only yields)
        await asyncio.sleep(0)
    cat = store._categories["c"]
    queue_round = cat.queue_round
    assert queue_round is not None and len(cat.queued) == 1 and not b.done()
    queue_round.cancel()
    b.cancel()
    gate.open()
    results = await asyncio.gather(durable, b, return_exceptions=True)
    c0 = "me-chunk000000000"
    assert results[0] == WriteResult(c0, 100_000 // 100 * 100)
    assert isinstance(results[1], asyncio.CancelledError), results[1]
    assert not cat.queued and cat.queue_round is None
    path = tmp_path / "data" / "c" / c0
    assert await asyncio.to_thread(path.read_bytes) == _body(0, 100_000)


@pytest.mark.parametrize("fault", ["counting", "hand-off"])
async def test_an_unexpected_error_after_an_append_still_answers_every_write_of_the_round(
    store: ChunkStore, gate: AppendGate, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, fault: str,
) -> None:
    # The second of four queued writes is appended, then something unexpected fails in the
    # worker thread: counting its messages runs out of memory, or handing its answer to the
    # loop does. Its bytes are in the chunk, so its answer is its end; every write of the round
    # is answered (before, the second one's caller waited forever), the counters stay right and
    # the category takes writes again.
    bodies = [_body(i, 150_000) for i in range(4)]
    loop = asyncio.get_running_loop()
    if fault == "counting":
        real_count = count_newlines

        def count(body: bytes | bytearray) -> int:
            if bytes(body[:5]) == b"00001":
                raise MemoryError
            return real_count(body)

        monkeypatch.setattr(chunk_queue, "count_newlines", count)
    else:
        real_soon = loop.call_soon_threadsafe
        failed: list[Any] = []

        def soon(callback: Any, *args: Any, **kwargs: Any) -> Any:
            if args[1:2] and getattr(args[1], "body", b"")[:5] == b"00001" and not failed:
                failed.append(args[1])
                raise MemoryError
            return real_soon(callback, *args, **kwargs)

        monkeypatch.setattr(loop, "call_soon_threadsafe", soon)
    entries: list[QueuedWrite] = []

    def entry(*args: Any) -> QueuedWrite:
        entries.append(QueuedWrite(*args))
        return entries[-1]

    monkeypatch.setattr(chunk_queue, "QueuedWrite", entry)
    tasks = await _queue_behind_the_first(store, gate, bodies)
    gate.open()
    with caplog.at_level(logging.ERROR, logger="chukcha.bus.chunk_queue"):
        _, unanswered = await asyncio.wait(tasks, timeout=30)  # no cancel: a taken write waits
    if unanswered:  # answer them here, so that the test fails instead of hanging
        for e in entries:
            if not e.done.done():
                e.done.set_exception(AssertionError("never answered"))
        await asyncio.wait(unanswered)
    assert not unanswered, f"{len(unanswered)} of the callers were never answered"
    results = [t.result() for t in tasks]
    c0 = "me-chunk000000000"
    ends = [sum(len(b) for b in bodies[:i + 1]) for i in range(4)]
    assert results == [WriteResult(c0, e) for e in ends]
    assert any("MemoryError" in (r.exc_text or "") or "MemoryError" in r.getMessage()
               for r in caplog.records), caplog.records
    path = store.data_dir / "c" / c0
    assert await asyncio.to_thread(path.read_bytes) == b"".join(bodies)
    traffic = store.traffic()["c"]
    assert (traffic.writes, traffic.bytes_written, traffic.messages_written) == (
        4, ends[-1], sum(b.count(b"\n") for b in bodies))
    cat = store._categories["c"]
    if cat.queue_round is not None:  # the round ends once its thread has returned
        await asyncio.wait([cat.queue_round], timeout=10)
    assert not cat.queued and cat.queue_round is None
    assert await store.write("c", bodies[0]) == WriteResult(c0, ends[-1] + len(bodies[0]))
