from __future__ import annotations

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
