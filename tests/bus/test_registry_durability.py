"""Consumer-group registry changes are durable before their 200, a failed save leaves memory as
it was, and numbers out of range are refused before anything changes (issue 11, points 2, 3)."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from chukcha.bus import files
from chukcha.bus.config import Peer, ReplicationConfig
from chukcha.bus.group_registry import GROUPS_FILE
from chukcha.bus.node import Node
from chukcha.testing import bind_loopback, run_node
from tests.bus.conftest import Api, read_file
from tests.integration.cluster_helpers import wait_for

TOO_BIG = [str(1 << 63), str(1 << 64), str((1 << 64) + 1), str(1 << 70), "9" * 5000]


@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[Node]:
    async with run_node(tmp_path / "data", "me", max_chunk_size=8) as n:
        yield n


@pytest.fixture
async def sapi(small: Node, http: aiohttp.ClientSession) -> Api:
    return Api(http, small.url)


class _Disk:
    """Makes the registry's saves fail with ENOSPC while ``full``."""

    def __init__(self, real: Callable[[Path, bytes], None]) -> None:
        self.real = real
        self.full = False
        self.failed = 0

    def write(self, path: Path, data: bytes) -> None:
        if self.full:
            self.failed += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.real(path, data)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> _Disk:
    d = _Disk(files.write_atomic)
    monkeypatch.setattr(files, "write_atomic", d.write)
    return d


async def _groups(api: Api, category: str = "c") -> dict[str, list[str]]:
    ans = await api.call("/groups/list", {"category": category})
    assert ans.status == 200, ans
    doc: dict[str, Any] = orjson.loads(ans.body)
    return {g["name"]: g["acked"] for g in doc["groups"]}


async def _retention(api: Api, category: str = "c") -> dict[str, Any]:
    ans = await api.call("/retention", {"category": category})
    assert ans.status == 200, ans
    result: dict[str, Any] = orjson.loads(ans.body)
    return result


async def _two_chunks(api: Api) -> str:
    """Write two chunks to ``c`` and return the first (complete) one's name."""
    await api.write("c", b"first-1\n")
    await api.write("c", b"second-2\n")  # over max_chunk_size=8: a new chunk
    listing = await api.list_chunks("c")
    assert [c["complete"] for c in listing] == [True, False]
    return str(listing[0]["name"])


async def _file(node: Node) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(await read_file(node.store.data_dir / GROUPS_FILE))
    return doc


async def test_a_failed_save_changes_nothing_and_a_retry_saves(
    small: Node, sapi: Api, disk: _Disk, tmp_path: Path
) -> None:
    disk.full = True
    ans = await sapi.call("/groups/register", {"category": "c", "group": "g"})
    assert ans.status == 500
    assert "No space left on device" in ans.text and "Server got itself" not in ans.text
    assert disk.failed == 1
    assert await _groups(sapi) == {}  # memory as it was
    disk.full = False
    ans = await sapi.call("/groups/register", {"category": "c", "group": "g"})
    assert (ans.status, orjson.loads(ans.body)) == (200, {"created": True})
    assert "g" in (await _file(small))["categories"]["c"]["groups"]

    chunk = await _two_chunks(sapi)
    disk.full = True
    ans = await sapi.call("/ack", {"category": "c", "chunk": chunk, "size": 8, "group": "g"})
    assert ans.status == 500 and "No space left on device" in ans.text
    assert await _groups(sapi) == {"g": []}
    assert chunk in [c["name"] for c in await sapi.list_chunks("c")]  # not tombstoned

    ans = await sapi.call("/retention", {"category": "c", "max_bytes": 100})
    assert ans.status == 500 and "No space left on device" in ans.text
    assert await _retention(sapi) == {"max_age": None, "max_bytes": None}

    ans = await sapi.call("/groups/unregister", {"category": "c", "group": "g"})
    assert ans.status == 500
    assert await _groups(sapi) == {"g": []}

    ans = await sapi.call("/groups/ack", {"category": "c", "chunk": chunk, "size": 8,
                                          "group": "h", "from": "peer"})
    assert ans.status == 500
    assert await _groups(sapi) == {"g": []}

    ans = await sapi.call("/partitions", {"category": "p", "count": 4})
    assert ans.status == 500 and "No space left on device" in ans.text
    assert small.groups.registry.partitions("p") == 0

    disk.full = False
    assert (await sapi.call("/partitions", {"category": "p", "count": 4})).status == 200
    assert (await _file(small))["categories"]["p"]["partitions"] == 4
    assert (await sapi.call("/ack", {"category": "c", "chunk": chunk, "size": 8,
                                     "group": "g"})).status == 200
    assert chunk not in [c["name"] for c in await sapi.list_chunks("c")]  # every group acked


async def test_a_registration_answered_200_survives_a_restart(tmp_path: Path) -> None:
    async with run_node(tmp_path / "data", "me") as node, aiohttp.ClientSession() as http:
        api = Api(http, node.url)
        assert (await api.call("/groups/register", {"category": "c", "group": "g"})).status \
            == 200
        assert (await api.call("/retention", {"category": "c", "max_age": 60})).status == 200
    async with run_node(tmp_path / "data", "me") as node, aiohttp.ClientSession() as http:
        api = Api(http, node.url)
        assert await _groups(api) == {"g": []}
        assert await _retention(api) == {"max_age": 60.0, "max_bytes": None}


@pytest.mark.parametrize("value", TOO_BIG)
async def test_numbers_out_of_range_are_refused_before_anything_changes(
    small: Node, sapi: Api, value: str
) -> None:
    assert (await sapi.call("/groups/register", {"category": "c", "group": "g"})).status == 200
    chunk = await _two_chunks(sapi)
    before = await _file(small)
    refused: list[tuple[str, dict[str, str | int]]] = [
        ("/ack", {"category": "c", "chunk": chunk, "size": value, "group": "g"}),
        ("/ack", {"category": "c", "chunk": chunk, "size": value}),  # the default group
        ("/retention", {"category": "c", "max_bytes": value}),
        ("/groups/ack", {"category": "c", "chunk": chunk, "size": value, "group": "g",
                         "from": "peer"}),
        ("/read", {"category": "c", "chunk": chunk, "off": value, "max_size": 100}),
        ("/write", {"category": "c", "min_sync_replicas": value}),
        ("/replication/ack", {"category": "c", "chunk": chunk, "instance": "peer",
                              "size": value}),
    ]
    for path, params in refused:
        ans = await sapi.call(path, params, b"x\n" if path == "/write" else None)
        assert ans.status == 400, (path, ans)
        assert "between 0 and 9223372036854775807" in ans.text, (path, ans)
    assert await _file(small) == before
    assert await _groups(sapi) == {"g": []}
    # The registry still saves: nothing was poisoned.
    assert (await sapi.call("/groups/register", {"category": "c", "group": "h"})).status == 200
    limit = str((1 << 63) - 1)  # the top of the range is accepted
    assert (await sapi.call("/retention", {"category": "c", "max_bytes": limit})).status == 200
    assert (await sapi.call("/ack", {"category": "c", "chunk": chunk, "size": limit,
                                     "group": "g"})).status == 200
    after = await _file(small)
    assert set(after["categories"]["c"]["groups"]) == {"g", "h"}
    assert after["categories"]["c"]["retention"]["max_bytes"] == (1 << 63) - 1


async def test_a_failed_save_after_a_forward_keeps_the_outbox_entry(
    tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The outbox entry leaves memory only with a successful save: a failed one keeps it (it is
    # delivered again, harmlessly), so memory never runs ahead of the file.
    a_dir = tmp_path / "a"
    real = files.write_atomic
    full = False
    failed = 0

    def write(path: Path, data: bytes) -> None:
        nonlocal failed
        if full and path.parent == a_dir:
            failed += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(files, "write_atomic", write)
    b_sock = bind_loopback()  # listening, not served yet: a's forward waits in the backlog
    b_addr = "{}:{}".format(*b_sock.getsockname()[:2])
    async with run_node(a_dir, "a", peers=(Peer("b", b_addr),),
                        replication=ReplicationConfig(retry_interval=0.05)) as a:
        api = Api(http, a.url)
        assert (await api.call("/groups/register", {"category": "c", "group": "g"})).status \
            == 200
        assert a.groups.pending() == {"b": 1}
        full = True
        async with run_node(tmp_path / "b", "b", listen_fd=b_sock.detach(),
                            peers=(Peer("a", a.address),)) as b:
            await wait_for(lambda: _true("g" in b.groups.registry.groups("c")),
                           what="b to get the registration")
            await wait_for(lambda: _true(failed > 0), what="a's save to fail")
            assert a.groups.pending() == {"b": 1}  # still queued, in memory as on disk
            full = False

            async def delivered() -> bool:
                # Memory changes first and the save follows (under the groups lock), so the
                # file is read only once memory has let the entry go.
                return a.groups.pending() == {} and (await _file(a))["outbox"] == {}

            await wait_for(delivered, what="a to drop the delivered entry, in memory and on disk")


async def _true(value: bool) -> bool:
    return value
