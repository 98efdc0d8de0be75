"""A mixed cluster: the Go server (``../shared/bin/chukcha-go``) and our node as static peers
of each other (issue 10, point 4). Skipped, saying why, where the binary is absent."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from chukcha.bus.config import Peer, ReplicationConfig
from chukcha.testing import bind_loopback, run_node
from tests.integration.cluster_helpers import wait_for, write
from tests.integration.go_binary import free_port, go_binary, run_go_node

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def binary() -> Path:
    return go_binary()  # or skip, saying why


async def test_replication_both_ways_and_no_spinning_on_a_go_peer(
    tmp_path: Path, http: aiohttp.ClientSession, binary: Path
) -> None:
    sock = bind_loopback()
    py_addr = "{}:{}".format(*sock.getsockname()[:2])
    go_port = free_port()
    go_addr = f"127.0.0.1:{go_port}"
    peers = f"go1={go_addr},py-1={py_addr}"
    async with run_go_node(binary, tmp_path / "go1", "go1", go_port, peers) as go_url, \
            run_node(tmp_path / "py-1", "py-1", peers=(Peer("go1", go_addr),),
                     listen_fd=sock.detach(),
                     replication=ReplicationConfig(poll_wait=2.0)) as node:
        # Go -> ours.
        assert (await write(http, go_url, "mixed", b"from-go\n")).status == 200

        async def py_has_go_chunk() -> bool:
            return (await _sizes(http, node.url)).get(
                "go1-chunk000000000") == len(b"from-go\n")

        await wait_for(py_has_go_chunk, what="our node to replicate the Go node's chunk")
        # Ours -> Go (the Go node pulls from its peers; its progress reports count here).
        assert (await write(http, node.url, "mixed", b"from-py\n")).status == 200

        async def go_has_py_chunk() -> bool:
            return (await _sizes(http, go_url)).get(
                "py-1-chunk000000000") == len(b"from-py\n")

        await wait_for(go_has_py_chunk, what="the Go node to replicate our chunk")

        # The Go server answers /read?wait= at once: detected, and its idle open chunk is then
        # polled with a growing pause instead of in a tight loop (it was ~320 reads/s).
        assert node.cluster.replicator is not None
        link = node.cluster.replicator.links["go1"]
        await wait_for(lambda: _true(link.no_long_poll), what="the no-long-poll detection")
        start, first = time.monotonic(), link.empty_polls
        await wait_for(lambda: _true(link.empty_polls >= first + 5), what="five idle polls")
        assert time.monotonic() - start >= 0.05 + 0.1 + 0.2 + 0.4  # the pauses between them

        # New data is still picked up.
        assert (await write(http, go_url, "mixed", b"more-from-go\n")).status == 200

        async def py_has_more() -> bool:
            return (await _sizes(http, node.url)).get(
                "go1-chunk000000000") == len(b"from-go\nmore-from-go\n")

        await wait_for(py_has_more, what="our node to replicate the Go node's new data")


async def _sizes(http: aiohttp.ClientSession, url: str) -> dict[str, int]:
    """``/listChunks`` of ``mixed`` (the Go server answers ``null`` as text/plain)."""
    async with http.get(f"{url}/listChunks", params={"category": "mixed"}) as r:
        assert r.status == 200, await r.text()
        return {c["name"]: c["size"] for c in orjson.loads(await r.read()) or []}


async def _true(value: bool) -> bool:
    return value
