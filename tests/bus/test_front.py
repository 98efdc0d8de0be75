"""A front worker (``--workers``) in this process, in front of a real node's private socket:
concurrent writes are coalesced, yet never across credentials, and every answer is the node's."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp

from tests.bus.conftest import front_and_writer


async def test_front_coalesces_writes_but_never_across_credentials(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    await asyncio.to_thread(tokens.write_text, "good-token\n")
    async with front_and_writer(tmp_path, auth_token_file=tokens) as (node, _, port):
        url = f"http://127.0.0.1:{port}"
        statuses: Counter[tuple[str, int]] = Counter()

        async def client(token: str, n: int) -> None:
            headers = {"Authorization": f"Bearer {token}"}
            async with aiohttp.ClientSession(headers=headers) as http:
                for i in range(n):
                    async with http.post(f"{url}/write", params={"category": "c"},
                                         data=b"%s-%d\n" % (token.encode(), i)) as resp:
                        await resp.read()
                        statuses[(token, resp.status)] += 1

        await asyncio.gather(*(client(t, 100) for t in ["good-token", "bad-token"] * 8))
        assert statuses == {("good-token", 200): 800, ("bad-token", 401): 800}
        # The node saw fewer writes than the clients made: the front coalesced them.
        chunks = node.store.list_chunks("c")
        path = tmp_path / "data" / "c" / chunks[0].name
        stored = (await asyncio.to_thread(path.read_bytes)).splitlines()
        assert sorted(stored) == sorted(b"good-token-%d" % i for i in range(100)
                                        for _ in range(8))
        writes = node.store.traffic()["c"].writes
        assert writes < 800, f"{writes} writes reached the node: nothing coalesced"
        # Everything else is relayed as is, errors included.
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/listChunks", params={"category": "c"}) as resp:
                assert resp.status == 200
                assert [c["name"] for c in await resp.json()] == ["w-chunk000000000"]
            async with http.get(f"{url}/read", params={"category": "../x", "chunk": "a",
                                                       "off": "0", "max_size": "1"}) as resp:
                assert resp.status == 400
                assert "category" in await resp.text()
