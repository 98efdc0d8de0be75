"""``HEAD`` requests on a real node, kept alive: the answer is the head that ``GET`` would get
(status, ``Content-Length``) and no body, as the Go server (fasthttp) answers them. A body after
a HEAD answer is read by the client as the start of the next answer on the connection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chukcha.testing import run_node
from tests.bus.conftest import front_and_writer

_BIG = b"".join(b"%07d %s\n" % (i, b"h" * 92) for i in range(12_000))  # ~1.2 MB: from the file


async def _head_then_get(port: int, target: bytes) -> tuple[bytes, bytes]:
    """HEAD and GET of ``target`` pipelined on one connection: the two heads (the GET's body
    read after its head)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"HEAD %b HTTP/1.1\r\nHost: t\r\n\r\nGET %b HTTP/1.1\r\nHost: t\r\n\r\n"
                     % (target, target))
        async with asyncio.timeout(20):
            head = await reader.readuntil(b"\r\n\r\n")
            after = await reader.readuntil(b"\r\n\r\n")
            length = _length(after)
            await reader.readexactly(length)
    finally:
        writer.close()
    return head, after


def _length(head: bytes) -> int:
    return next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:"))


_CHUNK = b"w-chunk000000000"
_TARGETS = [
    b"/listCategories",
    b"/read?category=c&chunk=%b&off=0&max_size=100" % _CHUNK,  # an answer in memory
    b"/read?category=c&chunk=%b&off=0&max_size=4000000" % _CHUNK,  # sent from the file
]


async def _check(port: int) -> None:
    for target in _TARGETS:
        head, after = await _head_then_get(port, target)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), (target, head)
        assert after.startswith(b"HTTP/1.1 200 OK\r\n"), (target, after)  # no body in between
        if b"max_size=4000000" not in target:
            assert _length(head) == _length(after), (target, head, after)


@pytest.mark.allow_blocking
async def test_a_head_request_is_answered_without_a_body(tmp_path: Path) -> None:
    async with run_node(tmp_path / "data", "w") as node:
        await node.store.write("c", b"first\n")
        await node.store.write("c", _BIG)
        await _check(int(node.address.rsplit(":", 1)[1]))


@pytest.mark.allow_blocking
async def test_a_head_request_relayed_by_a_front_is_answered_without_a_body(
    tmp_path: Path,
) -> None:
    async with front_and_writer(tmp_path) as (node, front, port):
        await node.store.write("c", b"first\n")
        await node.store.write("c", _BIG)
        front.router.handover = None  # relayed, as under TLS (no hand-over)
        await _check(port)
