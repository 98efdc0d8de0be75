"""``ChunkFetcher``: the zero-copy catch-up reader, against a real node and odd servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from chukcha.bus.fetch import ChunkFetcher, UnsupportedResponseError
from chukcha.testing import run_node


async def test_reads_a_real_nodes_chunk_into_the_buffer_over_one_connection(
    tmp_path: Path,
) -> None:
    async with run_node(tmp_path / "a", "a") as node, aiohttp.ClientSession() as http:
        body = b"".join(f"message {i:05d}\n".encode() for i in range(5000))
        async with http.post(f"{node.url}/write?category=c", data=body) as r:
            assert r.status == 200
        buf = bytearray(10_000)
        got = bytearray()
        async with ChunkFetcher(node.url) as fetcher:
            while True:
                status, n = await fetcher.read({"category": "c", "chunk": "a-chunk000000000",
                                                "off": str(len(got)), "max_size": "10000"}, buf)
                assert status == 200
                if n == 0:
                    break
                assert buf[n - 1:n] == b"\n"  # whole messages only
                got += buf[:n]
            assert bytes(got) == body
            status, n = await fetcher.read({"category": "c", "chunk": "a-chunk000000009",
                                            "off": "0", "max_size": "10000"}, buf)
            assert status == 404
            assert b"not found" in buf[:n]


@asynccontextmanager
async def raw_server(response: bytes) -> AsyncIterator[str]:
    """A server that answers every request with ``response`` (then keeps the connection)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed the connection
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("response", "match"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab\n\r\n0\r\n\r\n",
         "transfer-encoding"),
        (b"HTTP/1.1 200 OK\r\n\r\n", "no Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100, "does not fit"),
        (b"garbage\r\n\r\n", "bad status line"),
    ],
)
async def test_unsupported_responses_raise_so_the_caller_falls_back(
    response: bytes, match: str
) -> None:
    async with raw_server(response) as url, ChunkFetcher(url) as fetcher:
        with pytest.raises(UnsupportedResponseError, match=match):
            await fetcher.read({"off": "0"}, bytearray(10))


async def test_connection_close_is_honoured_and_a_new_connection_made() -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nab\n"
    async with raw_server(response) as url, ChunkFetcher(url) as fetcher:
        buf = bytearray(10)
        for _ in range(2):
            assert await fetcher.read({"off": "0"}, buf) == (200, 3)
            assert bytes(buf[:3]) == b"ab\n"


def test_only_plain_http_urls() -> None:
    with pytest.raises(UnsupportedResponseError):
        ChunkFetcher("https://127.0.0.1:1")
