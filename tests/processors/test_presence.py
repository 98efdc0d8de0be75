"""The heartbeat check (:mod:`chukcha.processors.presence`) against a real node: which
heartbeats count as another live instance, and which do not (stale, left, itself, another
split index, torn lines)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from chukcha import Client
from chukcha.bus.node import Node
from chukcha.errors import CoordinationError, CoordinationTimeoutError, DuplicateInstanceError
from chukcha.processors.presence import (
    DETECTION_WINDOW,
    Heartbeat,
    Presence,
    instances_category,
)
from chukcha.processors.split import StaticSplit

CATEGORY = instances_category("shop")


def beat(state_dir: str, *, age: float = 0.0, index: int = 0, count: int = 1,
         left: bool = False, host: str | None = None) -> bytes:
    return Heartbeat("r-" + state_dir, host or socket.gethostname(), 77, state_dir, index, count,
                     time.time() - age, left).encode()


ALONE = StaticSplit(0, 1)


async def start(client: Client, state_dir: Path, split: StaticSplit = ALONE) -> None:
    await Presence("shop", 4, state_dir, split, client).start(asyncio.Event())


async def test_only_a_fresh_overlapping_heartbeat_of_another_instance_refuses(
    node: Node, tmp_path: Path
) -> None:
    me = tmp_path / "me"
    mine = str(await asyncio.to_thread(me.resolve))
    async with Client([node.url]) as client:
        await client.send(CATEGORY, [
            beat("/old", age=DETECTION_WINDOW + 5),  # killed long ago: gone
            beat("/stopped", age=10), beat("/stopped", age=1, left=True),  # stopped cleanly
            beat(mine, age=1),  # this state directory's killed run: itself
            b'{"run": "torn', b"not json",
        ])
        presence = Presence("shop", 4, me, ALONE, client)
        await presence.start(asyncio.Event())  # nothing live: started (announced itself)
        with pytest.raises(DuplicateInstanceError, match=f"state dir {mine}"):
            await start(client, tmp_path / "other")
        await presence.leave()
        await start(client, tmp_path / "other")  # gone: the next may start
        await client.send(CATEGORY, [beat(str(await asyncio.to_thread(
            (tmp_path / "other").resolve)), left=True)])

        # Another host with the same path is another instance.
        await client.send(CATEGORY, [beat(mine, host="elsewhere")])
        with pytest.raises(DuplicateInstanceError, match="host elsewhere"):
            await start(client, me)
        await client.send(CATEGORY, [beat(mine, host="elsewhere", left=True)])

        await client.send(CATEGORY, [beat("/split1", index=1, count=2)])
        await start(client, tmp_path / "s0", StaticSplit(0, 2))  # other index: no overlap
        with pytest.raises(DuplicateInstanceError, match="pid 77 state dir /split1"):
            await start(client, tmp_path / "again", StaticSplit(1, 2))


async def test_etcd_instances_meet_plain_ones_and_other_clusters_but_not_their_own(
    node: Node, tmp_path: Path
) -> None:
    async with Client([node.url]) as client:
        await client.send(CATEGORY, [Heartbeat("r-e", "h1", 88, "/etcd1", 0, 1, time.time(),
                                               etcd="prod").encode()])

        async def start_etcd(name: str, cluster: str) -> None:
            await Presence("shop", 4, tmp_path / name, ALONE, client,
                           etcd=cluster).start(asyncio.Event())

        await start_etcd("e2", "prod")  # the same cluster: they share through etcd
        with pytest.raises(DuplicateInstanceError, match=r"through etcd \(cluster prod\).*"
                                                         r"--etcd URL --cluster prod"):
            await start(client, tmp_path / "plain")
        with pytest.raises(DuplicateInstanceError, match="one etcd cluster"):
            await start_etcd("e3", "test")
        for d in ("/etcd1", str(await asyncio.to_thread((tmp_path / "e2").resolve))):
            await client.send(CATEGORY, [Heartbeat("r", "h1" if d == "/etcd1" else
                                                   socket.gethostname(), 88, d, 0, 1,
                                                   time.time(), True, "prod").encode()])
        await client.send(CATEGORY, [beat("/plain", host="h2")])
        with pytest.raises(DuplicateInstanceError, match=r"without etcd.*restart it through"):
            await start_etcd("e4", "prod")


async def test_one_cluster_name_in_two_etcd_clusters_is_refused_older_heartbeats_are_not(
    node: Node, tmp_path: Path
) -> None:
    async with Client([node.url]) as client:
        await client.send(CATEGORY, [Heartbeat("r-e", "h1", 88, "/etcd1", 0, 1, time.time(),
                                               etcd="prod", etcd_id="00000000000000aa").encode()])
        answers = ["etcd down", "00000000000000aa"]

        async def identify() -> str:  # etcd answers on the second try
            answer = answers.pop(0)
            if answer == "etcd down":
                raise CoordinationTimeoutError("no etcd endpoint answered")
            return answer

        async def start_etcd(name: str, etcd_id: str | None = None) -> None:
            async def fixed() -> str:
                assert etcd_id is not None
                return etcd_id

            await Presence("shop", 4, tmp_path / name, ALONE, client, etcd="prod",
                           identify=identify if etcd_id is None else fixed,
                           ).start(asyncio.Event(), retry_initial=0.01)

        await start_etcd("same")  # the same etcd cluster, found after a retry
        assert answers == []

        async def no_extra() -> str:  # not retried: the start fails with the reason
            raise CoordinationError("instances through etcd need chukcha[etcd]")

        with pytest.raises(CoordinationError, match=r"need chukcha\[etcd\]"):
            await Presence("shop", 4, tmp_path / "no-extra", ALONE, client, etcd="prod",
                           identify=no_extra).start(asyncio.Event(), retry_initial=0.01)
        with pytest.raises(DuplicateInstanceError,
                           match=r"cluster prod, etcd cluster id 00000000000000aa.*this one's "
                                 r"is 00000000000000bb .*the same --etcd endpoints"):
            await start_etcd("other", "00000000000000bb")
        # A heartbeat without the ID (an older release) is taken as the same etcd cluster.
        same = str(await asyncio.to_thread((tmp_path / "same").resolve))
        await client.send(CATEGORY, [
            *(Heartbeat("r-e", host, 88, d, 0, 1, time.time(), True, "prod",
                        "00000000000000aa").encode()
              for host, d in (("h1", "/etcd1"), (socket.gethostname(), same))),
            Heartbeat("r-o", "h3", 89, "/old", 0, 1, time.time(), etcd="prod").encode()])
        await start_etcd("beside-old", "00000000000000bb")
        assert Heartbeat.decode(Heartbeat("r", "h", 1, "/d", 0, 1, 1.0, etcd="p",
                                          etcd_id="ab").encode()) == Heartbeat(
            "r", "h", 1, "/d", 0, 1, 1.0, etcd="p", etcd_id="ab")
