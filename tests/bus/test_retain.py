"""``--retain-acked``: acknowledged chunks stay readable for a while (replay), then go."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from chukcha.bus.node import Node
from chukcha.client import Client
from chukcha.errors import ServerError
from chukcha.testing import run_node

DAY = 86400.0


async def complete_chunks(c: Client, category: str, n: int = 2) -> list[tuple[str, int]]:
    """Write ``n + 1`` chunks (the node's max_chunk_size is 100): ``n`` complete ones."""
    for i in range(n + 1):
        await c.send(category, [b"%d" % i * 80])
    chunks = await c.list_chunks(category)
    assert [x.complete for x in chunks] == [True] * n + [False]
    return [(x.name, x.size) for x in chunks[:n]]


def live(node: Node, category: str) -> list[str]:
    return [c.name for c in node.store.list_chunks(category)]


async def test_a_plain_ack_keeps_the_chunk_until_its_time_is_up(tmp_path: Path) -> None:
    async with run_node(tmp_path / "d", max_chunk_size=100, retain_acked=DAY) as node, \
            Client([node.url]) as c:
        (first, size), _ = await complete_chunks(c, "log")
        await c.api.ack(node.url, "log", first, size)
        await c.api.ack(node.url, "log", first, size)  # again: still fine
        assert first in live(node, "log")
        assert await c.api.read(node.url, "log", first, 0, 1 << 20) == b"0" * 80 + b"\n"
        with pytest.raises(ServerError, match="smaller than"):  # a real ack's checks apply
            await c.api.ack(node.url, "log", first, size - 1)

        assert await node.groups.apply_retention(now=time.time() + DAY / 2) == []
        assert first in live(node, "log")
        assert await node.groups.apply_retention(now=time.time() + DAY + 1) == [f"log/{first}"]
        assert first not in live(node, "log")
        assert node.store.is_tombstoned("log", first)


async def test_without_the_flag_an_ack_deletes_at_once(tmp_path: Path) -> None:
    async with run_node(tmp_path / "d", max_chunk_size=100) as node, Client([node.url]) as c:
        (first, size), _ = await complete_chunks(c, "log")
        await c.api.ack(node.url, "log", first, size)
        assert node.store.is_tombstoned("log", first)


async def test_a_group_skips_what_it_acked_and_a_new_group_replays_it(tmp_path: Path) -> None:
    async with run_node(tmp_path / "d", max_chunk_size=100, retain_acked=DAY) as node, \
            Client([node.url]) as c:
        await c.register_group("orders", "billing")
        chunks = await complete_chunks(c, "orders")
        for name, size in chunks:
            await c.api.ack(node.url, "orders", name, size, group="billing")
        assert [n for n, _ in chunks] == live(node, "orders")[:2]  # all still here
        lag = {x.group: x for x in await node.lag.lags("orders")}
        assert lag["billing"].chunks == 1  # only the open chunk

        # The group skips what it acked: its consumer starts at the open chunk.
        consumer = c.consumer("orders", group="billing")
        async with consumer:
            got = [e for b in await consumer.read(timeout=5) for e in b.messages()]
        assert got == [b"2" * 80]
        # A new group reads the acknowledged chunks again: the replay.
        await c.register_group("orders", "audit")
        consumer = c.consumer("orders", group="audit")
        async with consumer:
            replay: list[bytes] = []
            while len(replay) < 3:
                replay += [e for b in await consumer.read(timeout=5) for e in b.messages()]
        assert sorted(replay) == [b"0" * 80, b"1" * 80, b"2" * 80]


async def test_kept_chunks_survive_a_restart_and_expire_after_it(tmp_path: Path) -> None:
    async with run_node(tmp_path / "d", max_chunk_size=100, retain_acked=DAY) as node, \
            Client([node.url]) as c:
        (first, size), _ = await complete_chunks(c, "log")
        await c.api.ack(node.url, "log", first, size)
    async with run_node(tmp_path / "d", max_chunk_size=100, retain_acked=DAY) as node:
        assert first in live(node, "log")
        assert node.groups.retain.counts() == {"log": 1}
        assert await node.groups.apply_retention(now=time.time() + DAY + 1) == [f"log/{first}"]
        assert node.groups.retain.counts() == {}


async def test_per_category_periods_override_the_default(tmp_path: Path) -> None:
    async with run_node(tmp_path / "d", max_chunk_size=100, retain_acked=DAY,
                        retain_acked_categories=(("noisy", None), ("short", 60.0))) as node, \
            Client([node.url]) as c:
        (noisy, nsize), _ = await complete_chunks(c, "noisy")
        (short, ssize), _ = await complete_chunks(c, "short")
        (kept, ksize), _ = await complete_chunks(c, "kept")
        await c.api.ack(node.url, "noisy", noisy, nsize)
        await c.api.ack(node.url, "short", short, ssize)
        await c.api.ack(node.url, "kept", kept, ksize)
        assert node.store.is_tombstoned("noisy", noisy)  # 0: deleted at once
        assert await node.groups.apply_retention(now=time.time() + 120) == [f"short/{short}"]
        assert kept in live(node, "kept")
