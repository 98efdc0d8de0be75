"""Big plain writes (bodies over 64 KiB) on the node's fast path: appended on the event loop
inside the callback that completed the body (``ChunkStore.write_now``), with a rotation there
when the chunk is full, answered only once their bytes are in the chunk. A bad, cut or
abandoned body changes nothing; readers never see part of a write; the body's buffer is reused
only when nothing kept it; a slow append sends the next big writes to the worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chukcha.bus import chunk_index, web
from chukcha.bus import chunks as chunks_module
from chukcha.bus.chunks import ChunkStore, StoreEvent, StoreEventKind
from chukcha.bus.node import Node
from chukcha.bus.server import HttpServer, Router, ServerLimits
from chukcha.testing import bind_loopback, run_node
from tests.bus.conftest import Api, AppendGate, disk_state, read_file
from tests.integration.cluster_helpers import wait_for

C0 = "moscow-chunk000000000"


def _messages(tag: str, n: int, size: int = 100) -> bytes:
    """``n`` messages of ``size`` bytes (newline included), each naming ``tag`` and its index."""
    out = []
    for i in range(n):
        head = b"%b-%06d-" % (tag.encode(), i)
        out.append(head + b"x" * (size - len(head) - 1) + b"\n")
    return b"".join(out)


def _true(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def holds() -> bool:
        return check()

    return holds


def _post(target: str, body: bytes, length: int | None = None) -> bytes:
    return b"POST %b HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%b" % (
        target.encode(), len(body) if length is None else length, body)


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return status, await reader.readexactly(length)


async def _connect(node: Node) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = node.address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


@contextlib.asynccontextmanager
async def _serving(router: Router) -> AsyncIterator[tuple[HttpServer, tuple[str, int]]]:
    """An HttpServer for ``router`` on a loopback socket of its own (1 MiB bodies, an 8 MiB
    budget), stopped on leaving: the server and the address to connect to."""
    server = HttpServer(router, ServerLimits(max_body_size=1 << 20, memory_budget=8 << 20))
    sock = bind_loopback()
    sock.listen(4)
    await server.start(sock)
    try:
        yield server, sock.getsockname()[:2]
    finally:
        await server.stop(1.0)


@pytest.mark.parametrize("after_small", [0, chunks_module.BIG_IN_THREAD_AFTER_SMALL])
async def test_big_writes_from_several_connections_rotate_and_land_whole_once_for_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after_small: int,
) -> None:
    # 4 connections write 1 MiB-ish bodies (various sizes) into 3 MiB chunks while 2 readers
    # read the category over and over: each read ends on a message boundary (no reader sees
    # part of a write), no chunk passes its limit, and in the end every message is there
    # exactly once, each connection's in the order it wrote them. With after_small=0 the big
    # writes are appended (and rotate) on the loop whatever the readers do; else the
    # readers' small reads send some of them to the worker thread, mixing both paths.
    monkeypatch.setattr(chunks_module, "BIG_IN_THREAD_AFTER_SMALL", after_small)
    limit = 3 << 20
    rnd = random.Random(5)  # noqa: S311 - reproducible test data
    plan = {f"w{c}": [rnd.choice([700, 5_000, 10_485]) for _ in range(10)] for c in range(4)}
    async with run_node(tmp_path / "data", instance="moscow", max_chunk_size=limit) as node:
        reader0, writer0 = await _connect(node)
        writer0.write(_post("/write?category=b", b"first\n"))
        assert await _answer(reader0) == (200, b"")  # the category exists: the fast path
        writing = True

        async def write_all(tag: str, counts: list[int]) -> None:
            reader, writer = await _connect(node)
            try:
                start = 0
                for n in counts:
                    writer.write(_post("/write?category=b", _messages(f"{tag}-{start}", n)))
                    assert await _answer(reader) == (200, b"")
                    start += n
            finally:
                writer.close()

        async def read_all() -> None:
            reader, writer = await _connect(node)
            try:
                while writing:
                    writer.write(b"GET /listChunks?category=b HTTP/1.1\r\nHost: t\r\n\r\n")
                    status, listing = await _answer(reader)
                    assert status == 200
                    for chunk in orjson.loads(listing):
                        assert chunk["size"] <= limit, chunk
                        writer.write(b"GET /read?category=b&chunk=%b&off=0&max_size=%d "
                                     b"HTTP/1.1\r\nHost: t\r\n\r\n" % (
                                         chunk["name"].encode(), limit))
                        status, data = await _answer(reader)
                        assert status == 200
                        assert data.endswith(b"\n") or not data, data[-100:]
                    await asyncio.sleep(0)
            finally:
                writer.close()

        readers = [asyncio.create_task(read_all()) for _ in range(2)]
        async with asyncio.timeout(120):
            await asyncio.gather(*(write_all(tag, counts) for tag, counts in plan.items()))
            writing = False
            await asyncio.gather(*readers)
        writer0.close()
        listed = node.store.list_chunks("b")
        assert len(listed) >= 3  # it rotated
        data = b""
        for chunk in listed:
            assert chunk.size <= limit
            piece = await read_file(node.config.data_dir / "b" / chunk.name)
            assert len(piece) == chunk.size
            data += piece
    _check_each_once_in_order(data, plan)


def _check_each_once_in_order(data: bytes, plan: dict[str, list[int]]) -> None:
    lines = data.splitlines()
    assert lines[0] == b"first"
    for tag, counts in plan.items():
        mine = [line for line in lines if line.startswith(tag.encode() + b"-")]
        expected = []
        start = 0
        for n in counts:
            expected += _messages(f"{tag}-{start}", n).splitlines()
            start += n
        assert mine == expected, tag
    assert len(lines) == 1 + sum(sum(c) for c in plan.values())


async def test_a_big_body_with_a_bad_message_is_refused_and_changes_nothing(
    api: Api, node: Node,
) -> None:
    await api.write("c", b"first\n")
    good = _messages("g", 3_000)  # 300 KB
    too_long = b"y" * (node.config.max_message_size + 1) + b"\n"
    before = await disk_state(node.config.data_dir)
    for body, message in [(good + b"no newline at the end", "must end with a newline"),
                          (good + too_long + good, "message")]:
        ans = await api.call("/write", {"category": "c"}, body)
        assert ans.status == 500, ans
        assert message in ans.text, ans
    assert await disk_state(node.config.data_dir) == before
    await api.write("c", good)
    assert await read_file(node.config.data_dir / "c" / C0) == b"first\n" + good


@pytest.mark.parametrize("how", ["close", "half-close", "pause"])
async def test_a_big_body_cut_short_or_abandoned_writes_nothing(tmp_path: Path, how: str) -> None:
    # The client sends the headers of a 1 MiB write and 600 KB of its body, then leaves
    # (closes, or half-closes: no more bytes will come) or stops sending past the body
    # timeout. Nothing of it reaches the chunk, its memory is given back, and the next
    # writes go on.
    limits = replace(ServerLimits(), body_timeout=0.5)
    async with run_node(tmp_path / "data", instance="moscow", server=limits) as node:
        reader, writer = await _connect(node)
        writer.write(_post("/write?category=c", b"first\n"))
        assert await _answer(reader) == (200, b"")
        writer.close()
        before = await disk_state(node.config.data_dir)
        body = _messages("cut", 10_000)  # 1 MB
        reader, writer = await _connect(node)
        writer.write(_post("/write?category=c", body[:600_000], length=len(body)))
        await writer.drain()
        budget = node.server.budget
        await wait_for(_true(lambda: budget.used > 0), 10, "the body to be received")
        if how == "close":
            writer.close()
        elif how == "half-close":
            writer.write_eof()
        async with asyncio.timeout(10):
            if how == "pause":
                status, text = await _answer(reader)
                assert status == 408, text
            assert await reader.read() == b""  # the node closed the connection
        writer.close()
        await wait_for(_true(lambda: budget.used == 0), 10, "the memory given back")
        assert await disk_state(node.config.data_dir) == before
        reader, writer = await _connect(node)
        writer.write(_post("/write?category=c", body))
        assert await _answer(reader) == (200, b"")
        writer.close()
        assert await read_file(node.config.data_dir / "c" / C0) == b"first\n" + body




async def test_big_fast_writes_are_counted_in_the_metrics(api: Api, node: Node) -> None:
    await api.write("m", b"a\n")
    for n in (1_000, 7_000, 10_000):
        await api.write("m", _messages("m", n))
    text = (await api.call("/metrics", method="GET")).text
    assert 'chukcha_write_requests_total{category="m"} 4.0' in text
    assert 'chukcha_written_messages_total{category="m"} 18001.0' in text


def _fast_server(fast: web.FastHandler) -> Router:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise AssertionError("the fast path answers every request here")

    router = Router()
    router.add_routes({"/w": handler})
    router.add_fast_routes({"/w": fast})
    return router


@pytest.mark.parametrize("keep", [False, True])
async def test_a_fast_route_reuses_a_big_bodys_buffer_only_when_nothing_kept_it(
    keep: bool,
) -> None:
    # A fast route answers a big body inside the callback that completed it: its buffer is
    # reused for the next body at once, unless the route kept the request or its body, which
    # then still hold their own bytes after later bodies were received.
    kept: list[bytes | bytearray] = []
    kept_requests: list[web.Request] = []
    checked: list[bytes] = []

    def fast(request: web.Request) -> web.Response:
        checked.append(bytes(request.body[:8]))
        if keep:
            if len(kept) % 2:
                kept_requests.append(request)
            kept.append(request.body)
        return web.Response()

    sent = [bytes([65 + i]) * 300_000 for i in range(6)]
    async with _serving(_fast_server(fast)) as (server, address):
        reader, writer = await asyncio.open_connection(*address)
        for body in sent:
            writer.write(_post("/w", body))
            assert await _answer(reader) == (200, b"")
        writer.close()
    assert checked == [body[:8] for body in sent]
    if keep:
        assert server.budget.reused == 0
        assert [bytes(b) for b in kept] == sent
        assert [bytes(r.body) for r in kept_requests] == sent[1::2]
    else:
        assert server.budget.reused >= 4


async def test_write_now_takes_a_big_write_and_rotates_on_the_loop(
    store: ChunkStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The store's chunks here are 1 MiB: the third 400 KB write starts a new chunk, on the
    # loop, announced before the write's own event. (Big writes only: no small request
    # sends them to the worker thread.)
    monkeypatch.setattr(chunks_module, "BIG_IN_THREAD_AFTER_SMALL", 0)
    events: list[StoreEvent] = []
    store.add_listener(events.append)
    await store.write("c", b"a\n")
    body = _messages("big", 4_000)  # 400 KB
    first = store.write_now("c", body)
    second = store.write_now("c", body)
    third = store.write_now("c", body)
    assert first is not None and second is not None and third is not None
    assert (first.chunk, first.end) == ("me-chunk000000000", 2 + len(body))
    assert (second.chunk, second.end) == ("me-chunk000000000", 2 + 2 * len(body))
    assert (third.chunk, third.end) == ("me-chunk000000001", len(body))
    kinds = [(e.kind, e.chunk) for e in events if e.category == "c"]
    assert kinds[-2:] == [(StoreEventKind.CREATED, "me-chunk000000001"),
                          (StoreEventKind.WRITTEN, "me-chunk000000001")]
    assert await read_file(tmp_path / "data" / "c" / "me-chunk000000001") == body


async def test_a_slow_big_append_sends_the_next_big_writes_to_the_worker_thread(
    store: ChunkStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every big append counts as slow here: after one, write_now leaves big writes to the
    # worker thread (write) for the back-off, small ones not; then it takes them again.
    monkeypatch.setattr(chunks_module, "SLOW_INLINE_WRITE", 0.0)
    monkeypatch.setattr(chunks_module, "SLOW_INLINE_BACKOFF", 0.3)
    monkeypatch.setattr(chunks_module, "BIG_IN_THREAD_AFTER_SMALL", 0)
    await store.write("c", b"a\n")
    body = _messages("big", 1_000)  # 100 KB
    assert store.write_now("c", body) is not None
    assert store.write_now("c", body) is None  # paused: nothing was done
    assert store.write_now("c", b"small\n") is not None
    await store.write("c", body)  # the worker thread's path
    await wait_for(_true(lambda: store.write_now("c", body) is not None), 10,
                   "big writes on the loop again")
    data = await read_file(tmp_path / "data" / "c" / "me-chunk000000000")
    assert data == b"a\n" + body + b"small\n" + body + body


async def test_after_a_small_request_the_next_big_writes_go_to_the_worker_thread(
    store: ChunkStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # After a small write or a small read, write_now leaves the next 2 big writes to the
    # worker thread (write), then takes big writes on the loop again; a big read does not
    # count as small, nor does a big write through the handler.
    monkeypatch.setattr(chunks_module, "BIG_IN_THREAD_AFTER_SMALL", 2)
    await store.write("c", b"a\n")  # small
    body = _messages("big", 700)  # 70 KB: all 13 fit in one chunk
    expected = b"a\n"

    async def big_ones(thread: int) -> None:
        nonlocal expected
        cat = store._categories["c"]
        for _ in range(thread):
            assert store.write_now("c", body) is None  # nothing was done
            await store.write("c", body)  # the worker thread's path
            # Its round lets the category go after answering: write_now waits for that too.
            await wait_for(_true(lambda: cat.queue_round is None and not cat.lock.locked()),
                           10, "the worker thread's round is over")
        assert store.write_now("c", body) is not None
        expected += body * (thread + 1)

    await big_ones(2)
    await big_ones(0)
    assert store.write_now("c", b"small\n") is not None
    expected += b"small\n"
    await big_ones(2)
    assert store.read_now("c", "me-chunk000000000", 0, 100) == b"a\n"  # small read
    await big_ones(2)
    assert store.read_now("c", "me-chunk000000000", 0, 1 << 20) is None  # big: the handler's
    data = await store.read_slice("c", "me-chunk000000000", 0, 1 << 20)
    assert not isinstance(data, (bytes, memoryview)) or len(data) > 64 << 10
    if not isinstance(data, (bytes, memoryview)):
        await asyncio.to_thread(os.close, data.fd)
    await big_ones(0)
    end = store.chunk_size("c", "me-chunk000000000")
    assert await store.read("c", "me-chunk000000000", end or 0, 1 << 20) == b""  # at the end
    await big_ones(2)
    assert await read_file(tmp_path / "data" / "c" / "me-chunk000000000") == expected


async def test_a_big_append_held_after_small_writes_does_not_hold_them(
    node: Node, gate: AppendGate,
) -> None:
    # A small write came, so the next big write goes to the worker thread, where its append
    # is held (as a slow disk or the kernel's dirty-page throttling holds it) while small
    # writes on another connection are answered; once let go it lands whole, and is answered.
    small_r, small_w = await _connect(node)
    small_w.write(_post("/write?category=c", b"first\n"))
    assert await _answer(small_r) == (200, b"")  # creates c: its writes take the fast path
    big = _messages("big", 3_000)  # 300 KB
    big_r, big_w = await _connect(node)
    big_w.write(_post("/write?category=c", big))
    assert await asyncio.to_thread(gate.entered.wait, 10), "the big append is not in a thread"
    answered = asyncio.ensure_future(_answer(big_r))
    for i in range(3):
        small_w.write(_post("/write?category=other", b"small %d\n" % i))
        assert await _answer(small_r) == (200, b"")
    assert not answered.done()
    gate.open()
    assert await answered == (200, b"")
    small_w.close()
    big_w.close()
    assert await read_file(node.config.data_dir / "c" / "moscow-chunk000000000") == (
        b"first\n" + big)
    assert await read_file(node.config.data_dir / "other" / "moscow-chunk000000000") == (
        b"small 0\nsmall 1\nsmall 2\n")


_TRAP = b"\r\n\r\nPOST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
"""Bytes that look like the end of a request's headers and a whole request: inside a body."""


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(loop=st.sampled_from(["asyncio", "uvloop"]), size=st.integers(70_000, 700_000),
       first=st.integers(66_000, 800_000), behind=st.lists(st.integers(1, 100_000), max_size=2),
       seed=st.integers(0, 1 << 30))
def test_a_big_bodys_start_read_with_its_headers_is_taken_whole_and_once(
    loop: str, size: int, first: int, behind: list[int], seed: int,
) -> None:
    # The connection's first read holds the headers of a big body and the start of the body
    # (or all of it, and requests pipelined behind it): the parser gets the headers alone and
    # the body's start is copied once into its buffer. Bodies full of what looks like headers'
    # ends and whole requests arrive exact, and so do the requests behind.
    rnd = random.Random(seed)  # noqa: S311 - reproducible test data
    bodies = [(rnd.randbytes(size // 3) + _TRAP * (size // 150))[:size]]
    bodies += [rnd.randbytes(n) for n in behind]
    stream = b"".join(_post("/echo", b) for b in bodies)

    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(body=bytes(request.body))

    async def main() -> None:
        router = Router()
        router.add_routes({"/echo": echo})
        async with _serving(router) as (_, address):
            reader, writer = await asyncio.open_connection(*address)
            writer.write(stream[:first])
            await writer.drain()
            writer.write(stream[first:])
            for body in bodies:
                async with asyncio.timeout(20):
                    assert await _answer(reader) == (200, body)
            writer.close()

    if loop == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


async def _sizes(path: Path) -> tuple[int, int]:
    """The file's size and the disk space allocated to it."""
    st = await asyncio.to_thread(path.stat)
    return st.st_size, st.st_blocks * 512


async def test_an_own_chunk_is_allocated_ahead_and_given_back_when_complete(
    tmp_path: Path,
) -> None:
    # The open chunk's disk space is allocated ahead of its appends (the file's size stays
    # what was written: readers see only that); a chunk that becomes complete, and the open
    # one when the node stops, give back what was allocated past their end.
    if chunk_index._fallocate() is None:
        pytest.skip("no fallocate(2) on this platform")
    data = tmp_path / "data"
    body = _messages("r", 10_000)  # 1 MB
    async with run_node(data, instance="moscow", max_chunk_size=3 << 20) as node:
        reader, writer = await _connect(node)
        for _ in range(4):  # 3 fit in the first chunk, the 4th starts the second
            writer.write(_post("/write?category=r", body))
            assert await _answer(reader) == (200, b"")
        writer.write(b"GET /read?category=r&chunk=moscow-chunk000000001&off=0&max_size=4000000 "
                     b"HTTP/1.1\r\nHost: t\r\n\r\n")
        assert await _answer(reader) == (200, body)
        writer.close()
        first, second = data / "r" / "moscow-chunk000000000", data / "r" / "moscow-chunk000000001"
        size, allocated = await _sizes(first)
        assert size == 3 * len(body)
        assert allocated < size + (64 << 10)  # given back when it became complete
        reserved = node.store._categories["r"].chunks[second.name].reserved
        if reserved < 0:
            pytest.skip(f"the file system under {tmp_path} allocates nothing ahead")
        size, allocated = await _sizes(second)
        assert size == len(body)
        assert allocated >= size + (1 << 20)  # allocated ahead
    size, allocated = await _sizes(second)
    assert size == len(body)
    assert allocated < size + (64 << 10)  # given back when the node stopped
    assert await read_file(second) == body


async def test_a_big_write_in_the_worker_thread_allocates_ahead_too(tmp_path: Path) -> None:
    # A big write the worker thread appends (the handler's path: here the category's first
    # write) allocates the chunk's space ahead as an append on the loop does.
    if chunk_index._fallocate() is None:
        pytest.skip("no fallocate(2) on this platform")
    store = ChunkStore(tmp_path / "data", "me", max_chunk_size=64 << 20)
    await asyncio.to_thread(store.open)
    try:
        body = _messages("t", 10_000)  # 1 MB
        await store.write("c", body)
        await store.write("c", body)
        chunk = store._categories["c"].chunks["me-chunk000000000"]
        if chunk.reserved < 0:
            pytest.skip(f"the file system under {tmp_path} allocates nothing ahead")
        size, allocated = await _sizes(tmp_path / "data" / "c" / "me-chunk000000000")
        assert size == 2 * len(body)
        assert allocated >= size + (1 << 20)
    finally:
        await asyncio.to_thread(store.close)
    size, allocated = await _sizes(tmp_path / "data" / "c" / "me-chunk000000000")
    assert allocated < size + (64 << 10)  # given back when the store closed
