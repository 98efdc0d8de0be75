"""A node without ``--etcd`` never loads the etcd client (aetcd, with grpc and protobuf: about
0.1 s of CPU and several MiB per process); with ``--etcd`` it does. Checked on real node
processes from outside: grpc's C extension is in the process's memory map once grpc is
imported."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from chukcha.testing import NodeProcess, run_etcd
from tests.integration.test_workers import _wait_for_children

pytestmark = pytest.mark.timeout(120)


def _loads_grpc(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "/grpc/_cython/cygrpc" in maps


async def _serve_a_write(node: NodeProcess) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            f"{node.url}/write", params={"category": "c"}, data=b"hello\n") as resp:
        assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("workers", [1, 3])
async def test_a_node_without_etcd_does_not_load_the_etcd_client(
    tmp_path: Path, workers: int,
) -> None:
    node = NodeProcess(tmp_path / "data", "n", ["--workers", str(workers)])
    await node.start()
    try:
        assert node.proc is not None
        pids = [node.proc.pid]
        if workers > 1:
            pids += await _wait_for_children(node.proc.pid, workers, set())
        await _serve_a_write(node)
        assert [pid for pid in pids if await asyncio.to_thread(_loads_grpc, pid)] == []
    finally:
        assert await node.stop() == 0
        node.close()


async def test_a_node_with_etcd_loads_it(tmp_path: Path) -> None:
    # The other side of the check above: the memory map does show grpc when it is used.
    async with run_etcd(tmp_path) as etcd:
        node = NodeProcess(tmp_path / "data", "e", ["--etcd", etcd.endpoint,
                                                    "--cluster", "lazy"])
        await node.start()
        try:
            assert node.proc is not None
            await _serve_a_write(node)
            assert await asyncio.to_thread(_loads_grpc, node.proc.pid)
        finally:
            assert await node.stop() == 0
            node.close()
