"""The HTTP contract of PROTOCOL.md, row by row, against a real node on 127.0.0.1."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from chukcha.bus.node import Node
from chukcha.protocol import MAX_READ_SIZE
from chukcha.testing import run_node
from tests.bus.conftest import Api, disk_state, read_file

C0 = "moscow-chunk000000000"
C1 = "moscow-chunk000000001"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
async def test_every_endpoint_ignores_the_method(api: Api, node: Node, method: str) -> None:
    ans = await api.call("/write", {"category": "m"}, b"a\n", method=method)
    assert (ans.status, ans.body) == (200, b"")
    ans = await api.call("/read", {"category": "m", "chunk": C0, "off": 0, "max_size": 10},
                         method=method)
    assert (ans.status, ans.body) == (200, b"a\n")
    ans = await api.call("/listChunks", {"category": "m"}, method=method)
    assert ans.status == 200
    ans = await api.call("/listCategories", method=method)
    assert (ans.status, ans.body) == (200, b'["m"]')
    await node.store.rotate()
    ans = await api.call("/ack", {"category": "m", "chunk": C0, "size": 2}, method=method)
    assert (ans.status, ans.body) == (200, b"")


async def test_unknown_path_is_404_not_found(api: Api) -> None:
    for path in ("/", "/nope", "/write/", "/replication/nope", "/READ"):
        ans = await api.call(path, method="GET")
        assert ans.status == 404, path
        assert ans.text.strip() == "not found", path


async def test_write_answers_empty_200_after_the_data_is_in_the_chunk_file(
    api: Api, node: Node
) -> None:
    await api.write("orders", b"one\ntwo\n")
    await api.write("orders", b"three\n")
    path = node.config.data_dir / "orders" / C0
    assert await read_file(path) == b"one\ntwo\nthree\n"


async def test_write_errors(api: Api, node: Node) -> None:
    cases: list[tuple[dict[str, str | int], bytes, int, str]] = [
        ({}, b"a\n", 400, "missing parameter 'category'"),
        ({"category": ""}, b"a\n", 400, "missing parameter 'category'"),
        ({"category": "a/b"}, b"a\n", 400, "category"),
        ({"category": "c", "min_sync_replicas": "x"}, b"a\n", 400, "min_sync_replicas"),
        ({"category": "c", "min_sync_replicas": "-1"}, b"a\n", 400, "min_sync_replicas"),
        ({"category": "c", "sync": "perhaps"}, b"a\n", 400, "sync"),
        ({"category": "c"}, b"a\nb", 500, "must end with a newline"),
        ({"category": "c"}, b"", 500, "empty write body"),
    ]
    before = await disk_state(node.config.data_dir)
    assert set(before) == {"running.lock"}
    for params, body, status, message in cases:
        ans = await api.call("/write", params, body)
        assert ans.status == status, (params, body, ans)
        assert message in ans.text, (params, ans)
    assert await disk_state(node.config.data_dir) == before
    assert await api.list_chunks("c") == []


async def test_read_returns_whole_messages_from_off(api: Api) -> None:
    await api.write("c", b"aaa\nbb\nc\n")
    assert await api.read("c", C0, 0, 100) == b"aaa\nbb\nc\n"
    assert await api.read("c", C0, 0, 6) == b"aaa\n"  # cut back to the last "\n"
    assert await api.read("c", C0, 0, 7) == b"aaa\nbb\n"
    assert await api.read("c", C0, 4, 100) == b"bb\nc\n"
    assert await api.read("c", C0, 7, 2) == b"c\n"


async def test_read_at_or_past_the_end_is_an_empty_200(api: Api) -> None:
    await api.write("c", b"abc\n")
    assert await api.read("c", C0, 4, 100) == b""
    assert await api.read("c", C0, 5, 100) == b""
    assert await api.read("c", C0, 10**12, 100) == b""


async def test_read_errors(api: Api) -> None:
    await api.write("c", b"a-long-message\n")
    base = {"category": "c", "chunk": C0, "off": "0", "max_size": "100"}
    cases: list[tuple[dict[str, str], int, str]] = [
        ({"off": ""}, 400, "off"),
        ({"off": "x"}, 400, "off"),
        ({"off": "-1"}, 400, "off"),
        ({"off": "1.5"}, 400, "off"),
        ({"max_size": ""}, 400, "max_size"),
        ({"max_size": "ten"}, 400, "max_size"),
        ({"max_size": "-5"}, 400, "max_size"),
        ({"max_size": "0"}, 400, "max_size"),
        ({"max_size": str(MAX_READ_SIZE + 1)}, 400, "max_size"),
        ({"chunk": ""}, 400, "chunk"),
        ({"chunk": "../moscow-chunk000000000"}, 400, "chunk"),
        ({"chunk": "moscow-chunkX"}, 400, "chunk"),
        ({"category": "../c"}, 400, "category"),
        ({"chunk": "moscow-chunk000000007"}, 404, "not found"),
        ({"chunk": "kazan-chunk000000000"}, 404, "not found"),
        ({"category": "nope"}, 404, "not found"),
        ({"max_size": "5"}, 500, "smaller than the message"),
        ({"wait": "61"}, 400, "wait"),  # the long-poll extension: at most 60 s
        ({"wait": "soon"}, 400, "wait"),
        ({"wait": "-1"}, 400, "wait"),
    ]
    for change, status, message in cases:
        params = {k: v for k, v in (base | change).items() if v != ""}
        ans = await api.call("/read", params, method="GET")
        assert ans.status == status, (change, ans)
        assert message in ans.text, (change, ans)
    # The biggest allowed max_size is fine.
    assert await api.read("c", C0, 0, MAX_READ_SIZE) == b"a-long-message\n"


async def _make_other_owner(data_dir: Path) -> None:
    """Chunks of another owner, as replication would have left them, plus a tombstone."""

    def make() -> None:
        d = data_dir / "c"
        d.mkdir(parents=True)
        (d / "kazan-chunk000000000.acknowledged").write_bytes(b"")
        (d / "kazan-chunk000000001").write_bytes(b"k1\n")
        (d / "kazan-chunk000000002").write_bytes(b"k2\nk2\n")
        (d / "amur-chunk000000000").write_bytes(b"a0\n")

    await asyncio.to_thread(make)


async def test_list_chunks_sorted_and_only_each_owners_last_is_incomplete(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = tmp_path / "data"
    await _make_other_owner(data)
    async with run_node(data, instance="moscow", max_chunk_size=4) as node:
        api = Api(http, node.url)
        await api.write("c", b"m0\n")
        await api.write("c", b"m1\n")  # over max_chunk_size: a new chunk
        chunks = await api.list_chunks("c")
    assert chunks == [
        {"name": "amur-chunk000000000", "complete": False, "size": 3},
        {"name": "kazan-chunk000000001", "complete": True, "size": 3},
        {"name": "kazan-chunk000000002", "complete": False, "size": 6},
        {"name": "moscow-chunk000000000", "complete": True, "size": 3},
        {"name": "moscow-chunk000000001", "complete": False, "size": 3},
    ]


async def test_list_chunks_ignores_from_replication(api: Api) -> None:
    await api.write("c", b"x\n")
    plain = await api.call("/listChunks", {"category": "c"}, method="GET")
    repl = await api.call("/listChunks", {"category": "c", "from_replication": 1}, method="GET")
    assert plain == repl
    assert plain.body == b'[{"name":"moscow-chunk000000000","complete":false,"size":2}]'


async def test_list_chunks_of_unknown_category_and_bad_category(api: Api) -> None:
    assert await api.list_chunks("none") == []  # Go answers null; [] decodes the same in Go
    for bad in ("", "a/b", "..", "a\\b", "/abs"):
        ans = await api.call("/listChunks", {"category": bad} if bad else {}, method="GET")
        assert ans.status == 400, (bad, ans)
        assert "category" in ans.text


async def test_list_categories(api: Api) -> None:
    ans = await api.call("/listCategories", method="GET")
    assert (ans.status, ans.body) == (200, b"[]")
    await api.write("b", b"x\n")
    await api.write("a", b"x\n")
    ans = await api.call("/listCategories", method="GET")
    assert (ans.status, ans.body) == (200, b'["a","b"]')


async def test_ack_tombstones_a_complete_chunk(api: Api, node: Node) -> None:
    await api.write("c", b"hello\n")
    await node.store.rotate()  # chunk 0 complete, chunk 1 current
    await api.write("c", b"next\n")
    ans = await api.ack("c", C0, 6)
    assert (ans.status, ans.body) == (200, b"")
    assert await api.list_chunks("c") == [{"name": C1, "complete": False, "size": 5}]
    state = await disk_state(node.config.data_dir / "c")
    assert state == {f"{C0}.acknowledged": 0, f"{C1}": 5}
    # A tombstone is not readable any more, and acking it again is harmless.
    ans = await api.call("/read", {"category": "c", "chunk": C0, "off": 0, "max_size": 10})
    assert ans.status == 404
    assert (await api.ack("c", C0, 6)).status == 200
    # A size bigger than the chunk is fine (the Go server only refuses a shorter one).
    await node.store.rotate()
    assert (await api.ack("c", C1, 1000)).status == 200


async def test_ack_errors_change_nothing(api: Api, node: Node) -> None:
    await api.write("c", b"hello\n")
    await node.store.rotate()
    await api.write("c", b"current\n")
    before = await disk_state(node.config.data_dir)
    cases: list[tuple[dict[str, str], int, str]] = [
        ({"chunk": C1, "size": "8"}, 500, "current write chunk"),
        ({"chunk": C0, "size": "5"}, 500, "smaller than chunk"),
        ({"chunk": C0, "size": "0"}, 500, "smaller than chunk"),
        ({"chunk": "moscow-chunk000000009", "size": "9"}, 500, "not found"),
        ({"category": "other", "chunk": C0, "size": "9"}, 500, "not found"),
        ({"chunk": C0, "size": ""}, 400, "size"),
        ({"chunk": C0, "size": "x"}, 400, "size"),
        ({"chunk": C0, "size": "-6"}, 400, "size"),
        ({"chunk": "../" + C0, "size": "6"}, 400, "chunk"),
        ({"chunk": "", "size": "6"}, 400, "chunk"),
        ({"category": "..", "chunk": C0, "size": "6"}, 400, "category"),
    ]
    for change, status, message in cases:
        params = {k: v for k, v in ({"category": "c"} | change).items() if v != ""}
        ans = await api.call("/ack", params)
        assert ans.status == status, (change, ans)
        assert message in ans.text, (change, ans)
    assert await disk_state(node.config.data_dir) == before
    assert [c["name"] for c in await api.list_chunks("c")] == [C0, C1]


async def test_ack_of_another_owners_last_chunk_is_refused(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = tmp_path / "data"
    await _make_other_owner(data)
    async with run_node(data, instance="moscow") as node:
        api = Api(http, node.url)
        ans = await api.ack("c", "kazan-chunk000000002", 6)
        assert ans.status == 500
        assert "not complete" in ans.text
        assert (await api.ack("c", "kazan-chunk000000001", 3)).status == 200
    assert await disk_state(data / "c") == {
        "amur-chunk000000000": 3,
        "kazan-chunk000000000.acknowledged": 0,
        "kazan-chunk000000001.acknowledged": 0,
        "kazan-chunk000000002": 6,
    }


async def test_min_sync_replicas_on_a_standalone_node_is_refused_before_writing(
    api: Api, node: Node
) -> None:
    before = await disk_state(node.config.data_dir)
    ans = await api.call("/write", {"category": "solo", "min_sync_replicas": 1}, b"a\n")
    assert ans.status == 400
    assert "min_sync_replicas=1" in ans.text and "no peers" in ans.text
    assert await disk_state(node.config.data_dir) == before
    ans = await api.call("/listCategories", method="GET")
    assert ans.body == b"[]"


async def test_big_reads_are_streamed_from_the_file_and_still_cut_at_a_message(
    api: Api, node: Node
) -> None:
    # Over 1 MiB an answer is sent from the file piece by piece (a client slow to take it
    # makes the node hold one piece); the bytes and the cut are the same as for small reads.
    messages = [b"%07d " % i + b"z" * (1000 + i % 97) + b"\n" for i in range(4000)]
    body = b"".join(messages)
    for start in range(0, len(messages), 1000):
        await api.write("big", b"".join(messages[start:start + 1000]))
    assert await api.read("big", C0, 0, 16 << 20) == body
    cut = body.rfind(b"\n", 0, (5 << 19) + 1) + 1
    assert await api.read("big", C0, 0, 5 << 19) == body[:cut]
    assert await api.read("big", C0, 12345, 3 << 20) == body[12345:][
        : body.rfind(b"\n", 12345, 12345 + (3 << 20)) + 1 - 12345]
