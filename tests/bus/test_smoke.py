from __future__ import annotations

import asyncio

import aiohttp

from chukcha.bus.node import Node


async def test_write_then_read(node: Node, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{node.url}/write?category=c", data=b"a\nb\n") as r:
        assert r.status == 200, await r.text()
    async with http.get(f"{node.url}/listChunks?category=c") as r:
        chunks = await r.json()
    assert chunks == [{"name": "moscow-chunk000000000", "complete": False, "size": 4}]
    async with http.get(
        f"{node.url}/read?category=c&chunk=moscow-chunk000000000&off=0&max_size=100"
    ) as r:
        assert await r.read() == b"a\nb\n"


async def test_read_long_poll_wakes_on_write(node: Node, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{node.url}/write?category=c", data=b"a\n") as r:
        assert r.status == 200
    url = f"{node.url}/read?category=c&chunk=moscow-chunk000000000&off=2&max_size=100&wait=30"
    async with asyncio.timeout(10):
        pending = asyncio.ensure_future(http.get(url))
        # The poll is parked until the write below: it cannot have answered with data yet.
        async with http.post(f"{node.url}/write?category=c", data=b"b\n") as r:
            assert r.status == 200
        async with await pending as r:
            assert await r.read() == b"b\n"
