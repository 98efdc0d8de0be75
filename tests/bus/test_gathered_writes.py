"""Small writes gathered per event-loop iteration (``ChunkStore.write_later``, the fast path's
``LATER``): appended with one ``write`` at the end of the iteration, each answered exactly once
after its bytes are in the chunk, in order per connection, errors answered to each, and the
chunk-size rules of separate writes."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chukcha.bus.chunks import ChunkStore, StoreEvent, StoreEventKind
from chukcha.bus.node import Node
from chukcha.errors import DiskWriteError
from tests.bus.conftest import Api, read_file

C0 = "moscow-chunk000000000"


class _Answers:
    """The ``done`` callbacks of gathered writes: what each was called with, and how often."""

    def __init__(self, n: int) -> None:
        self.got: dict[int, list[BaseException | None]] = {i: [] for i in range(n)}
        self._all = asyncio.get_running_loop().create_future()

    def done(self, i: int) -> Callable[[BaseException | None], None]:
        def call(error: BaseException | None) -> None:
            self.got[i].append(error)
            if all(self.got.values()) and not self._all.done():
                self._all.set_result(None)
        return call

    async def wait(self) -> None:
        if not self.got:
            return
        async with asyncio.timeout(10):
            await self._all


class _WriteSpy:
    """``os.write`` as it is, counting the calls on one fd; ``fail`` makes it fail with ENOSPC
    after ``budget`` bytes (a full disk, in process)."""

    def __init__(self, real: Callable[[int, bytes | memoryview], int], fd: int) -> None:
        self._real, self.fd, self.calls, self.fail, self.budget = real, fd, 0, False, 0

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if fd != self.fd:
            return self._real(fd, data)
        self.calls += 1
        if self.fail:
            if self.budget <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = self._real(fd, memoryview(data)[: self.budget])
            self.budget -= n
            return n
        return self._real(fd, data)


def _events(store: ChunkStore) -> list[StoreEvent]:
    seen: list[StoreEvent] = []
    store.add_listener(seen.append)
    return seen


async def test_writes_of_one_iteration_land_in_order_with_one_write_and_one_event(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = node.store
    await store.write("a", b"first\n")
    await store.write("b", b"first\n")
    spy = _WriteSpy(os.write, store._categories["a"].write_fd)
    monkeypatch.setattr("chukcha.bus.chunks.os.write", spy.write)
    events = _events(store)
    answers = _Answers(40)
    for i in range(40):  # one callback: nothing runs in between
        assert store.write_later("a" if i % 4 else "b", b"m%02d\n" % i, answers.done(i))
    assert store.write_now("a", b"now\n") is not None  # a write that does not wait goes first
    assert not any(answers.got.values())  # nothing is answered before the end of the iteration
    await answers.wait()
    assert all(got == [None] for got in answers.got.values()), answers.got
    a = b"first\nnow\n" + b"".join(b"m%02d\n" % i for i in range(40) if i % 4)
    b = b"first\n" + b"".join(b"m%02d\n" % i for i in range(0, 40, 4))
    assert await read_file(node.config.data_dir / "a" / C0) == a
    assert await read_file(node.config.data_dir / "b" / C0) == b
    assert spy.calls == 2  # "now", then the 30 gathered writes of "a" at once
    assert [(e.kind, e.category, e.size) for e in events] == [
        (StoreEventKind.WRITTEN, "a", len(b"first\nnow\n")),
        (StoreEventKind.WRITTEN, "b", len(b)),  # in the order the categories came
        (StoreEventKind.WRITTEN, "a", len(a)),
    ]
    traffic = store.traffic()
    assert (traffic["a"].writes, traffic["a"].messages_written) == (32, 32)
    assert (traffic["b"].writes, traffic["b"].bytes_written) == (11, len(b))


async def test_a_failed_gathered_write_answers_each_with_the_error_and_leaves_nothing(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = node.store
    await store.write("a", b"good\n")
    spy = _WriteSpy(os.write, store._categories["a"].write_fd)
    spy.fail, spy.budget = True, 7  # part of the gathered bytes fits, then the disk is full
    monkeypatch.setattr("chukcha.bus.chunks.os.write", spy.write)
    events = _events(store)
    answers = _Answers(10)
    for i in range(10):
        assert store.write_later("a", b"w%d\n" % i, answers.done(i))
    await answers.wait()
    errors = [got for got in answers.got.values()]
    assert all(len(got) == 1 and isinstance(got[0], DiskWriteError) for got in errors), errors
    assert "No space left on device" in str(errors[0][0])
    assert await read_file(node.config.data_dir / "a" / C0) == b"good\n"  # rolled back
    assert store.chunk_size("a", C0) == 5
    assert events == []
    assert store.traffic()["a"].writes == 1
    spy.fail = False  # room again
    again = _Answers(1)
    assert store.write_later("a", b"after\n", again.done(0))
    await again.wait()
    assert again.got == {0: [None]}
    assert await read_file(node.config.data_dir / "a" / C0) == b"good\nafter\n"


async def test_gathered_writes_wait_for_a_category_taken_before_the_end_of_the_iteration(
    node: Node,
) -> None:
    store = node.store
    await store.write("a", b"first\n")
    lock = store._categories["a"].lock  # what a rotation or a big write holds across awaits
    answers = _Answers(3)
    for i in range(3):
        assert store.write_later("a", b"w%d\n" % i, answers.done(i))
    await lock.acquire()  # free: taken without yielding, before the gathered writes are done
    try:
        async with asyncio.timeout(10):
            while not lock._waiters:  # noqa: ASYNC110 - polled: no event tells when they wait
                await asyncio.sleep(0.01)
        assert not any(answers.got.values())
        assert await read_file(node.config.data_dir / "a" / C0) == b"first\n"
    finally:
        lock.release()
    await answers.wait()
    assert all(got == [None] for got in answers.got.values()), answers.got
    assert await read_file(node.config.data_dir / "a" / C0) == b"first\nw0\nw1\nw2\n"
    assert store.traffic()["a"].writes == 4


@settings(max_examples=40, deadline=None)
@given(max_chunk_size=st.integers(1, 80), sizes=st.lists(st.integers(1, 30), max_size=40))
async def test_gathered_writes_keep_the_chunk_size_rules_of_separate_writes(
    tmp_path_factory: pytest.TempPathFactory, max_chunk_size: int, sizes: list[int]
) -> None:
    """Each body lands whole in one chunk, once; the gathered ones in their order; a chunk
    grows past the limit only by a single body bigger than the limit (as separate writes)."""
    data_dir = await asyncio.to_thread(tmp_path_factory.mktemp, "data")
    store = ChunkStore(data_dir, "moscow", max_chunk_size=max_chunk_size)
    await asyncio.to_thread(store.open)
    try:
        bodies = [b"%d:%b\n" % (i, b"x" * n) for i, n in enumerate(sizes)]
        await store.write("c", b"0\n")  # the category and its current chunk
        answers = _Answers(len(bodies))
        gathered, waits = [], []
        for i, body in enumerate(bodies):  # one iteration: gathered, or the handler's path
            if store.write_later("c", body, answers.done(i)):
                gathered.append(body)
            else:
                waits.append(asyncio.ensure_future(store.write("c", body)))
                answers.done(i)(None)
        await asyncio.gather(*waits)
        await answers.wait()
        assert all(got == [None] for got in answers.got.values())
        contents = [await read_file(store.data_dir / "c" / c.name)
                    for c in store.list_chunks("c")]  # name order = write order
        landed = [line + b"\n" for data in contents for line in data.split(b"\n")[:-1]]
        assert sorted(landed) == sorted([b"0\n", *bodies])
        assert [b for b in landed if b in gathered] == gathered
        for data in contents:
            assert len(data) <= max_chunk_size or data.count(b"\n") == 1, (data, max_chunk_size)
    finally:
        await asyncio.to_thread(store.close)


async def _raw(node: Node) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = node.address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


_MANY = 16
"""Idle connections the tests keep open beside their own (the node gathers small writes with
any number of connections; it used to need 16)."""


async def _gathering_on(node: Node) -> list[asyncio.StreamWriter]:
    """Many idle connections open (``_MANY``), as a busy node has."""
    return [(await _raw(node))[1] for _ in range(_MANY)]


def _post(category: str, body: bytes) -> bytes:
    return b"POST /write?category=%b HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%b" % (
        category.encode(), len(body), body)


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
    return head, await reader.readexactly(length)


async def _pipeline(
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], category: str,
    bodies: list[list[bytes]],
) -> None:
    """Connection ``c`` sends its writes ``bodies[c]`` pipelined, all connections' sent before
    the node reads any of them; then each write must be answered 200 with an empty body."""
    for (_, writer), mine in zip(conns, bodies, strict=True):
        writer.write(b"".join(_post(category, body) for body in mine))
    async with asyncio.timeout(10):
        for (reader, _), mine in zip(conns, bodies, strict=True):
            for _ in mine:
                head, body = await _answer(reader)
                assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"", head


async def test_many_connections_pipelining_writes_are_each_answered_once_in_order(
    node: Node, api: Api
) -> None:
    await api.write("p", b"start\n")
    conns = [await _raw(node) for _ in range(24)]
    events = _events(node.store)
    await _pipeline(conns, "p", [[b"c%02d-%d\n" % (c, j) for j in range(3)] for c in range(24)])
    # Nothing more on any connection: the next answer is that of the next request.
    for c, (reader, writer) in enumerate(conns):
        writer.write(b"GET /listCategories HTTP/1.1\r\nHost: t\r\n\r\n")
        async with asyncio.timeout(10):
            head, body = await _answer(reader)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b'["p"]', (c, head, body)
        writer.close()
    lines = (await api.read("p", C0)).split(b"\n")[:-1]
    assert lines[0] == b"start" and len(lines) == 1 + 24 * 3
    # The first writes of all 24 came in one iteration: gathered, fewer appends than writes.
    assert len([e for e in events if e.category == "p"]) < 24 * 3
    assert sorted(lines[1:]) == sorted(b"c%02d-%d" % (c, j) for c in range(24) for j in range(3))
    for c in range(24):  # each connection's writes in its order
        mine = [line for line in lines if line.startswith(b"c%02d-" % c)]
        assert mine == [b"c%02d-%d" % (c, j) for j in range(3)]


async def test_writes_of_a_few_connections_in_one_iteration_are_gathered(
    node: Node, api: Api
) -> None:
    """Gathering does not wait for many connections: three connections' writes that the node
    reads in one iteration land with fewer appends than writes, each answered, none lost."""
    await api.write("few", b"start\n")
    conns = [await _raw(node) for _ in range(3)]
    events = _events(node.store)
    await _pipeline(conns, "few", [[b"c%d-%d\n" % (c, j) for j in range(2)] for c in range(3)])
    for _, writer in conns:
        writer.close()
    lines = (await api.read("few", C0)).split(b"\n")[:-1]
    assert sorted(lines[1:]) == sorted(b"c%d-%d" % (c, j) for c in range(3) for j in range(2))
    assert len([e for e in events if e.category == "few"]) < 3 * 2


async def test_a_full_disk_answers_every_gathered_request_and_keeps_serving(
    node: Node, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    await api.write("c", b"good\n")
    spy = _WriteSpy(os.write, node.store._categories["c"].write_fd)
    spy.fail, spy.budget = True, 3
    monkeypatch.setattr("chukcha.bus.chunks.os.write", spy.write)
    conns = [await _raw(node) for _ in range(20)]  # enough for the node to gather
    for c, (_, writer) in enumerate(conns):
        writer.write(_post("c", b"w%d\n" % c) + _post("c", b"v%d\n" % c))
    async with asyncio.timeout(10):
        for reader, _ in conns:
            for _ in range(2):
                head, body = await _answer(reader)
                assert head.startswith(b"HTTP/1.1 500 "), head
                assert b"No space left on device" in body, body
    assert await read_file(node.config.data_dir / "c" / C0) == b"good\n"
    spy.fail = False
    for reader, writer in conns:  # the same connections go on
        writer.write(_post("c", b"ok\n"))
        async with asyncio.timeout(10):
            head, _ = await _answer(reader)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
        writer.close()
    assert await api.read("c", C0) == b"good\n" + b"ok\n" * 20


async def test_the_server_stops_after_answering_the_writes_it_gathered(
    node: Node, api: Api, tmp_path: Path
) -> None:
    await api.write("s", b"start\n")
    conns = [await _raw(node) for _ in range(20)]  # enough for the node to gather
    for c, (_, writer) in enumerate(conns):
        writer.write(_post("s", b"s%d\n" % c))
    async with asyncio.timeout(10):
        while node.server.deferred == 0:  # noqa: ASYNC110 - polled until the node took them
            await asyncio.sleep(0)
    await node.server.stop(10)
    for reader, writer in conns:  # each answered (not cut off), then closed
        async with asyncio.timeout(10):
            data = await reader.read()
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in data, data
        writer.close()
    on_disk = await read_file(tmp_path / "data" / "s" / C0)
    assert sorted(on_disk.split(b"\n")[:-1]) == sorted([b"s%d" % c for c in range(20)]
                                                       + [b"start"])


_examples = itertools.count()
_KINDS = ("write", "sync", "bad", "list")


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.lists(st.sampled_from(_KINDS), min_size=1, max_size=5),
                     min_size=2, max_size=6))
async def test_any_mix_of_pipelined_requests_on_many_connections_is_answered_in_order(
    node: Node, plan: list[list[str]]
) -> None:
    """Connections pipelining gathered writes, synced writes (the handler), bad bodies and
    other requests, all sent before the node reads any: each request gets its own answer, in
    its connection's order; every accepted body is in the chunk once, in that order too."""
    category = f"mix{next(_examples)}"
    await node.store.write(category, b"start\n")  # known: plain writes take the fast path
    idle = await _gathering_on(node)
    conns = [await _raw(node) for _ in plan]
    for c, ((_, writer), kinds) in enumerate(zip(conns, plan, strict=True)):
        requests = []
        for j, kind in enumerate(kinds):
            body = b"c%d-%d\n" % (c, j)
            if kind == "write":
                requests.append(_post(category, body))
            elif kind == "sync":
                requests.append(_post(category + "&sync=1", body))
            elif kind == "bad":
                requests.append(_post(category, body[:-1]))  # no final newline: refused
            else:
                requests.append(b"GET /listCategories HTTP/1.1\r\nHost: t\r\n\r\n")
        writer.write(b"".join(requests))
    async with asyncio.timeout(20):
        for (reader, writer), kinds in zip(conns, plan, strict=True):
            for kind in kinds:
                head, body = await _answer(reader)
                if kind == "bad":
                    assert head.startswith(b"HTTP/1.1 500 "), head
                    assert b"must end with a newline" in body, body
                else:
                    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), (kind, head, body)
                    assert (body == b"") == (kind != "list"), (kind, body)
            writer.close()
    data = b"".join([await read_file(node.config.data_dir / category / c.name)
                     for c in node.store.list_chunks(category)])
    lines = data.split(b"\n")[:-1]
    assert lines[0] == b"start"
    for c, kinds in enumerate(plan):
        mine = [line for line in lines if line.startswith(b"c%d-" % c)]
        assert mine == [b"c%d-%d" % (c, j) for j, kind in enumerate(kinds)
                        if kind in ("write", "sync")], (c, kinds, mine)
    for writer in idle:
        writer.close()
