"""Consumer groups and retention on a real node (the server side, through the client API)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest

from chukcha.bus.config import Peer
from chukcha.bus.group_registry import GROUPS_FILE, RetentionPolicy
from chukcha.bus.node import Node
from chukcha.client import Client
from chukcha.errors import InvalidAckError, RequestRejectedError, ServerError
from chukcha.testing import run_node


@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[Node]:
    """A node whose chunks hold about one write each, so chunks complete quickly."""
    async with run_node(tmp_path / "small", instance="a", max_chunk_size=100) as n:
        yield n


@pytest.fixture
async def client(small: Node) -> AsyncIterator[Client]:
    async with Client([small.url]) as c:
        yield c


async def three_chunks(c: Client, category: str = "g") -> list[str]:
    for i in range(3):
        await c.send(category, [b"%d" % i * 80])
    names = [x.name for x in await c.list_chunks(category)]
    assert len(names) == 3
    return names


async def live(c: Client, category: str = "g") -> list[str]:
    return [x.name for x in await c.list_chunks(category)]


async def test_chunk_is_tombstoned_only_when_every_group_acked(client: Client) -> None:
    names = await three_chunks(client)
    api, url = client.api, client.nodes[0]
    await api.register_group(url, "g", "billing")
    await api.register_group(url, "g", "audit")
    await api.ack(url, "g", names[0], 81, group="billing")
    await api.ack(url, "g", names[0], 81, group="billing")  # idempotent
    assert await live(client) == names
    listing = await api.list_groups(url, "g")
    assert listing["groups"] == [{"name": "audit", "acked": []},
                                 {"name": "billing", "acked": [names[0]]}]
    await api.ack(url, "g", names[0], 81, group="audit")
    assert await live(client) == names[1:]
    await api.ack(url, "g", names[0], 81, group="audit")  # acking a tombstone is fine
    # ... but not for a group nobody registered (a typo must not pass silently).
    with pytest.raises(RequestRejectedError, match="not registered"):
        await api.ack(url, "g", names[0], 81, group="audti")


async def test_unregistered_group_ack_is_refused_and_changes_nothing(client: Client) -> None:
    names = await three_chunks(client)
    api, url = client.api, client.nodes[0]
    await api.register_group(url, "g", "billing")
    with pytest.raises(RequestRejectedError, match="not registered") as info:
        await api.ack(url, "g", names[0], 81, group="biling")
    assert info.value.status == 400
    with pytest.raises(RequestRejectedError, match="invalid group name"):
        await api.register_group(url, "g", "bad/name")
    assert await live(client) == names
    assert (await api.list_groups(url, "g"))["groups"] == [{"name": "billing", "acked": []}]


async def test_group_acks_are_checked_like_plain_acks(client: Client) -> None:
    names = await three_chunks(client)
    api, url = client.api, client.nodes[0]
    await api.register_group(url, "g", "billing")
    with pytest.raises(ServerError, match="not been read to the end"):
        await api.ack(url, "g", names[0], 10, group="billing")
    with pytest.raises(ServerError, match="not complete"):
        await api.ack(url, "g", names[2], 81, group="billing")
    assert (await api.list_groups(url, "g"))["groups"] == [{"name": "billing", "acked": []}]
    assert issubclass(InvalidAckError, ValueError)


async def test_ack_without_group_and_no_groups_keeps_the_go_behaviour(client: Client) -> None:
    names = await three_chunks(client)
    api, url = client.api, client.nodes[0]
    await api.ack(url, "g", names[0], 81)
    assert await live(client) == names[1:]
    assert (await api.list_groups(url, "g"))["groups"] == []


async def test_ack_without_group_is_the_default_group_while_groups_are_registered(
    client: Client,
) -> None:
    names = await three_chunks(client)
    api, url = client.api, client.nodes[0]
    await api.register_group(url, "g", "billing")
    # A Go consumer's plain ack must not delete billing's input.
    await api.ack(url, "g", names[0], 81)
    assert await live(client) == names
    assert (await api.list_groups(url, "g"))["groups"] == [
        {"name": "billing", "acked": []}, {"name": "default", "acked": [names[0]]}]
    await api.ack(url, "g", names[1], 81, group="billing")
    assert await live(client) == names  # default has not acked names[1]
    await api.ack(url, "g", names[0], 81, group="billing")
    assert await live(client) == names[1:]  # both groups acked names[0]
    with pytest.raises(ServerError, match="not been read to the end"):
        await api.ack(url, "g", names[1], 10)


async def test_unregistering_a_group_releases_what_the_others_acked(client: Client) -> None:
    names = await three_chunks(client)
    api, url = client.api, client.nodes[0]
    await api.register_group(url, "g", "fast")
    await api.register_group(url, "g", "stuck")
    for name in names[:2]:
        await api.ack(url, "g", name, 81, group="fast")
    assert await live(client) == names
    assert await client.unregister_group("g", "stuck") is True
    assert await live(client) == names[2:]
    assert await client.unregister_group("g", "stuck") is False  # gone already


async def test_groups_and_their_acks_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with run_node(data, instance="a", max_chunk_size=100) as n, Client([n.url]) as c:
        names = await three_chunks(c)
        await c.api.register_group(n.url, "g", "one")
        await c.api.register_group(n.url, "g", "two")
        await c.api.ack(n.url, "g", names[0], 81, group="one")
    saved = orjson.loads(await asyncio.to_thread((data / GROUPS_FILE).read_bytes))
    assert saved["categories"]["g"]["groups"]["one"] == {names[0]: 81}
    async with run_node(data, instance="a", max_chunk_size=100) as n, Client([n.url]) as c:
        assert [x.name for x in await c.list_chunks("g")][:1] == names[:1]
        await c.api.ack(n.url, "g", names[0], 81, group="two")
        assert names[0] not in [x.name for x in await c.list_chunks("g")]
        # The registry file is not a category.
        assert await c.list_categories() == ["g"]


async def test_retention_by_bytes_deletes_oldest_complete_chunks(
    small: Node, client: Client
) -> None:
    names = await three_chunks(client)
    await client.api.register_group(client.nodes[0], "g", "slow")  # acks nothing
    await client.api.get_json(client.nodes[0], "/retention",
                              {"category": "g", "max_bytes": "170"})
    deleted = await small.groups.apply_retention()
    # 243 bytes in 3 chunks; dropping the oldest (81) leaves 162 <= 170.
    assert deleted == [f"g/{names[0]}"]
    assert await live(client) == names[1:]
    assert await small.groups.apply_retention() == []


async def test_retention_by_age_never_touches_the_open_chunk(
    small: Node, client: Client
) -> None:
    names = await three_chunks(client)
    await small.groups.set_retention("g", RetentionPolicy(max_age=60))
    assert await small.groups.apply_retention() == []  # nothing is a minute old yet
    deleted = await small.groups.apply_retention(now=time.time() + 3600)
    assert deleted == [f"g/{names[0]}", f"g/{names[1]}"]
    assert await live(client) == names[2:]


async def test_bad_retention_parameters_are_refused(client: Client) -> None:
    with pytest.raises(RequestRejectedError, match="max_bytes"):
        await client.api.get_json(client.nodes[0], "/retention",
                                  {"category": "g", "max_bytes": "-1"})
    policy = await client.api.get_json(client.nodes[0], "/retention", {"category": "g"})
    assert policy == {"max_age": None, "max_bytes": None}
    with pytest.raises(ValueError, match="positive"):
        RetentionPolicy(max_age=0)


async def test_a_copied_ack_is_recorded_even_before_the_chunk_is_here(client: Client) -> None:
    names = await three_chunks(client)
    api, url = client.api, client.nodes[0]
    await api.register_group(url, "g", "one")
    await api.register_group(url, "g", "two")
    # Made on another node: recorded without checks against this node's copy.
    await api.copy_group_ack(url, "g", "b-chunk000000004", 10, "one", timeout=5)
    await api.copy_group_ack(url, "g", names[0], 81, "one", timeout=5)
    acked = {g["name"]: g["acked"] for g in (await api.list_groups(url, "g"))["groups"]}
    assert acked == {"one": ["a-chunk000000000", "b-chunk000000004"], "two": []}
    await api.copy_group_ack(url, "g", names[0], 81, "two", timeout=5)
    assert await live(client) == names[1:]  # every group acked: tombstoned
    with pytest.raises(RequestRejectedError, match="not registered"):
        await api.copy_group_ack(url, "g", names[1], 81, "three", timeout=5)


@pytest.fixture
def dead_peer() -> Iterator[Peer]:
    """A peer that refuses connections (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        host, port = sock.getsockname()[:2]
        yield Peer("z", f"{host}:{port}")


async def test_changes_for_an_unreachable_peer_wait_in_a_durable_outbox(
    tmp_path: Path, dead_peer: Peer
) -> None:
    data = tmp_path / "d"
    async with (
        run_node(data, instance="a", max_chunk_size=100, peers=(dead_peer,)) as n,
        Client([n.url]) as c,
    ):
        names = await three_chunks(c)
        await c.api.register_group(n.url, "g", "billing")
        await c.api.register_group(n.url, "g", "billing")  # not queued twice
        await c.api.ack(n.url, "g", names[0], 81, group="billing")
        assert n.groups.pending() == {"z": 2}
        assert await live(c) == names[1:]  # the only group known here acked it
    saved = orjson.loads(await asyncio.to_thread((data / GROUPS_FILE).read_bytes))
    assert saved["outbox"] == {"z": [
        {"op": "register", "category": "g", "group": "billing"},
        {"op": "ack", "category": "g", "group": "billing", "chunk": names[0], "size": 81},
    ]}
    async with run_node(data, instance="a", max_chunk_size=100, peers=(dead_peer,)) as n:
        assert n.groups.pending() == {"z": 2}  # still queued after a restart


async def test_forwards_from_peers_are_applied_and_not_forwarded_again(
    tmp_path: Path, dead_peer: Peer
) -> None:
    async with (
        run_node(tmp_path / "d", instance="a", max_chunk_size=100, peers=(dead_peer,)) as n,
        Client([n.url]) as c,
    ):
        names = await three_chunks(c)
        api, url = c.api, n.url
        await api.get_json(url, "/groups/register", {"category": "g", "group": "billing",
                                                     "from": "z"})
        # An ack forwarded by a peer implies its group's registration (forwards of two
        # origins may arrive in any order).
        await api.get_json(url, "/groups/ack", {"category": "g", "group": "audit",
                                                "chunk": names[0], "size": "81", "from": "z"})
        assert n.groups.pending() == {}
        acked = {g["name"]: g["acked"] for g in (await api.list_groups(url, "g"))["groups"]}
        assert acked == {"audit": [names[0]], "billing": []}
        assert await live(c) == names  # billing has not acked
        await api.get_json(url, "/groups/ack", {"category": "g", "group": "billing",
                                                "chunk": names[0], "size": "81", "from": "z"})
        assert await live(c) == names[1:]
        with pytest.raises(RequestRejectedError, match=r"instance .no/pe."):
            await api.get_json(url, "/groups/register", {"category": "g", "group": "x",
                                                         "from": "no/pe"})
