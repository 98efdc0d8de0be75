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
from chukcha.errors import DuplicateInstanceError
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
