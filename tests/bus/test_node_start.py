"""A node whose start fails part-way leaves nothing running and releases the data directory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from chukcha.bus.config import NodeConfig
from chukcha.bus.node import Node, NodeState
from chukcha.testing import run_node
from tests.bus.conftest import Api


async def test_a_failed_cluster_start_releases_the_lock_the_port_and_the_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http: aiohttp.ClientSession
) -> None:
    data = tmp_path / "data"
    node = Node(NodeConfig(instance="moscow", data_dir=data, listen=("127.0.0.1", 0)))

    async def failing_start(address: str) -> None:
        raise OSError(f"cannot join the cluster as {address} (injected)")

    monkeypatch.setattr(node.cluster, "start", failing_start)
    with pytest.raises(OSError, match="injected"):
        await node.start()
    assert node.state is NodeState.NEW
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "chunk-rotation"]
    assert not node._serving and node._sock is None
    await node.stop()  # still fine to call

    # running.lock is free: another node starts on the same directory and serves.
    async with run_node(data, instance="moscow") as other:
        api = Api(http, other.url)
        await api.write("c", b"hello\n")
        assert await api.read("c", "moscow-chunk000000000") == b"hello\n"
