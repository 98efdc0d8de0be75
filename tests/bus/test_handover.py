"""A front worker hands connections that are not small writes to the writer (``SCM_RIGHTS``):
a real node (the writer, with its private sockets) and a front in this process; raw sockets as
clients, so that pipelined bytes and bodies split across packets are exactly what is sent."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from chukcha.bus.handover import PIECE, front_keeps, handover_path
from tests.bus.conftest import front_and_writer


def _write(body: bytes, category: str = "c") -> bytes:
    return (b"POST /write?category=%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
            % (category.encode(), len(body))) + body


def _read(chunk: str, size: int, category: str = "c") -> bytes:
    return (b"GET /read?category=%s&chunk=%s&off=0&max_size=%d HTTP/1.1\r\nHost: x\r\n\r\n"
            % (category.encode(), chunk.encode(), size))


async def _answers(reader: asyncio.StreamReader, n: int) -> list[tuple[int, bytes]]:
    """``n`` answers: (status, body)."""
    out = []
    async with asyncio.timeout(20):
        for _ in range(n):
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            out.append((status, await reader.readexactly(length)))
    return out


def _stored(tmp_path: Path, category: str = "c") -> list[bytes]:
    lines: list[bytes] = []
    for chunk in sorted((tmp_path / "data" / category).iterdir()):
        lines += chunk.read_bytes().splitlines()
    return lines


def _hand_over(path: str, conn: socket.socket, data: bytes, pieces: int) -> None:
    """What a front does (by hand): ``conn`` and the first ``pieces`` pieces of ``data``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as chan:
        chan.connect(path)
        socket.send_fds(chan, [len(data).to_bytes(8, "little"), data[:PIECE]], [conn.fileno()])
        for at in range(PIECE, min(len(data), pieces * PIECE), PIECE):
            chan.send(data[at:at + PIECE])
        conn.close()


def test_what_a_front_keeps() -> None:
    small = _write(b"m\n")
    assert front_keeps(small)
    assert front_keeps(small[:20])  # headers not all there yet: the front parses them
    assert not front_keeps(_write(b"x" * (PIECE + 1))[:200])
    assert not front_keeps(_read("w-chunk000000000", 100))
    chunked = b"POST /write?category=c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert not front_keeps(chunked)
    lower = b"POST /write?category=c HTTP/1.1\r\ncontent-length: 2\r\nhost: x\r\n\r\nm\n"
    assert front_keeps(lower)


async def test_a_big_write_with_pipelined_requests_behind_it_is_handed_over(
    tmp_path: Path,
) -> None:
    async with front_and_writer(tmp_path) as (node, front, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # Small writes stay with the front.
            writer.write(_write(b"first\n"))
            assert await _answers(reader, 1) == [(200, b"")]
            assert front.handover.handed == 0
            # A big write, a small one and a read in one go: the connection moves with all of
            # them (the big body split across several pieces of the hand-over), answered in
            # order by the writer.
            big = b"".join(b"big-%06d\n" % i for i in range(30_000))  # 330 KB
            writer.write(_write(big) + _write(b"after\n") + _read("w-chunk000000000", 1 << 20))
            answers = await _answers(reader, 3)
            assert [s for s, _ in answers] == [200, 200, 200]
            assert answers[2][1] == b"first\n" + big + b"after\n"
            assert front.handover.handed == 1
            assert node.handovers is not None and node.handovers.adopted == 1
            # The writer keeps serving it (small writes too), on the same connection.
            writer.write(_write(b"later\n"))
            assert await _answers(reader, 1) == [(200, b"")]
            assert node.handovers.adopted == 1
        finally:
            writer.close()
    stored = await asyncio.to_thread(_stored, tmp_path)
    assert stored == [b"first", *big.splitlines(), b"after", b"later"]


async def test_a_body_split_across_packets_is_finished_by_the_writer(tmp_path: Path) -> None:
    async with front_and_writer(tmp_path) as (node, front, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            big = b"y" * 199_999 + b"\n"
            request = _write(big)
            writer.write(request[:1000])  # the headers and the body's first bytes
            await writer.drain()
            async with asyncio.timeout(10):
                while front.handover.handed == 0:  # noqa: ASYNC110 - nothing to wait on
                    await asyncio.sleep(0.01)
            writer.write(request[1000:])
            assert await _answers(reader, 1) == [(200, b"")]
            assert node.handovers is not None and node.handovers.adopted == 1
        finally:
            writer.close()
    assert await asyncio.to_thread(_stored, tmp_path) == [big.rstrip(b"\n")]


async def test_without_the_writers_hand_over_socket_the_front_relays(tmp_path: Path) -> None:
    async with front_and_writer(tmp_path) as (node, front, port):
        assert node.handovers is not None
        node.handovers.stop()  # as when the writer restarts: nobody takes connections
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            big = b"z" * 99_999 + b"\n"
            writer.write(_write(big) + _read("w-chunk000000000", 1 << 20))
            assert await _answers(reader, 2) == [(200, b""), (200, big)]
            assert front.handover.handed == 0
        finally:
            writer.close()


async def test_a_hand_over_cut_short_closes_the_clients_connection(tmp_path: Path) -> None:
    """A front that dies between the pieces of a hand-over: the writer drops the connection
    (the client sees it close, nothing answered) and keeps taking others."""
    async with front_and_writer(tmp_path) as (node, _, _):
        path = handover_path(str(tmp_path / "writer.sock"))
        client, server_side = socket.socketpair()
        client.settimeout(10)
        try:
            request = _write(b"q" * (3 * PIECE))
            # The rest never comes: the channel closes after the first piece.
            await asyncio.to_thread(_hand_over, path, server_side, request, 1)
            assert await asyncio.to_thread(client.recv, 100) == b""  # closed, no answer
        finally:
            client.close()
        assert node.handovers is not None and node.handovers.adopted == 0
        assert not await asyncio.to_thread((tmp_path / "data" / "c").exists)


@pytest.mark.parametrize("pieces", [1, 3])
async def test_a_hand_over_by_hand_is_served(tmp_path: Path, pieces: int) -> None:
    """The writer's end alone: a connection and its first bytes, in one piece or several."""
    async with front_and_writer(tmp_path) as (node, _, _):
        path = handover_path(str(tmp_path / "writer.sock"))
        client, server_side = socket.socketpair()
        client.settimeout(10)
        body = b"p" * ((pieces - 1) * PIECE + 100) + b"\n"
        request = _write(body)
        try:
            await asyncio.to_thread(_hand_over, path, server_side, request, pieces)
            answer = await asyncio.to_thread(client.recv, 1000)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        finally:
            client.close()
        assert node.handovers is not None and node.handovers.adopted == 1
    assert await asyncio.to_thread(_stored, tmp_path) == [body.rstrip(b"\n")]
