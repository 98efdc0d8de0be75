"""A data directory written by the Go server opens and behaves as there (issue 10, point 4):
own chunk names whose index is not 9 digits, instance names with '-', a pre-existing empty own
chunk."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from chukcha.testing import run_node
from tests.bus.conftest import Api


async def _files(path: Path) -> list[str]:
    return await asyncio.to_thread(lambda: sorted(p.name for p in path.iterdir()))


async def _make(cat_dir: Path, files: dict[str, bytes]) -> None:
    def make() -> None:
        cat_dir.mkdir(parents=True)
        for name, data in files.items():
            (cat_dir / name).write_bytes(data)

    await asyncio.to_thread(make)


async def test_chunk_names_that_are_not_9_digits_are_kept_and_numbering_continues(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    cat_dir = tmp_path / "data" / "c"
    await _make(cat_dir, {"mos-cow-chunk1": b"one\n", "mos-cow-chunk10": b"",
                          "go-1-chunk2": b"peer\n"})
    async with run_node(tmp_path / "data", "mos-cow") as node:
        api = Api(http, node.url)
        await api.write("c", b"new\n")
        listing = {c["name"]: (c["complete"], c["size"]) for c in await api.list_chunks("c")}
        assert listing == {
            "go-1-chunk2": (False, 5),
            "mos-cow-chunk1": (True, 4),
            "mos-cow-chunk10": (True, 0),
            "mos-cow-chunk000000011": (False, 4),
        }
        assert await api.read("c", "mos-cow-chunk1") == b"one\n"
        assert await api.read("c", "go-1-chunk2") == b"peer\n"
        assert (await api.ack("c", "mos-cow-chunk1", 4)).status == 200
        assert (await api.ack("c", "mos-cow-chunk10", 0)).status == 200
    assert await _files(cat_dir) == sorted([
        "go-1-chunk2", "mos-cow-chunk1.acknowledged", "mos-cow-chunk10.acknowledged",
        "mos-cow-chunk000000011"])
    async with run_node(tmp_path / "data", "mos-cow") as node:  # and again after a restart
        api = Api(http, node.url)
        await api.write("c", b"newer\n")
        assert [c["name"] for c in await api.list_chunks("c")] == [
            "go-1-chunk2", "mos-cow-chunk000000011", "mos-cow-chunk000000012"]


async def test_a_pre_existing_empty_own_chunk_is_not_written_to_and_can_be_acked(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # What the Go server does: the next write starts a new chunk, so the empty one is complete.
    cat_dir = tmp_path / "data" / "c"
    await _make(cat_dir, {"me-chunk000000000": b"old\n", "me-chunk000000001": b""})
    async with run_node(tmp_path / "data", "me") as node:
        api = Api(http, node.url)
        await api.write("c", b"new\n")
        listing = {c["name"]: (c["complete"], c["size"]) for c in await api.list_chunks("c")}
        assert listing == {"me-chunk000000000": (True, 4), "me-chunk000000001": (True, 0),
                           "me-chunk000000002": (False, 4)}
        assert (await api.ack("c", "me-chunk000000001", 0)).status == 200
    assert await _files(cat_dir) == ["me-chunk000000000", "me-chunk000000001.acknowledged",
                                     "me-chunk000000002"]
