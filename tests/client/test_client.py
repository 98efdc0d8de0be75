"""The client against real nodes on loopback: sends, failover, producer, consumer."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from chukcha.bus.node import Node
from chukcha.client import Batch, Client, ConsumerConfig, Position, SyncClient
from chukcha.client.consumer import Consumer
from chukcha.errors import (
    ConsumerError,
    MessageTooLargeError,
    NodeUnavailableError,
    RequestRejectedError,
)
from chukcha.protocol import MAX_MESSAGE_SIZE
from chukcha.testing import run_node


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A loopback port that refuses connections (bound by us, never listening)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield url_of(sock)
    finally:
        sock.close()


@pytest.fixture
def stalled() -> Iterator[socket.socket]:
    """A loopback port that accepts connections (kernel backlog) but never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
async def client(node: Node) -> AsyncIterator[Client]:
    async with Client([node.url]) as c:
        yield c


async def read_all(consumer: Consumer, count: int, timeout: float = 20) -> list[bytes]:
    """Read until ``count`` messages arrived (committing each batch)."""
    got: list[bytes] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            for batch in await consumer.read():
                got += batch.messages()
                await consumer.commit({batch.owner: batch.position})
    return got


async def live(c: Client, category: str) -> list[str]:
    return [x.name for x in await c.list_chunks(category)]


def ids_of(lines: list[bytes]) -> list[str]:
    return [orjson.loads(m)["id"] for m in lines]


async def test_send_and_consume_round_trip(client: Client) -> None:
    ids = await client.send("orders", [{"n": i} for i in range(50)] + [b'{"id":"raw-1"}'])
    assert ids[-1] == "raw-1" and len(set(ids)) == 51
    async with client.consumer("orders") as consumer:
        assert consumer.lag_bytes > 0
        got = await read_all(consumer, 51)
        stats = consumer.stats
    assert ids_of(got) == ids
    assert stats.bytes_read == sum(map(len, got)) + 51
    assert stats.lag_bytes == 0 and stats.acks == 0 and stats.batches >= 1
    assert orjson.loads(got[7]) == {"id": ids[7], "n": 7}


async def test_large_sends_are_split_under_the_node_limit(client: Client) -> None:
    event = b"x" * (500 << 10)
    await client.send("big", [event] * 20)  # 10 MiB: one body would be refused (4 MiB limit)
    chunks = await client.list_chunks("big")
    assert sum(c.size for c in chunks) == 20 * (len(event) + 1)


async def test_an_oversized_event_is_refused_before_sending(client: Client) -> None:
    with pytest.raises(MessageTooLargeError):
        await client.send("c", [b"small", b"y" * (MAX_MESSAGE_SIZE + 1)])
    assert await client.list_categories() == []


async def test_write_fails_over_to_the_next_node(node: Node, refused_url: str) -> None:
    async with Client([refused_url, node.url]) as c:
        ids = await c.send("c", [{"k": 1}, {"k": 2}])
        async with c.consumer("c", node=node.url) as consumer:
            assert ids_of(await read_all(consumer, 2)) == ids


async def test_timed_out_write_fails_over_with_the_same_bytes(
    node: Node, stalled: socket.socket
) -> None:
    stalled_url = url_of(stalled)
    async with Client([stalled_url, node.url], timeout=0.5) as c:
        ids = await c.send("c", [{"k": 1}])
        async with c.consumer("c", node=node.url) as consumer:
            assert ids_of(await read_all(consumer, 1)) == ids


async def test_every_node_failing_reports_each_error(
    refused_url: str, stalled: socket.socket
) -> None:
    stalled_url = url_of(stalled)
    async with Client([refused_url, stalled_url], timeout=0.5) as c:
        with pytest.raises(NodeUnavailableError) as info:
            await c.send("c", [{"k": 1}])
    assert set(info.value.errors) == {refused_url, stalled_url}
    assert "failed on every node" in str(info.value)


async def test_a_4xx_answer_is_not_retried_on_another_node(tmp_path: Path, node: Node) -> None:
    async with (
        run_node(tmp_path / "small", instance="small", max_batch_size=1000,
                 max_message_size=500) as small,
        Client([small.url, node.url]) as c,
    ):
        with pytest.raises(RequestRejectedError) as info:
            await c.send("c", [b"z" * 400] * 5)  # 2005 bytes: over small's batch limit
        assert info.value.status == 400
        assert await c.api.list_categories(node.url) == []


async def test_producer_batches_lingers_and_flushes_on_close(client: Client) -> None:
    async with client.consumer("p") as consumer:
        async with client.producer("p", linger=0.01) as producer:
            first = await producer.send({"n": 0})
            # Nobody flushes: the linger timer alone must send it.
            first_lines = await read_all(consumer, 1)
            assert ids_of(first_lines) == [first]
            rest = await producer.send_many([{"n": i} for i in range(1, 3000)])
            last = await producer.send(b'{"id":"last"}')
        # Stopping the producer flushed everything.
        got = await read_all(consumer, 3000)
    assert ids_of(got) == [*rest, last]
    stats = producer.stats
    assert (stats.accepted_events, stats.failed_batches, stats.pending_bytes) == (3001, 0, 0)
    assert stats.written_bytes == sum(len(m) + 1 for m in first_lines + got)


async def test_producer_back_pressure_and_errors_reach_the_caller(
    stalled: socket.socket,
) -> None:
    url = url_of(stalled)
    async with Client([url], timeout=30) as c:
        producer = c.producer("bp", max_batch_bytes=1000, max_buffer_bytes=1000, linger=0)
        await producer.start()
        await producer.send(b"a" * 999)  # 1000 bytes: the buffer is full, the write hangs
        blocked = asyncio.ensure_future(producer.send(b"b"))
        done, _ = await asyncio.wait([blocked], timeout=0.3)
        assert not done  # waits for space: the only write in flight never gets an answer
        stalled.close()  # the pending connection is reset: the write fails on every node
        with pytest.raises(NodeUnavailableError):
            async with asyncio.timeout(20):
                await blocked
        with pytest.raises(RuntimeError, match="stopped"):
            await producer.stop()
            await producer.send(b"c")


async def test_flush_raises_when_a_batch_was_lost(refused_url: str) -> None:
    async with Client([refused_url]) as c:
        producer = c.producer("lost")
        await producer.send({"n": 1})  # starts it (no `async with` here)
        with pytest.raises(NodeUnavailableError):
            await producer.flush()
        await producer.stop()


async def test_restored_positions_continue_exactly_there(tmp_path: Path) -> None:
    async with (
        run_node(tmp_path / "d", instance="a", max_chunk_size=300) as node,
        Client([node.url]) as c,
    ):
        ids: list[str] = []
        for i in range(20):  # ~45 bytes each: several chunks
            ids += await c.send("r", [{"i": i}, {"i": i, "x": 1}])
        async with c.consumer("r") as first:
            got: list[bytes] = []
            saved: dict[str, Position] = {}
            while len(got) < 17:
                batch = (await first.read(timeout=10))[0]
                got += batch.messages()
                saved = {batch.owner: batch.position}
            await first.commit(saved)
        async with c.consumer("r", positions=saved) as second:
            got += await read_all(second, 40 - len(got))
        assert ids_of(got) == ids


async def test_acks_follow_commits_only(tmp_path: Path) -> None:
    async with (
        run_node(tmp_path / "d", instance="a", max_chunk_size=100) as node,
        Client([node.url]) as c,
    ):
        for i in range(3):  # three bodies -> three chunks, the first two complete
            await c.send("a", [b"%d" % i * 60])
        async with c.consumer("a") as consumer:
            batches: list[Batch] = []
            async with asyncio.timeout(10):
                while len(batches) < 3:
                    batches += await consumer.read()
                while not consumer.caught_up:
                    assert await consumer.read(timeout=0.2) == []
            names = [c.name for c in await c.list_chunks("a")]
            assert len(names) == 3  # read to the end, but nothing committed: no acks
            half = Position(batches[0].chunk, batches[0].end - 1)
            await consumer.commit({"a": half})  # not past the end of chunk 0
            assert [c.name for c in await c.list_chunks("a")] == names
            await consumer.commit({"a": batches[1].position})
            assert [c.name for c in await c.list_chunks("a")] == names[2:]
            await consumer.commit({"a": batches[2].position})  # incomplete: not acked
            assert [c.name for c in await c.list_chunks("a")] == names[2:]


async def test_a_chunk_not_replicated_yet_is_waited_out(node: Node, client: Client) -> None:
    await client.send("w", [b"own"])
    async with client.consumer("w", positions={"b": Position("b-chunk000000000", 0)}) as cons:
        first = await cons.read(timeout=10)
        assert [b.messages() for b in first] == [[b"own"]]
        pending = asyncio.ensure_future(cons.read(timeout=20))
        done, _ = await asyncio.wait([pending], timeout=0.3)
        assert not done  # b's chunk answers 404 here: waited out, not an error
        # "Replicate" b's chunk to this node.
        await node.store.append_replica("w", "b-chunk000000000", 0, b"from-b\n")
        batches = await pending
    assert [(b.owner, b.messages()) for b in batches] == [("b", [b"from-b"])]


async def test_idle_consumer_long_polls_instead_of_spinning(
    node: Node, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    await client.send("idle", [b"x"])
    reads = 0
    original = node.store.read_wait

    async def counting(category: str, chunk: str, off: int, max_size: int, wait: float) -> Any:
        nonlocal reads
        reads += 1
        return await original(category, chunk, off, max_size, wait)

    monkeypatch.setattr(node.store, "read_wait", counting)
    async with client.consumer("idle") as consumer:
        assert [b.data for b in await consumer.read(timeout=10)] == [b"x\n"]
        assert await consumer.read(timeout=1.5) == []
        # One long poll parked on the open chunk (plus the first read): no polling loop.
        assert reads <= 3
        later = asyncio.ensure_future(consumer.read(timeout=20))
        await client.send("idle", [b"y"])
        assert [b.data for b in await later] == [b"y\n"]


async def test_consumer_without_long_poll_support_still_reads(client: Client) -> None:
    # long_poll=0 behaves as against a Go server: the open chunk is polled.
    consumer = client.consumer("go", config=ConsumerConfig(long_poll=0, poll_interval=0.05))
    async with consumer:
        await client.send("go", [b"1"])
        assert await read_all(consumer, 1) == [b"1"]
        later = asyncio.ensure_future(read_all(consumer, 1))
        await client.send("go", [b"2"])
        assert await later == [b"2"]


async def test_a_bad_category_is_a_clear_error(client: Client) -> None:
    with pytest.raises(ValueError, match="category"):
        client.consumer("../etc")
    with pytest.raises(ValueError, match="category"):
        await client.send("a/b", [b"x"])
    assert isinstance(ConsumerError("x"), Exception)


def _sync_round_trip(url: str) -> tuple[list[str], list[bytes], list[str]]:
    with SyncClient([url]) as c:
        ids = c.send("sync", [{"n": 1}, {"n": 2}])
        got: list[bytes] = []
        with c.consumer("sync", group="script") as consumer:
            while len(got) < 2:
                for batch in consumer.read(timeout=10):
                    got += batch.messages()
                    consumer.commit({batch.owner: batch.position})
        return ids, got, c.list_categories()


async def test_sync_client_in_a_thread_of_its_own(node: Node) -> None:
    ids, got, categories = await asyncio.to_thread(_sync_round_trip, node.url)
    assert ids_of(got) == ids
    assert categories == ["sync"]
    with pytest.raises(RuntimeError, match="inside an event loop"):
        SyncClient([node.url])


async def test_consumer_starts_on_the_next_node_when_the_first_is_down(
    node: Node, refused_url: str
) -> None:
    async with Client([refused_url, node.url]) as c:
        await c.send_to(node.url, "x", [b"one"])
        consumer = c.consumer("x", config=ConsumerConfig(retry_interval=0.05))
        async with asyncio.timeout(20):
            assert await read_all(consumer, 1) == [b"one"]
        assert consumer.url == node.url
        assert consumer.stats.failed_requests >= 1
        await consumer.stop()


async def test_consumer_polls_gently_a_node_that_ignores_wait(
    node: Node, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Make the node answer as the Go server does: `wait` is ignored, an empty read is at once.
    reads = 0
    original = node.store.read

    async def no_long_poll(category: str, chunk: str, off: int, max_size: int,
                           wait: float) -> Any:
        nonlocal reads
        reads += 1
        return await original(category, chunk, off, max_size)

    monkeypatch.setattr(node.store, "read_wait", no_long_poll)
    await client.send("go", [b"1"])
    consumer = client.consumer("go", config=ConsumerConfig(poll_interval=0.2))
    async with consumer:
        assert await read_all(consumer, 1) == [b"1"]
        reads = 0
        assert await consumer.read(timeout=1.0) == []
        assert reads <= 8  # about one per poll_interval, not a busy loop
        later = asyncio.ensure_future(read_all(consumer, 1))
        await client.send("go", [b"2"])
        assert await later == [b"2"]


async def test_one_event_is_sent_as_one_event_not_iterated(client: Client) -> None:
    # A lone dict, str, bytes or typed event is one event: iterating it would send a dict's
    # keys or a string's characters as lines.
    @dataclasses.dataclass
    class Order:
        customer: str

    ids = [*await client.send("one", {"id": "d1", "n": 1}), *await client.send("one", "t1"),
           *await client.send("one", b'{"id": "b1"}'), *await client.send("one", Order("ann"))]
    assert len(ids) == 4 and ids[:3] == ["d1", "", "b1"]
    async with client.consumer("one") as consumer:
        got = await read_all(consumer, 4)
    assert got[:3] == [b'{"id":"d1","n":1}', b"t1", b'{"id": "b1"}']
    assert orjson.loads(got[3]) == {"id": ids[3], "customer": "ann"}

    def sync_send() -> list[str]:
        with SyncClient([client.nodes[0]]) as sync:
            return sync.send("one", {"id": "d2"})

    assert await asyncio.to_thread(sync_send) == ["d2"]


@pytest.mark.parametrize(("read_ahead", "budget"), [(0, 0), (4, 0), (8, 3)])
async def test_read_ahead_delivers_in_order_and_acks_only_committed_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_ahead: int, budget: int
) -> None:
    """``budget``: read_ahead_bytes as a number of (the largest) chunks; 0: the default."""
    async with (
        run_node(tmp_path / "d", instance="a", max_chunk_size=100) as node,
        Client([node.url]) as c,
    ):
        ids: list[str] = []
        for i in range(24):  # one body per chunk: 23 complete chunks and the open one
            ids += await c.send("ra", [{"i": i, "pad": "x" * 60}])
        names = [x.name for x in await c.list_chunks("ra")]
        assert len(names) == 24
        # Spy on the real requests (the node answers them): which chunks were asked for when.
        asked: list[tuple[str, int]] = []
        real_read = c.api.read

        async def read(url: str, category: str, chunk: str, offset: int, size: int,
                       **kw: Any) -> bytes:
            asked.append((chunk, offset))
            return await real_read(url, category, chunk, offset, size, **kw)

        monkeypatch.setattr(c.api, "read", read)
        largest = max(x.size for x in await c.list_chunks("ra"))
        config = ConsumerConfig(read_ahead=read_ahead)
        if budget:
            config = dataclasses.replace(config, read_ahead_bytes=budget * largest)
        got: list[bytes] = []
        asked_before: list[set[str]] = []  # per batch: the chunks asked for before it came
        committed = ""
        async with c.consumer("ra", group="g", config=config) as consumer:
            async with asyncio.timeout(20):
                while len(got) < len(ids):
                    for batch in await consumer.read():
                        asked_before.append({ch for ch, _ in asked})
                        got += batch.messages()
                        # Nothing acked (the only group: acked = deleted) but what was
                        # committed before this batch.
                        assert await live(c, "ra") == [
                            n for n in names if n > committed or n == names[-1]]
                        if len(got) % 3 == 0:
                            await consumer.commit({batch.owner: batch.position})
                            committed = batch.chunk
                            assert await live(c, "ra") == [
                                n for n in names if n > committed or n == names[-1]]
        assert ids_of(got) == ids  # every message once, in order
        # How many of the next chunks had been asked for when each batch was handed over.
        ahead = [sum(n in asked_before[i] for n in names[i + 1:]) for i in range(len(names))]
        if read_ahead:  # the next complete chunks were asked for early (the open one never)
            assert min(ahead[:len(names) - 4]) >= 2
            assert max(ahead) <= (budget or read_ahead)
        else:
            assert max(ahead) == 0


async def test_read_ahead_waits_for_the_last_read_of_a_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        run_node(tmp_path / "d", instance="a", max_chunk_size=250) as node,
        Client([node.url]) as c,
    ):
        for i in range(4):  # one body of three ~90-byte messages per chunk
            await c.send("rl", [b"%d-%s" % (i * 3 + j, b"x" * 85) for j in range(3)])
        names = [x.name for x in await c.list_chunks("rl")]
        assert len(names) == 4
        asked: list[str] = []
        real_read = c.api.read

        async def read(url: str, category: str, chunk: str, offset: int, size: int,
                       **kw: Any) -> bytes:
            asked.append(chunk)
            return await real_read(url, category, chunk, offset, size, **kw)

        monkeypatch.setattr(c.api, "read", read)
        config = ConsumerConfig(max_batch_bytes=100)  # one message per read
        got: list[bytes] = []
        async with c.consumer("rl", config=config) as consumer, asyncio.timeout(20):
            first = (await consumer.read())[0]
            # Two more reads of chunk 0 to go: nothing of the next chunks asked for yet.
            assert set(asked) == {names[0]}
            got += first.messages()
            while len(got) < 12:
                for batch in await consumer.read():
                    got += batch.messages()
        assert got == [b"%d-%s" % (i, b"x" * 85) for i in range(12)]
        assert set(asked) == set(names)
