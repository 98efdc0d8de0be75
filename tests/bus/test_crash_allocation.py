"""A node SIGKILLed during big writes (its open chunk's space allocated ahead, see
``chunk_index.reserve_space``): its chunks hold exactly the bytes answered plus at most a piece
of the write in flight (whole messages of it once restarted), no zero byte is ever read back,
and the restarted node gives back the space the killed one had allocated past the end."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chukcha.bus import chunk_index
from chukcha.testing import NodeProcess
from tests.bus.test_big_fast_writes import _answer

_BODY_MESSAGES = 7_000  # 100 B each: 700 KB bodies, so the space allocated ahead of the
# appends (4 MiB steps) is never used up exactly when a write ends
_ANSWERED = 30  # the kill comes with the write after these in flight


def _body(i: int) -> bytes:
    return b"".join(b"b%04d-%05d-%s\n" % (i, k, b"x" * 87) for k in range(_BODY_MESSAGES))


def _post(body: bytes) -> bytes:
    return b"POST /write?category=c HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%b" % (
        len(body), body)


def _own_chunks(data: Path) -> list[Path]:
    return sorted(p for p in (data / "c").iterdir() if p.name.startswith("moscow-chunk"))


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


async def _write_then_kill(node: NodeProcess) -> bytes:
    """A small write, then big ones on one connection, SIGKILL with one more in flight: the
    bytes answered."""
    host, port = node.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST /write?category=c HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n"
                     b"\r\nfirst\n")
        assert (await _answer(reader))[0] == 200
        for i in range(_ANSWERED):
            writer.write(_post(_body(i)))
            assert (await _answer(reader))[0] == 200
        writer.write(_post(_body(_ANSWERED)))  # in flight: received, appended, or neither
        await writer.drain()
        await node.kill()
    finally:
        writer.close()
    return b"first\n" + b"".join(_body(i) for i in range(_ANSWERED))


async def _read_back(node: NodeProcess, chunks: list[Path]) -> bytes:
    """The chunks as the node serves them (``/read``, 1 MiB at a time)."""
    host, port = node.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    out = b""
    try:
        for p in chunks:
            off = 0
            while True:
                writer.write(b"GET /read?category=c&chunk=%b&off=%d&max_size=1048576 "
                             b"HTTP/1.1\r\nHost: t\r\n\r\n" % (p.name.encode(), off))
                status, piece = await _answer(reader)
                assert status == 200, piece
                if not piece:
                    break
                out += piece
                off += len(piece)
    finally:
        writer.close()
    return out


@pytest.mark.allow_blocking
async def test_a_node_killed_during_big_writes_leaves_the_answered_bytes_and_no_zeros(
    tmp_path: Path,
) -> None:
    if chunk_index._fallocate() is None:
        pytest.skip("no fallocate(2) on this platform")
    data = tmp_path / "data"
    node = NodeProcess(data, "moscow", ["--max-chunk-size", "8MiB"])
    await node.start()
    try:
        answered = await _write_then_kill(node)
        chunks = _own_chunks(data)
        assert len(chunks) >= 3  # it rotated (8 MiB chunks)
        on_disk = b"".join(p.read_bytes() for p in chunks)
        assert b"\0" not in on_disk
        # Every answered byte, in order, then at most a piece of the write in flight.
        assert on_disk[:len(answered)] == answered
        assert _body(_ANSWERED).startswith(on_disk[len(answered):])
        if not chunks[-1].stat().st_size:
            chunks.pop()  # the kill came right after a rotation
        last = chunks[-1]
        size, mtime = last.stat().st_size, last.stat().st_mtime_ns
        reserved_ahead = _allocated(last) - size
        if reserved_ahead < (256 << 10):
            pytest.skip(f"the file system under {tmp_path} allocates nothing ahead")

        await node.start()  # the same data directory
        kept = b"".join(p.read_bytes() for p in chunks)
        # Restarted: whole messages only (a message cut by the kill is cut away).
        assert kept.endswith(b"\n")
        assert kept[:len(answered)] == answered
        assert _body(_ANSWERED).startswith(kept[len(answered):])
        assert _allocated(last) < last.stat().st_size + (64 << 10), (
            f"{last.name} keeps {reserved_ahead} bytes allocated past its end")
        if last.stat().st_size == size:  # not cut: the restart left its bytes and time alone
            assert last.stat().st_mtime_ns == mtime
        # What the node reads back is exactly that: no zero byte anywhere.
        assert await _read_back(node, chunks) == kept
    finally:
        await node.stop()
        node.close()
