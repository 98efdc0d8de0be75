"""``/replication/events`` and ``/replication/ack`` on the wire (Go's NDJSON shape)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from chukcha.bus.config import Peer
from chukcha.testing import bind_loopback, run_node


async def next_event(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            line = await resp.content.readline()
            assert line, "stream ended"
            msg: dict[str, Any] = orjson.loads(line)
            if msg.get("Type"):
                return msg


async def test_events_stream_announces_chunks_and_acks_and_replays_on_subscribe(
    tmp_path: Path,
) -> None:
    async with run_node(tmp_path / "a", "a", max_chunk_size=8) as node, \
            aiohttp.ClientSession() as http:
        async with http.post(f"{node.url}/write?category=c", data=b"first\n") as r:
            assert r.status == 200
        async with http.get(f"{node.url}/replication/events?instance=sub") as events:
            assert events.status == 200
            first = orjson.loads(await events.content.readline())
            assert first == {"Type": "", "Chunk": {"Owner": "", "Category": "",
                                                   "FileName": ""}}  # the empty message
            # The replay: our latest chunk per category.
            assert await next_event(events) == {"Type": "chunk_created", "Chunk": {
                "Owner": "a", "Category": "c", "FileName": "a-chunk000000000"}}
            async with http.post(f"{node.url}/write?category=c", data=b"second\n") as r:
                assert r.status == 200  # over max_chunk_size: a new chunk
            assert (await next_event(events))["Chunk"]["FileName"] == "a-chunk000000001"
            async with http.get(f"{node.url}/ack?category=c&chunk=a-chunk000000000&size=6") as r:
                assert r.status == 200
            assert await next_event(events) == {"Type": "chunk_ack", "Chunk": {
                "Owner": "a", "Category": "c", "FileName": "a-chunk000000000"}}

            # A newer connection from the same instance replaces this one, and is sent the
            # state again, the ack included (an ack a peer missed is re-delivered).
            async with http.get(f"{node.url}/replication/events?instance=sub") as newer:
                replay = [await next_event(newer), await next_event(newer)]
                assert {(m["Type"], m["Chunk"]["FileName"]) for m in replay} == {
                    ("chunk_created", "a-chunk000000001"), ("chunk_ack", "a-chunk000000000")}
                async with asyncio.timeout(10):
                    assert await events.content.read() == b""  # the older stream ended

        for bad in ("", "instance=", "instance=../x"):
            async with http.get(f"{node.url}/replication/events?{bad}") as r:
                assert r.status == 400


async def test_replication_ack_validates_and_records(tmp_path: Path) -> None:
    ghost = bind_loopback()
    host, port = ghost.getsockname()[:2]
    try:
        async with run_node(tmp_path / "a", "a", peers=(Peer("b", f"{host}:{port}"),)) as node, \
                aiohttp.ClientSession() as http:
            base = f"{node.url}/replication/ack"
            for bad in ("category=c&chunk=a-chunk000000000&instance=b",
                        "category=c&chunk=../x&instance=b&size=1",
                        "category=c&chunk=a-chunk000000000&instance=b&size=-1",
                        "chunk=a-chunk000000000&instance=b&size=1"):
                async with http.get(f"{base}?{bad}") as r:
                    assert r.status == 400, bad
            server = node.cluster.server
            assert server.progress("c", "b") is None  # bad reports changed nothing
            async with http.get(f"{base}?category=c&chunk=a-chunk000000000&instance=b"
                                "&size=10") as r:
                assert r.status == 200
            assert server.progress("c", "b") == ("a-chunk000000000", 10)
            # Progress never goes backwards (a late, smaller report).
            async with http.get(f"{base}?category=c&chunk=a-chunk000000000&instance=b"
                                "&size=4") as r:
                assert r.status == 200
            assert server.progress("c", "b") == ("a-chunk000000000", 10)
    finally:
        ghost.close()
