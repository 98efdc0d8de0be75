"""The node's fast path for plain single writes (answered inside the parser's callback, no
task): the same answers, errors, ordering and locking as the handler it stands in for."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chukcha.bus.chunks import INLINE_READ_LIMIT
from chukcha.bus.node import Node
from chukcha.bus.web import parse_query
from chukcha.errors import ChukchaError
from tests.bus.conftest import Api, disk_state, read_file

C0 = "moscow-chunk000000000"


def _numbered_writes(targets: list[bytes], then_get: bytes) -> bytes:
    """Pipelined: one write per target, the i-th with the message ``i + 1``, then a GET."""
    return b"".join(b"POST %b HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n%d\n" % (t, i + 1)
                    for i, t in enumerate(targets)) + \
        b"GET %b HTTP/1.1\r\nHost: t\r\n\r\n" % then_get


async def test_fast_path_refuses_bad_writes_as_the_handler_does_and_changes_nothing(
    api: Api, node: Node
) -> None:
    await api.write("c", b"first\n")  # the category exists: plain writes take the fast path
    cases: list[tuple[dict[str, str | int], bytes, int, str]] = [
        ({"category": "c"}, b"a\nb", 500, "must end with a newline"),
        ({"category": "c"}, b"", 500, "empty write body"),
        ({"category": "c"}, b"x" * (node.config.max_message_size + 1) + b"\n", 500, "message"),
        ({"category": "c", "sync": "perhaps"}, b"a\n", 400, "sync"),
        ({"category": "c", "min_sync_replicas": "x"}, b"a\n", 400, "min_sync_replicas"),
        ({"category": "c", "min_sync_replicas": "1"}, b"a\n", 400, "no peers"),
        ({"category": "c", "category2": "d"}, b"a\nb", 500, "must end with a newline"),
    ]
    before = await disk_state(node.config.data_dir)
    for params, body, status, message in cases:
        ans = await api.call("/write", params, body)
        assert ans.status == status, (params, ans)
        assert message in ans.text, (params, ans)
    assert await disk_state(node.config.data_dir) == before
    await api.write("c", b"second\n", sync=0)
    await api.write("c", b"third\n", sync=1)
    assert await read_file(node.config.data_dir / "c" / C0) == b"first\nsecond\nthird\n"


async def test_a_write_waits_while_another_holds_the_category(api: Api, node: Node) -> None:
    """A rotation, a big write in a thread or a group fsync holds the category's lock across
    awaits: a small write must not be appended in between (it takes the handler's path)."""
    await api.write("c", b"first\n")
    lock = node.store._categories["c"].lock  # the store's own lock
    path = node.config.data_dir / "c" / C0
    async with lock:
        write = asyncio.create_task(api.write("c", b"second\n"))
        async with asyncio.timeout(10):
            while not lock._waiters:  # polled until the write waits on it
                assert not write.done(), write
                await asyncio.sleep(0.01)
        assert await read_file(path) == b"first\n"
        assert not write.done()
    async with asyncio.timeout(10):
        await write
    assert await read_file(path) == b"first\nsecond\n"


async def test_pipelined_fast_and_slow_writes_are_answered_and_written_in_order(
    node: Node,
) -> None:
    await node.store.write("p", b"0\n")
    host, port = node.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    targets = ["/write?category=p", "/write?category=p&sync=1", "/write?category=p",
               "/write?category=p&sync=1", "/write?category=p"]
    writer.write(_numbered_writes([t.encode() for t in targets], b"/read?category=p&chunk=%b"
                                  b"&off=0&max_size=100" % C0.encode()))
    async with asyncio.timeout(10):
        for _ in targets:
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
            assert b"Content-Length: 0\r\n" in head
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 12\r\n" in head
        assert await reader.readexactly(12) == b"0\n1\n2\n3\n4\n5\n"
    writer.close()


async def test_fast_writes_are_counted_in_the_metrics(api: Api, node: Node) -> None:
    await api.write("m", b"a\n")
    for _ in range(3):
        await api.write("m", b"b\nc\n")
    ans = await api.call("/metrics", method="GET")
    text = ans.text
    assert 'chukcha_write_requests_total{category="m"} 4.0' in text
    assert 'chukcha_written_messages_total{category="m"} 7.0' in text
    assert 'chukcha_http_requests_total{endpoint="/write",status="200"} 4.0' in text


async def test_fast_reads_answer_and_count_exactly_as_the_thread_path(node: Node) -> None:
    store = node.store
    messages = b"".join(b"%d-%b\n" % (i, b"m" * (i % 37)) for i in range(3000))
    await store.write("r", messages)
    chunk = store.list_chunks("r")[0].name
    size = len(messages)
    offsets = [0, 1, 5, 100, size - 40, size - 1, size, size + 10]
    sizes = [1, 3, 40, 100, 4096, INLINE_READ_LIMIT, INLINE_READ_LIMIT + 1, 1 << 20, 0]
    for off in offsets:
        for max_size in sizes:
            before = dataclasses.replace(store.traffic()["r"])
            try:
                now = store.read_now("r", chunk, off, max_size)
            except ChukchaError as exc:
                now_error: ChukchaError | None = exc
                now = None
            else:
                now_error = None
            counted_now = dataclasses.replace(store.traffic()["r"])
            try:
                slow = bytes(await store.read_buffer("r", chunk, off, max_size))
            except ChukchaError as exc:
                assert now_error is not None and str(now_error) == str(exc), (off, max_size)
                continue
            assert now_error is None, (off, max_size, now_error)
            if min(max_size, size - off) > INLINE_READ_LIMIT:
                assert now is None, (off, max_size)  # bigger reads are not done on the loop
                continue
            assert now is not None and bytes(now) == slow, (off, max_size)
            after = store.traffic()["r"]
            # The same counts as the thread path's read that followed.
            assert (counted_now.reads - before.reads, counted_now.bytes_read - before.bytes_read,
                    counted_now.messages_read - before.messages_read) == (
                after.reads - counted_now.reads, after.bytes_read - counted_now.bytes_read,
                after.messages_read - counted_now.messages_read), (off, max_size)


async def test_a_read_not_in_the_page_cache_is_left_to_a_worker_thread(
    api: Api, node: Node
) -> None:
    await api.write("cold", b"one\ntwo\n", sync=1)  # fsynced: clean pages can be dropped
    await asyncio.to_thread(_drop_from_page_cache, node.config.data_dir / "cold" / C0)
    reads = node.store.traffic()["cold"].reads
    if node.store.read_now("cold", C0, 0, 100) is not None:
        pytest.skip("the pages stayed cached (tmpfs?) or there is no RWF_NOWAIT here")
    assert node.store.traffic()["cold"].reads == reads  # nothing read, nothing counted
    # What the handler then does (a worker thread), and the answer over HTTP.
    assert await node.store.read_slice("cold", C0, 0, 100) == b"one\ntwo\n"
    assert await api.read("cold", C0, 0, 100) == b"one\ntwo\n"


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


_QUERY_TEXT = st.text(alphabet="ab=&%+;2F0x é", max_size=20)


@given(_QUERY_TEXT)
def test_parse_query_is_parse_qsl_first_wins(query: str) -> None:
    expected: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        expected.setdefault(name, value)
    assert parse_query(query) == expected
    assert list(parse_query(query)) == list(expected)  # the same order


async def test_a_fragment_in_the_request_target_is_not_part_of_the_query(node: Node) -> None:
    # As the Go server (fasthttp) reads a request target: '#' starts a fragment, which names
    # nothing. Before, the fast path and the handler took "c#x" as the category's name, so a
    # write meant for "c" created and filled a category "c#x" (Go writes it into "c").
    await node.store.write("c", b"0\n")
    host, port = node.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    targets = [b"/write?category=c#x", b"/write?category=new#frag?category=other",
               b"http://t/write?category=c#y"]
    writer.write(_numbered_writes(targets, b"/read?category=c&chunk=%b&off=0&max_size=100#z"
                                  % C0.encode()))
    async with asyncio.timeout(10):
        for _ in targets:
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 6\r\n" in head
        assert await reader.readexactly(6) == b"0\n1\n3\n"
    writer.close()
    assert sorted(node.store.categories()) == ["c", "new"]
    assert await node.store.read("new", C0, 0, 100) == b"2\n"
