"""A front's coalesced writes when the writer misbehaves: it closes the connection mid-request
(killed), never answers (stopped), or is not there (restarting). Every waiting client gets an
error (the front answers 503), never a hang or a 200, and the next write finds the writer
again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from chukcha.bus import coalesce, web
from chukcha.bus.coalesce import WriteCoalescer
from chukcha.bus.node import Node
from chukcha.errors import WriterUnavailableError
from chukcha.testing import run_node


async def _fake_writer(path: Path, behaviour: str) -> asyncio.Server:
    """A unix server that reads a request and then closes (``close``) or stays silent."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            if behaviour == "silent":
                await reader.read()  # silent until the client gives up
        finally:
            writer.close()

    return await asyncio.start_unix_server(serve, str(path))


@pytest.mark.parametrize("behaviour", ["close", "silent"])
async def test_a_writer_that_fails_mid_request_fails_every_waiting_write(
    tmp_path: Path, behaviour: str
) -> None:
    path = tmp_path / "writer.sock"
    server = await _fake_writer(path, behaviour)
    try:
        coalescer = WriteCoalescer(str(path), 1 << 20, timeout=0.5)
        # The first goes at once; the others gather behind it (same key) and would go next.
        futures = [coalescer.submit("k", "category=c", {}, b"m%d\n" % i) for i in range(5)]
        async with asyncio.timeout(10):
            results = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(r, WriterUnavailableError) for r in results), results
    finally:
        server.close()
        await server.wait_closed()
        coalescer.close()


async def test_no_writer_then_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "writer.sock"
    coalescer = WriteCoalescer(str(path), 1 << 20)
    with pytest.raises(WriterUnavailableError):
        await coalescer.submit("k", "category=c", {}, b"lost\n")
    async with run_node(tmp_path / "data", "w", internal_socket=str(path)) as node:
        answers = await asyncio.gather(
            *(coalescer.submit("k", "category=c", {}, b"m%d\n" % i) for i in range(50)))
        assert {a.status for a in answers} == {200}
        assert isinstance(answers[0], web.Response)
        # Coalesced: fewer writes reached the node than were made.
        assert node.store.traffic()["c"].writes < 50
        coalescer.close()


async def test_writes_answered_through_callbacks_get_each_answer_once(tmp_path: Path) -> None:
    """``submit_later`` (a front's fast path): each callback is called exactly once, with
    ``None`` for a landed write, the writer's other answer as it is, and the error when the
    writer fails, mixed with futures in one batch."""
    path = tmp_path / "writer.sock"
    coalescer = WriteCoalescer(str(path), 1 << 20, timeout=0.5)
    got: list[list[web.Outcome]] = [[] for _ in range(6)]
    try:
        async with run_node(tmp_path / "data", "w", internal_socket=str(path)) as node:
            await node.store.write("c", b"start\n")
            for i in range(3):
                coalescer.submit_later("k", "category=c", {}, b"m%d\n" % i, got[i].append)
            future = coalescer.submit("k", "category=c", {}, b"f\n")
            # Another key: the writer refuses the category, each of its writes gets the answer.
            coalescer.submit_later("bad", "category=../x", {}, b"b\n", got[3].append)
            async with asyncio.timeout(10):
                assert (await future).status == 200
                while not got[3]:  # noqa: ASYNC110 - polled until the writer answered it
                    await asyncio.sleep(0.01)
            assert got[:3] == [[None]] * 3
            refused = got[3][0]
            assert isinstance(refused, web.Response) and refused.status == 400, refused
            lines = await node.store.read("c", node.store.list_chunks("c")[0].name, 0, 1 << 20)
            assert sorted(lines.split(b"\n")[1:-1]) == [b"f", b"m0", b"m1", b"m2"]
        # The writer is gone: the callbacks get the error, once each.
        coalescer.submit_later("k", "category=c", {}, b"x\n", got[4].append)
        coalescer.submit_later("k", "category=c", {}, b"y\n", got[5].append)
        async with asyncio.timeout(10):
            while not (got[4] and got[5]):  # noqa: ASYNC110 - polled until both are answered
                await asyncio.sleep(0.01)
        assert all(len(g) == 1 and isinstance(g[0], WriterUnavailableError) for g in got[4:]), got
    finally:
        coalescer.close()


@asynccontextmanager
async def _holding(tmp_path: Path, hold: float) -> AsyncIterator[tuple[WriteCoalescer, Node]]:
    """A coalescer that holds batches up to ``hold`` seconds, in front of a real node (the
    writer, its internal socket under ``tmp_path``): both, closed after."""
    path = tmp_path / "writer.sock"
    coalescer = WriteCoalescer(str(path), 1 << 20, hold=hold)
    try:
        async with run_node(tmp_path / "data", "w", internal_socket=str(path)) as node:
            yield coalescer, node
    finally:
        coalescer.close()


async def test_a_batch_waits_for_as_many_writes_as_its_keys_recent_batches(
    tmp_path: Path,
) -> None:
    # After a batch of 8, the key's next batch waits (here up to 30 s: never reached) for 8
    # writes: 4 now and 4 a few loop iterations later go to the writer as one write, where
    # without the hold the first 4 went at once and the others after them (two writes).
    async with _holding(tmp_path, 30.0) as (coalescer, node):
        first = [coalescer.submit("k", "category=c", {}, b"a%d\n" % i) for i in range(8)]
        async with asyncio.timeout(10):
            assert {a.status for a in await asyncio.gather(*first)} == {200}
        writes = node.store.traffic()["c"].writes
        assert writes == 1  # the 8 went together
        second = [coalescer.submit("k", "category=c", {}, b"b%d\n" % i) for i in range(4)]
        for _ in range(3):
            await asyncio.sleep(0)  # a few loop iterations: the 4 would have gone by now
        second += [coalescer.submit("k", "category=c", {}, b"b%d\n" % i) for i in range(4, 8)]
        async with asyncio.timeout(10):
            assert {a.status for a in await asyncio.gather(*second)} == {200}
        assert node.store.traffic()["c"].writes == writes + 1


async def test_a_held_batch_goes_when_the_hold_ends_with_fewer_writes(tmp_path: Path) -> None:
    # The expected writes never come (the clients went away): the batch goes after the hold,
    # and the expectation falls, so a lone write later goes at once again.
    async with _holding(tmp_path, 0.05) as (coalescer, node):
        async with asyncio.timeout(10):
            await asyncio.gather(*(coalescer.submit("k", "category=c", {}, b"a%d\n" % i)
                                   for i in range(4)))
            for i in range(8):  # held, then sent alone; 4 -> 3.5 -> ... -> 1 expected
                assert (await coalescer.submit("k", "category=c", {}, b"z%d\n" % i)
                        ).status == 200
        lines = await node.store.read("c", node.store.list_chunks("c")[0].name, 0, 1 << 20)
        assert sorted(lines.split()) == sorted([b"a%d" % i for i in range(4)]
                                               + [b"z%d" % i for i in range(8)])
        assert coalescer._expect.get("k", 0.0) < 2  # no longer held


async def test_the_expectations_kept_stay_bounded_whatever_the_keys(tmp_path: Path) -> None:
    # A key is the query string and the forwarded headers: a client that sends a new one with
    # each write (a nonce or timestamp parameter, a token per request) must not make the front
    # keep an entry per write for good. Keys whose batches are single writes keep nothing; the
    # others are bounded (the count of distinct keys a busy front sees is not).
    async with _holding(tmp_path, 0.05) as (coalescer, _):
        async with asyncio.timeout(60):
            for i in range(300):  # one at a time: batches of one write
                query = f"category=c&nonce={i}"
                assert (await coalescer.submit(query, query, {}, b"s%d\n" % i)).status == 200
            assert len(coalescer._expect) == 0
            # As many keys as are kept had batches of two (set here: thousands of writes
            # otherwise); one more key's batch of two does not add to them.
            coalescer._expect.update(
                {f"pair-{k}": 2.0 for k in range(coalesce.KEPT_EXPECTATIONS)})
            got = await asyncio.gather(*(coalescer.submit("q", "category=c&pair=new", {},
                                                          b"p\n") for _ in range(2)))
            assert {a.status for a in got} == {200}
            assert len(coalescer._expect) <= coalesce.KEPT_EXPECTATIONS
