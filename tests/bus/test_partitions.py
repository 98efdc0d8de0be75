"""Partitioned categories on a real node: create (idempotent, durable across a restart), route
by key (client send, keyed producer, ``chukcha send --key``), refusals that change nothing
(another count over data, a taken partition name, bad counts, a partition's own name), and each
partition readable as an ordinary category by the Go-style API."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from chukcha import Client
from chukcha.errors import RequestRejectedError
from chukcha.partitioning import partition_category, partition_of
from chukcha.testing import run_node


async def read_all(client: Client, category: str) -> list[dict[str, Any]]:
    """Every event of ``category`` (no group)."""
    out: list[dict[str, Any]] = []
    consumer = client.consumer(category, register=False)
    try:
        while batches := await consumer.read(timeout=0.5):
            for b in batches:
                out += [orjson.loads(m) for m in b.messages()]
    finally:
        await consumer.stop()
    return out


def orders(n: int) -> list[dict[str, Any]]:
    return [{"id": f"o{i}", "customer": f"c{i % 9}", "amount": i} for i in range(n)]


async def test_create_route_by_key_and_restart(tmp_path: Path) -> None:
    async with run_node(tmp_path / "data") as node, Client([node.url]) as client:
        assert await client.partitions("orders") == 0
        names = await client.create_partitions("orders", 4)
        assert names == [f"orders.p000{i}" for i in range(4)]
        assert await client.create_partitions("orders", 4) == names  # the same: a no-op
        ids = await client.send("orders", orders(40), key=lambda o: o["customer"])
        assert ids == [f"o{i}" for i in range(40)]
        async with client.producer("orders", key=lambda o: o["customer"]) as producer:
            await producer.send_many(orders(50)[40:])
            await producer.send({"id": "o50", "customer": "c0", "amount": 50})
        seen: list[str] = []
        for p, name in enumerate(names):
            events = await read_all(client, name)
            assert all(partition_of(e["customer"], 4) == p for e in events)
            seen += [e["id"] for e in events]
        assert sorted(seen) == sorted(f"o{i}" for i in range(51))
        assert await client.list_chunks("orders") == []  # nothing in the plain category
        with pytest.raises(ValueError, match="is not partitioned"):
            await client.send("other", orders(1), key=lambda o: o["customer"])
        with pytest.raises(TypeError, match="a key is a string or an integer"):
            await client.send("orders", orders(1), key=lambda o: 1.5)  # type: ignore[arg-type,return-value]
    # Recorded durably: a restarted node still knows it.
    async with run_node(tmp_path / "data") as node, Client([node.url]) as client:
        assert await client.partitions("orders") == 4


async def test_refusals_change_nothing(tmp_path: Path) -> None:
    async with run_node(tmp_path / "data") as node, Client([node.url]) as client:
        await client.create_partitions("empty", 2)
        assert await client.create_partitions("empty", 3) == [  # no data yet: allowed
            "empty.p0000", "empty.p0001", "empty.p0002"]
        await client.create_partitions("orders", 4)
        await client.send("orders", orders(5), key=lambda o: o["customer"])
        with pytest.raises(RequestRejectedError, match="holds data") as info:
            await client.create_partitions("orders", 8)
        assert info.value.status == 409
        assert await client.partitions("orders") == 4
        # A partition name taken by a category with data.
        await client.send(partition_category("logs", 1), [{"id": "x"}])
        with pytest.raises(RequestRejectedError, match="already exists with data"):
            await client.create_partitions("logs", 4)
        assert await client.partitions("logs") == 0
        for bad in (0, 1025):
            with pytest.raises(ValueError, match="from 1 to 1024"):
                await client.create_partitions("x", bad)
        async with aiohttp.ClientSession() as http:
            for params, status, text in [
                ({"category": "x", "count": "0"}, 400, "from 1 to 1024"),
                ({"category": "x", "count": "1025"}, 400, "count"),
                ({"category": "x", "count": "-1"}, 400, "count"),
                ({"category": "orders.p0003", "count": "2"}, 400, "name of a partition"),
            ]:
                async with http.get(f"{node.url}/partitions", params=params) as resp:
                    assert resp.status == status, await resp.text()
                    assert text in await resp.text()
        assert await client.partitions("x") == 0


async def test_a_partition_is_an_ordinary_category_on_the_wire(tmp_path: Path) -> None:
    """The Go-style API (``/write``, ``/read``, ``/listChunks``) works on a partition."""
    async with run_node(tmp_path / "data") as node, Client([node.url]) as client:
        await client.create_partitions("orders", 2)
        await client.send("orders", orders(10), key=lambda o: o["customer"])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{node.url}/listChunks",
                                params={"category": "orders.p0001"}) as resp:
                chunks = orjson.loads(await resp.read())
            assert chunks, "partition 1 got some of the 10 events"
            async with http.get(f"{node.url}/read", params={
                    "category": "orders.p0001", "chunk": chunks[0]["name"], "off": "0",
                    "max_size": "100000"}) as resp:
                body = await resp.read()
        got = [orjson.loads(line) for line in body.splitlines()]
        assert got and all(partition_of(e["customer"], 2) == 1 for e in got)


@pytest.mark.allow_blocking  # subprocess orchestration
async def test_cli_partitions_and_send_by_key(tmp_path: Path) -> None:
    async def cli(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chukcha", *args, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        async with asyncio.timeout(30):
            out, err = await proc.communicate(stdin)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async with run_node(tmp_path / "data") as node, Client([node.url]) as client:
        code, out, err = await cli("partitions", "orders", "3", "--node", node.url)
        assert code == 0, err
        assert out.split() == ["orders:", "3", "partitions", "orders.p0000", "orders.p0001",
                               "orders.p0002"]
        code, out, err = await cli("partitions", "orders", "--node", node.url)
        assert code == 0 and "orders: 3 partitions" in out
        lines = b"".join(orjson.dumps(o) + b"\n" for o in orders(12))
        code, out, err = await cli("send", "orders", "--key", "customer", "--node", node.url,
                                   stdin=lines)
        assert code == 0, err
        total = 0
        for p in range(3):
            events = await read_all(client, partition_category("orders", p))
            assert all(partition_of(e["customer"], 3) == p for e in events)
            total += len(events)
        assert total == 12
        code, out, err = await cli("send", "orders", "--key", "nope", "--node", node.url,
                                   stdin=lines)
        assert code == 1 and "no string or integer field 'nope'" in err
        code, out, err = await cli("partitions", "orders", "5", "--node", node.url)
        assert code == 1 and "holds data" in err
        code, out, err = await cli("send", "plain", "--key", "customer", "--node", node.url,
                                   stdin=lines)
        assert code == 1 and "is not partitioned" in err
